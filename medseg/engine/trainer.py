"""The training loop: MONAI CacheDataset → patches → Dice+CE with deep supervision → validation → checkpoints.

One function, :func:`train`, driven by a resolved config (see :mod:`medseg.config`). It writes into
``train.output``:

* ``config.yaml`` — the resolved config; ``plan.json`` — the preprocessing plan;
* ``last.pt`` every epoch and ``best.pt`` at the best validation mean Dice (see :mod:`.checkpoint`);
* ``metrics.csv`` — one row per epoch; ``curves.png`` — loss and validation Dice;
* with validation cases, ``validation.json``/``.csv`` and ``validation/`` (:mod:`.final_validation`); the
  validation Dice of every epoch and of ``best.pt`` is that of ``medseg segment``'s masks on the cases
  (:mod:`.validation`);
* ``label_scan.json`` (in ``train.output`` itself, shared by its folds) — the label files found clean by the
  check that runs before anything else (:func:`medseg.data.check.require_trainable_dataset`: headers, then
  every label file's values), so a resumed run or another fold does not read them again.

``train.init_from`` starts from another run's weights and plan (fine-tuning, :mod:`.finetune`).

At the end ``best.pt`` gets its checked int8 graph for CPU inference where OpenVINO is installed
(``train.quantize``, :mod:`.int8`).

``fold=K`` trains fold K of a cross-validation run into ``train.output/fold_K`` (:mod:`.folds`). Under
torchrun the same function trains data-parallel, rank 0 writing (:mod:`.distributed`).

Resuming (``resume=True``) restores weights, optimizer, scheduler, epoch, best metric and RNG state from
``last.pt``. Randomness per epoch is derived from ``(seed, epoch)`` — MONAI transform states, the sampler and
torch's generator are reseeded at every epoch start — so a resumed run continues exactly as the
uninterrupted run would have.

``data.cache`` chooses where the preprocessed cases live — RAM (``memory``, the default), files on disk
(``disk``) or nowhere (``none``, streaming); see :mod:`.caching`.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, list_data_collate

from medseg.config import Config, ConfigError, checkpoint_config, config_to_dict, dump_config
from medseg.data.check import require_trainable_dataset
from medseg.data.datasets import (
    input_channels,
    label_names,
    read_dataset_json,
    split_cases,
    training_cases,
)
from medseg.data.voxels import LABEL_SCAN_NAME, write_label_scan
from medseg.engine.caching import build_dataset, describe_cache, named_errors
from medseg.engine.distributed import Replicas, process_group, record_replicas
from medseg.engine.final_validation import record_final_validation
from medseg.engine.finetune import initial_checkpoint, load_initial_weights
from medseg.engine.folds import prepare_fold, refuse_cross_validation_run
from medseg.engine.int8 import quantize_run, require_quantizer
from medseg.engine.step import train_step, training_layout, training_precision
from medseg.engine.validation import ValidationCases, validate
from medseg.inference.fast import instance_norms_as_group_norms
from medseg.inference.loading import checkpoint_plan
from medseg.io import atomic_write_text
from medseg.io.atomic import remove_stale_temps
from medseg.io.checkpoint import load_checkpoint, save_checkpoint
from medseg.io.plan import Plan
from medseg.losses import build_loss
from medseg.nets.registry import build_network
from medseg.planning.plan_file import dump_plan
from medseg.planning.run_plan import resolve_plan
from medseg.report import append_history, training_curves
from medseg.transforms import train_transforms


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - MONAI and third-party code draw from the global RNG
    torch.manual_seed(seed)


def build_optimizer(cfg: Config, model: torch.nn.Module, total_iters: int):
    """``(optimizer, scheduler)``: AdamW or SGD with Nesterov momentum, and a poly learning-rate schedule.

    The schedule is nnU-Net's poly decay ``lr_t = optim.lr · (1 - t / T)^optim.poly_power`` (0.9 by default),
    stepped once per iteration, with ``T = total_iters`` (at least 1). ``optim.weight_decay`` applies to both
    optimizers, ``optim.momentum`` to SGD only. ``optim.name`` was checked against
    :data:`medseg.config.schema.OPTIMIZERS` when the config was loaded. AdamW uses PyTorch's fused kernel
    (``fused=True``, CPU and CUDA: one pass over all parameters, the same updates to float32 rounding; its
    speed: ``docs/speed.md``, section ``medseg.engine.trainer``).
    """
    o = cfg.optim
    if o.name == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True, weight_decay=o.weight_decay
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=max(total_iters, 1), power=o.poly_power)
    return opt, sched


def init_class_prior(model: torch.nn.Module, fractions: list[float], num_classes: int) -> bool:
    """Initialise the model's output biases to log(class voxel fraction) when it supports it.

    See :meth:`medseg.nets.unet.UNet3D.init_class_prior`; ``fractions`` come from the dataset fingerprint.
    """
    if len(fractions) < num_classes or not hasattr(model, "init_class_prior"):
        return False
    model.init_class_prior(torch.log(torch.tensor(fractions[:num_classes]).clamp_min(1e-5)))
    return True


def _infinite(loader: DataLoader):
    while True:
        yield from loader


def _rng_state() -> dict:
    np_state = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))  # noqa: NPY002
    random.setstate((3, tuple(state["python"]), None))


def train(
    cfg: Config,
    resume: bool = False,
    log=print,
    fold: int | str | None = None,
    plan_path: str | Path | None = None,
) -> Path:
    """Train the configured network; return the run folder. See the module docstring for outputs.

    Args:
        fold: ``None`` (one run, split by ``data.val_fraction`` / ``data.val_cases``), a cross-validation
            fold ``0 .. data.folds - 1`` or ``"all"`` (:mod:`medseg.engine.folds`).
        plan_path: a plan file (``medseg plan -o plan.json``, maybe edited) to use instead of planning from
            the fingerprint (:func:`medseg.planning.run_plan.resolve_plan`); a resumed run keeps its own plan,
            the folds of a run the plan of its first fold.
    """
    require_quantizer(cfg)
    with process_group(cfg.train.device) as replicas:
        run = _train(cfg, resume, log if replicas.is_main else _silent, fold, replicas, plan_path)
        main = replicas.is_main
    if main:  # after the process group: the other ranks do not wait on it
        quantize_run(cfg, run, log)
    return run


def _silent(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""


def _train(
    cfg: Config, resume: bool, log, fold: int | str | None, replicas: Replicas, plan_path: str | Path | None
) -> Path:
    tcfg = cfg.train
    root = cfg.data.root
    if root is None:
        raise ConfigError("data.root is not set (path to a dataset folder with dataset.json)")
    # headers, then the label files' values (train.output/label_scan.json: files checked before are not read
    # again); every problem at once (DatasetError), before any write and before the network is built
    label_scan = Path(tcfg.output) / LABEL_SCAN_NAME
    label_facts = replicas.on_main(lambda: require_trainable_dataset(root, scan_file=label_scan).label_facts)
    device = replicas.device
    seed_everything(tcfg.seed)

    meta = read_dataset_json(root)
    names = label_names(meta)
    ratios = cfg.augment.class_ratios
    if ratios is not None and len(ratios) != len(names):
        raise ConfigError(
            f"augment.class_ratios: {len(ratios)} ratios for {len(names)} labels (background included) in {root}"
        )
    cases = training_cases(root)
    channels = input_channels(meta, root)

    init = initial_checkpoint(tcfg.init_from, names) if tcfg.init_from else None  # fine-tuning

    def make(plan_cases: list[dict]) -> Plan:  # a plan file is checked here, before anything is written
        if init is not None and plan_path is None:
            return init[1]  # fine-tuning keeps the plan the weights were trained with
        return resolve_plan(cfg, plan_cases, names, channels, plan_path, log)

    if fold is None:
        out, shared = Path(tcfg.output), None
        refuse_cross_validation_run(out)
        train_cases, val_cases = split_cases(
            cases, cfg.data.val_fraction, tcfg.seed, list(cfg.data.val_cases or [])
        )
    else:  # split and plan made once per run folder (rank 0), shared by every fold
        shared = replicas.on_main(lambda: prepare_fold(cfg, fold, cases, make))
        out, train_cases, val_cases = shared.out, shared.train_cases, shared.val_cases
    out.mkdir(parents=True, exist_ok=True)
    if replicas.is_main:
        remove_stale_temps(out)  # temporary files of a killed earlier run (never a live writer's)

    ckpt = load_checkpoint(out / "last.pt") if resume else None  # every rank, on the CPU
    if ckpt is not None:
        checkpoint_config(ckpt, out / "last.pt")  # a recorded config that no longer loads is named here
    if not resume and replicas.is_main:  # a new run in an old folder starts a new history
        (out / "metrics.csv").unlink(missing_ok=True)
    if ckpt:
        plan = checkpoint_plan(ckpt, out / "last.pt")
    else:
        plan = shared.plan if shared else replicas.on_main(lambda: make(train_cases))
    if replicas.is_main:
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        atomic_write_text(out / "plan.json", dump_plan(plan))
        write_label_scan(label_scan, label_facts)  # in train.output: shared by the folds of a run

    num_classes = len(names)
    model = build_network(cfg.model, plan.in_channels, num_classes, plan.pool_kernels)
    if init is not None and ckpt is None:
        load_initial_weights(model, init[0], tcfg.init_from)
        log(f"fine-tuning from {tcfg.init_from} (its weights and plan; fresh optimizer, epoch 1)")
    else:
        init_class_prior(model, list(plan.class_fractions()), num_classes)
    precision = training_precision(tcfg.precision, device, model, plan.in_channels, plan.patch_size, log)
    channels_last = training_layout(tcfg.layout, device, precision)
    if channels_last:  # same function and state dict keys (engine/step.py)
        model = instance_norms_as_group_norms(model).to(memory_format=torch.channels_last_3d)
    model, net = replicas.wrap(model.to(device), cfg.model.norm)  # net: DDP under torchrun
    loss_fn = build_loss(cfg, num_classes).to(device)
    epochs, iters = tcfg.epochs, tcfg.iters_per_epoch
    optimizer, scheduler = build_optimizer(cfg, model, epochs * iters)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)

    start_epoch, best = 0, -math.inf
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt and precision.scaled:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best = int(ckpt["epoch"]) + 1, float(ckpt["best_metric"])
        _set_rng_state(ckpt["rng"])
        log(f"resumed from {out / 'last.pt'} at epoch {start_epoch}")

    dcfg = cfg.data
    train_tf = train_transforms(plan, cfg.augment)
    train_ds = build_dataset(cfg, plan, train_cases, train_tf, "train")  # data.cache: see engine/caching.py
    # validation reads its cases as `medseg segment` does (engine/validation.py), kept with data.cache: memory
    val_ds = ValidationCases(val_cases, keep=dcfg.cache == "memory")
    log(f"data cache: {describe_cache(cfg, plan)}")
    log(
        f"{len(train_cases)} training / {len(val_cases)} validation cases; spacing {list(plan.spacing)}; "
        f"device {device}, {precision.name}{', channels-last' if channels_last else ''}"
    )
    if replicas.distributed:
        log(f"{replicas.world} processes: effective batch {tcfg.batch_size * replicas.world} per step")

    def state(epoch: int) -> dict:
        return {
            "model": model.state_dict(),
            "config": config_to_dict(cfg),
            "plan": plan.to_dict(),
            "labels": dict(plan.labels),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "best_metric": best,
            "rng": _rng_state(),
        }

    t_start = time.monotonic()
    for epoch in range(start_epoch, epochs):
        epoch_seed = tcfg.seed * 1_000_003 + epoch
        train_tf.set_random_state(seed=replicas.rank_seed(epoch_seed) % 2**32)
        generator = torch.Generator().manual_seed(epoch_seed)
        loader = DataLoader(
            train_ds,
            batch_size=tcfg.batch_size if plan.batch_size is None else plan.batch_size,  # plans before it
            **replicas.loader_options(train_ds, generator, epoch_seed),
            num_workers=dcfg.num_workers,
            collate_fn=list_data_collate,
        )
        model.train()
        t0, losses = time.monotonic(), []
        batches = named_errors(_infinite(loader))
        progress = _progress(range(iters), tcfg.progress and replicas.is_main, f"epoch {epoch + 1}/{epochs}")
        for _ in progress:
            batch = next(batches)
            image, label = batch["image"].to(device), batch["label"].to(device)
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last_3d)
            loss = train_step(net, loss_fn, optimizer, scaler, image, label, precision)  # net: DDP or model
            scheduler.step()
            replicas.sync_buffers(model)  # EMA bases, CPU BatchNorm statistics
            losses.append(float(loss.detach()))
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
        row = {
            "epoch": epoch + 1,
            "train_loss": replicas.mean(float(np.mean(losses))),
            "lr": optimizer.param_groups[0]["lr"],
        }
        last_epoch = epoch == epochs - 1
        out_of_time = tcfg.max_minutes is not None and (time.monotonic() - t_start) / 60 > tcfg.max_minutes
        out_of_time = replicas.any(out_of_time)  # every rank stops after the same epoch
        if len(val_cases) and ((epoch + 1) % tcfg.val_every == 0 or last_epoch or out_of_time):
            scores = validate(model, val_ds, cfg, plan, device, replicas)
            row.update(
                {"val_dice": scores["mean"], **{f"val_dice_{k}": v for k, v in scores.items() if k != "mean"}}
            )
            if scores["mean"] > best:  # equal on every rank: the scores were gathered
                best = scores["mean"]
                if replicas.is_main:
                    save_checkpoint(state(epoch), out / "best.pt")
        row["seconds"] = time.monotonic() - t0
        val_text = (
            f", validation mean Dice {row['val_dice']:.4f} (best {best:.4f})" if "val_dice" in row else ""
        )
        log(f"epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f} ({row['seconds']:.0f} s){val_text}")
        # history first, checkpoint last: a kill in between re-runs this epoch on resume and its row is
        # replaced, so metrics.csv never misses an epoch that last.pt holds
        if replicas.is_main:
            append_history(out / "metrics.csv", row)
            training_curves(out / "metrics.csv", out / "curves.png")
            save_checkpoint(state(epoch), out / "last.pt")
        if out_of_time:
            log(f"stopping after epoch {epoch + 1}: train.max_minutes={tcfg.max_minutes} reached")
            break
    if replicas.distributed:
        record_replicas(replicas, model, out, log)
    if replicas.is_main and not (out / "best.pt").exists() and (out / "last.pt").exists():
        save_checkpoint(load_checkpoint(out / "last.pt"), out / "best.pt")  # no validation split: best = last
    replicas.barrier()
    if len(val_cases) and (out / "best.pt").exists():
        record_final_validation(model, val_ds, cfg, plan, device, out / "best.pt", replicas, log)
    return out


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(
        iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None
    )  # None: off when not a TTY
