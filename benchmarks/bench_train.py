"""Benchmark: one medseg training step vs the same step written with MONAI's Attention U-Net, in one run.

    python -m benchmarks.bench_train [--threads 2] [--warmup 2] [--steps 5] [--precision auto] [--ablations]

Both sides train on the same random batch (batch 2, one channel, 96×96×64, labels 0..6):

* medseg: the default ``attention_unet`` (filters 16..256, grid attention gates, deep supervision), the
  loss, optimizer and step :func:`medseg.engine.train` uses (:func:`medseg.losses.build_loss`: Dice+CE on
  every deep-supervision level; :func:`medseg.engine.trainer.build_optimizer`: fused AdamW;
  :func:`medseg.engine.step.train_step` in ``--precision`` resolved as the trainer resolves it, default
  ``auto`` = ``train.precision``'s default);
* MONAI: ``AttentionUnet(spatial_dims=3, in_channels=1, out_channels=7, channels=(16, 32, 64, 128, 256),
  strides=(2, 2, 2, 2))`` + ``DiceCELoss(to_onehot_y=True, softmax=True)`` + ``torch.optim.AdamW``, float32,
  as MONAI's tutorials write it. ``--monai-bf16`` adds the same network under the bf16 autocast, for context.

After ``--warmup`` untimed steps each, the steps are timed in rounds that alternate the contestants (A B A
B …), so that both see the same load from other processes; it prints the median seconds per step, the GFLOP
of one step (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matmuls, forward + backward,
multiply-add = 2) and the ratio medseg / MONAI. ``--ablations`` adds medseg variants that show what each
choice is worth: float32, the plain for-loop AdamW, out-of-place ReLU after instance norm (no CopySlices
in backward), channels_last_3d.
A script, not a timed test: compare ratios measured in one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

SHAPE = (96, 96, 64)
BATCH, CLASSES = 2, 7


def _medseg_step(
    precision: str, fused: bool = True, inplace_relu: bool | None = None, channels_last: bool = False
):
    import torch

    from medseg.config import load_config
    from medseg.engine.step import train_step, training_precision
    from medseg.engine.trainer import build_optimizer
    from medseg.losses import build_loss
    from medseg.nets.registry import build_network

    cfg = load_config(None, [f"train.precision={precision}"])
    model = build_network(cfg.model, 1, CLASSES).train()
    for module in model.modules() if inplace_relu is not None else ():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = inplace_relu
    loss_fn = build_loss(cfg, CLASSES)
    optimizer, _ = build_optimizer(cfg, model, total_iters=1000)
    if not fused:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
    resolved = training_precision(cfg.train.precision, torch.device("cpu"), model, 1, SHAPE)
    scaler = torch.amp.GradScaler("cpu", enabled=resolved.scaled)
    image, label = _batch()
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        image = image.contiguous(memory_format=torch.channels_last_3d)
    return lambda: train_step(model, loss_fn, optimizer, scaler, image, label, resolved), resolved.name


def _monai_step(bf16: bool):
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import AttentionUnet

    model = AttentionUnet(
        spatial_dims=3,
        in_channels=1,
        out_channels=CLASSES,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
    ).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    image, label = _batch()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(image)
        loss = loss_fn(logits.float(), label)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _batch():
    import torch

    gen = torch.Generator().manual_seed(0)
    image = torch.randn(BATCH, 1, *SHAPE, generator=gen)
    label = torch.randint(0, CLASSES, (BATCH, 1, *SHAPE), generator=gen)
    return image, label


def _gflop(step: Callable) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def run(contestants: dict[str, Callable], warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each contestant, timed in alternating rounds after ``warmup`` steps each."""
    for step in contestants.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(steps):
        for name, step in contestants.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contestant (median reported)")
    parser.add_argument("--precision", default="auto", help="medseg's train.precision: auto | fp32 | bf16")
    parser.add_argument("--monai-bf16", action="store_true", help="also MONAI's network under bf16 autocast")
    parser.add_argument(
        "--ablations", action="store_true", help="also medseg variants (see module docstring)"
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    medseg_step, resolved = _medseg_step(args.precision)
    contestants = {f"medseg ({resolved})": medseg_step, "MONAI (fp32)": _monai_step(bf16=False)}
    if args.monai_bf16:
        contestants["MONAI (bf16 autocast)"] = _monai_step(bf16=True)
    if args.ablations:
        contestants |= {
            "medseg fp32": _medseg_step("fp32")[0],
            f"medseg {resolved}, for-loop AdamW": _medseg_step(args.precision, fused=False)[0],
            f"medseg {resolved}, out-of-place ReLU": _medseg_step(args.precision, inplace_relu=False)[0],
            f"medseg {resolved}, channels_last_3d": _medseg_step(args.precision, channels_last=True)[0],
        }
    print(
        f"one training step: batch {BATCH}, {'×'.join(map(str, SHAPE))}, {CLASSES} classes, "
        f"{args.threads} threads, median of {args.steps} alternating rounds after {args.warmup} warm-up steps"
    )
    flops = {name: _gflop(step) for name, step in contestants.items()}
    times = run(contestants, args.warmup, args.steps)
    monai = statistics.median(times["MONAI (fp32)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:36s} {median:7.2f} s/step  ({min(values):.2f}–{max(values):.2f})  "
            f"{flops[name]:6.0f} GFLOP/step  {median / monai:5.2f}× MONAI's time"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
