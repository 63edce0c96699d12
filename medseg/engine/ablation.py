"""Ablation of the attention variants as an experiment: every variant × several seeds, same phantoms, same
budget, same held-out cases; results stored per run, so a long ablation continues where it stopped.

Each variant is a recipe ``configs/variants/<name>.yaml``; the shared budget is ``configs/ablation/base.yaml``
(applied after the variant, so every variant trains with the same patch, sampling, width and iterations).
For each ``(variant, seed)`` :func:`run_ablation` trains with ``train.seed = seed`` (initialisation, data order
and validation split), segments the held-out phantoms, scores every organ per case
(:func:`medseg.evaluation.evaluate_held_out`), measures, for gated networks, where the attention gates look
(:func:`attention_focus_of_run`) and stores it all in ``results/<variant>__s<seed>.json`` (atomic). The cost
of each variant (parameters, GFLOPs, CPU time and peak memory of one forward pass) is measured once
(:func:`medseg.engine.cost.measure_cost`). :func:`medseg.engine.ablation_report.write_report` turns the stored
results into ``ablation.md`` and CSV tables: mean ± std over seeds and paired differences with bootstrap
confidence intervals (:mod:`medseg.evaluation.paired`).

Resumable and parallel-safe: a finished run is never repeated; a run in progress holds
``locks/<variant>__s<seed>.lock`` (created exclusively, holding its PID), so a second ``medseg ablate`` on the
same folder takes the next free run; a lock whose process is gone is taken over, and an interrupted run
resumes from its ``last.pt`` (:func:`medseg.engine.train` with ``resume``). The phantoms are written once
(``kind``: ``standard`` or ``hard``, :mod:`medseg.data.phantoms`) and recorded in ``ablation.json``; an
ablation folder holds one kind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.batch.run import segment_inputs
from medseg.config import ConfigError, load_config, recipe_path
from medseg.config.segment import SegmentOptions
from medseg.data.phantoms import write_msd_dataset
from medseg.engine.cost import measure_cost
from medseg.engine.trainer import train
from medseg.evaluation import evaluate_held_out
from medseg.evaluation.attention_focus import alpha_focus
from medseg.inference.attention import attention_maps
from medseg.inference.predictor import Predictor
from medseg.io import atomic_write_text, read_label_names

#: Variants run when none are named, in table order (``ag_scale_average`` on request).
DEFAULT_VARIANTS = (
    "unet",
    "attention_unet",
    "ag_pam",
    "ag_cam",
    "ag_dual",
    "ag_ema",
    "ag_psa",
    "ag_fpa",
    "ag_encoding",
    "ag_gau",
    "ag_reverse",
    "ag_scale_attention",
)
#: Seeds run when none are named (the demo's and two more).
DEFAULT_SEEDS = (0, 7, 11)
#: Seed of the phantom generator: the same cases for every variant and seed.
PHANTOM_SEED = 2027
#: Margin (voxels) around each organ's bounding box for the α concentration.
FOCUS_MARGIN = 3


def variant_config(name: str, overrides: Sequence[str] = ()):
    """The checked config of one variant: ``variants/<name>.yaml`` ← ``ablation/base.yaml`` ← overrides."""
    return load_config([recipe_path(f"variants/{name}"), recipe_path("ablation/base")], list(overrides))


def run_name(variant: str, seed: int) -> str:
    return f"{variant}__s{seed}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_lock(path: Path) -> bool:
    """Create ``path`` exclusively with this PID; take over a lock whose process is gone. False if held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            path.unlink(missing_ok=True)  # stale: its process is gone (or it never wrote its PID)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


@dataclass(frozen=True)
class AblationPhantoms:
    """The phantoms of an ablation folder: kind (``standard`` | ``hard``), training and held-out cases, grid."""

    kind: str = "standard"
    train_cases: int = 30
    test_cases: int = 4
    shape: tuple[int, int, int] = (96, 96, 40)


def _settings(out: Path, phantoms: AblationPhantoms, overrides: Sequence[str]) -> dict:
    wanted = {
        "kind": phantoms.kind,
        "train_cases": phantoms.train_cases,
        "test_cases": phantoms.test_cases,
        "shape": list(phantoms.shape),
        "phantom_seed": PHANTOM_SEED,
        "overrides": list(overrides),
    }
    path = out / "ablation.json"
    if path.exists():
        held = json.loads(path.read_text())
        if held != wanted:
            raise ConfigError(
                f"{out} holds an ablation of {held}, not {wanted}: use another --out for other phantoms or budget"
            )
    return wanted


def prepare_data(out: Path, phantoms: AblationPhantoms, overrides: Sequence[str] = ()) -> Path:
    """The phantoms of this ablation folder, written once (under a lock, into a temporary folder that is
    renamed when complete)."""
    settings = _settings(out, phantoms, overrides)
    data = out / "data"
    lock = out / "locks" / "data.lock"
    while not (data / "dataset.json").exists():
        if take_lock(lock):
            try:
                if not (data / "dataset.json").exists():
                    for stale in out.glob(".data.tmp*"):  # a killed writer's; we hold the lock
                        shutil.rmtree(stale, ignore_errors=True)
                    tmp = out / f".data.tmp{os.getpid()}"
                    write_msd_dataset(
                        tmp,
                        phantoms.train_cases,
                        phantoms.test_cases,
                        shape=phantoms.shape,
                        seed=PHANTOM_SEED,
                        kind=phantoms.kind,
                    )
                    os.replace(tmp, data)
                    atomic_write_text(out / "ablation.json", json.dumps(settings, indent=2))
            finally:
                lock.unlink(missing_ok=True)
        else:
            time.sleep(1.0)
    return data


def case_scores(eval_csv: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{case: {organ: {"dice", "nsd", "hd95"}}}`` from an evaluation CSV (:func:`evaluate_held_out`)."""
    scores: dict[str, dict[str, dict[str, float]]] = {}
    with eval_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            scores.setdefault(row["case"], {})[row["name"]] = {
                key: float(row[key]) if row[key] not in ("", None) else float("nan")
                for key in ("dice", "nsd", "hd95")
            }
    return scores


def attention_focus_of_run(best: Path, data: Path) -> dict:
    """Per gated level, averaged over the held-out cases: α's normalised entropy and, per organ, the α mass
    fraction inside the organ's box (dilated by :data:`FOCUS_MARGIN` voxels) and its concentration (mass
    fraction / volume fraction; 1 = no preference). Measured on the scan grid, inside the body crop (the
    voxels the network saw). ``{}`` for a network without grid gates."""
    predictor = Predictor(best, device="cpu")
    organs = {name: index for name, index in read_label_names(data / "dataset.json").items() if index > 0}
    per_level: dict[str, list[dict]] = {}
    for image_path in sorted((data / "imagesTs").glob("*.nii.gz")):
        image = nib.load(image_path)
        maps = attention_maps(predictor, image)
        if not maps:
            return {}
        label = np.asarray(nib.load(data / "labelsTs" / image_path.name).dataobj).astype(np.int16)
        for level, alpha_img in maps.items():
            alpha = np.asarray(alpha_img.dataobj, dtype=np.float32)
            inside = np.nonzero(alpha > 0)
            if not inside[0].size:
                continue
            box = tuple(slice(int(ax.min()), int(ax.max()) + 1) for ax in inside)  # the body crop
            per_level.setdefault(level, []).append(alpha_focus(alpha[box], label[box], organs, FOCUS_MARGIN))
    return {level: _average_focus(items) for level, items in per_level.items()}


def _average_focus(items: list[dict]) -> dict:
    organs = items[0]["organs"]
    return {
        "entropy": float(np.nanmean([i["entropy"] for i in items])),
        "organs": {
            organ: {
                key: float(np.nanmean([i["organs"][organ][key] for i in items]))
                for key in ("mass_fraction", "volume_fraction", "concentration")
            }
            for organ in organs
        },
    }


def variant_cost(out: Path, name: str, cfg, num_classes: int, size: int) -> dict:
    """The variant's cost, measured once per ablation folder (``costs/<variant>.json``)."""
    path = out / "costs" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    cost = measure_cost(cfg.model, num_classes, size=size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**cost, "size": size}, indent=2))
    return cost


def run_one(out: Path, data: Path, name: str, seed: int, cfg, cost_size: int) -> dict:
    """Train, segment, score, measure α focus and cost of one ``(variant, seed)``; store and return it."""
    run = Path(cfg.train.output)
    resume = (run / "last.pt").exists()
    cpu0, t0 = time.process_time(), time.monotonic()
    train(cfg, resume=resume, log=lambda *_: None)
    train_s, train_cpu_s = time.monotonic() - t0, time.process_time() - cpu0
    segment_inputs(
        data / "imagesTs", run / "pred", run / "best.pt", SegmentOptions(device="cpu"), log=lambda *_: None
    )
    evaluate_held_out(run / "pred", data, run / "eval.csv")
    num_classes = len(read_label_names(data / "dataset.json"))
    result = {
        "variant": name,
        "seed": seed,
        "cases": case_scores(run / "eval.csv"),
        "attention": attention_focus_of_run(run / "best.pt", data),
        "cost": variant_cost(out, name, cfg, num_classes, cost_size),
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "resumed": resume,
    }
    path = out / "results" / f"{run_name(name, seed)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def run_ablation(
    out: str | os.PathLike,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    phantoms: AblationPhantoms = AblationPhantoms(),
    extra_overrides: Sequence[str] = (),
    cost_size: int = 96,
    log: Callable[[str], object] = print,
) -> list[dict]:
    """Run every missing ``(variant, seed)`` not held by another process; write the report; return the
    results stored for the chosen variants and seeds (module docstring).

    Every config is loaded (and so checked) before anything is written or trained.
    """
    from medseg.engine.ablation_report import write_report

    out = Path(out)
    names = list(variants or DEFAULT_VARIANTS)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("ablation: no seeds")
    data = out / "data"
    configs = {
        (name, seed): variant_config(
            name,
            [
                *extra_overrides,
                f"data.root={data}",
                f"train.output={out / 'runs' / name / f's{seed}'}",
                f"train.seed={seed}",
            ],
        )
        for name in names
        for seed in seeds
    }
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(out, phantoms, extra_overrides)
    report_current = False
    for (name, seed), cfg in configs.items():
        key = run_name(name, seed)
        if (out / "results" / f"{key}.json").exists():
            continue
        lock = out / "locks" / f"{key}.lock"
        if not take_lock(lock):
            log(f"{key:<28} running in another process (lock {lock}); skipped")
            continue
        try:
            if (out / "results" / f"{key}.json").exists():  # finished by another process meanwhile
                continue
            result = run_one(out, data, name, seed, cfg, cost_size)
        finally:
            lock.unlink(missing_ok=True)
        dice = _mean_dice(result)
        log(
            f"{key:<28} mean Dice {np.nanmean(list(dice.values())):.3f}  pancreas {dice.get('pancreas', np.nan):.3f}"
            f"  train {result['train_s']:.0f} s"
        )
        write_report(out)  # after each run: the tables of a long ablation stay current
        report_current = True
    if not report_current:
        write_report(out)
    wanted = {run_name(n, s) for n in names for s in seeds}
    return [r for r in load_results(out) if run_name(r["variant"], r["seed"]) in wanted]


def _mean_dice(result: dict) -> dict[str, float]:
    organs = {organ for scores in result["cases"].values() for organ in scores}
    return {
        organ: float(np.nanmean([s[organ]["dice"] for s in result["cases"].values() if organ in s]))
        for organ in sorted(organs)
    }


def load_results(out: str | os.PathLike) -> list[dict]:
    """Every stored run result of an ablation folder (unreadable files are named and skipped)."""
    results = []
    for path in sorted((Path(out) / "results").glob("*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            warnings.warn(f"{path}: unreadable result ({exc}); remove it to run it again", stacklevel=2)
    return results


def remeasure_costs(
    out: str | os.PathLike, cost_size: int = 96, log: Callable[[str], object] = print
) -> None:
    """Re-measure every variant's cost (e.g. on a quiet machine), store it in the results, rewrite the report."""
    from medseg.engine.ablation_report import write_report

    out = Path(out)
    num_classes = len(read_label_names(out / "data" / "dataset.json"))
    costs = {}
    for path in sorted((out / "results").glob("*.json")):
        result = json.loads(path.read_text())
        name = result["variant"]
        if name not in costs:
            (out / "costs" / f"{name}.json").unlink(missing_ok=True)
            costs[name] = variant_cost(out, name, variant_config(name), num_classes, cost_size)
            cost = costs[name]
            log(f"{name:<20} {cost['gflops']:.1f} GFLOPs  {cost['ms']:.0f} ms  {cost['peak_mb']:.0f} MB")
        result["cost"] = costs[name]
        atomic_write_text(path, json.dumps(result, indent=1))
    write_report(out)
