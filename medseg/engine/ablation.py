"""Ablation of the attention variants: same phantoms, same budget and seed for every variant; one table.

Each variant is a recipe ``configs/variants/<name>.yaml``; the shared budget is ``configs/ablation/base.yaml``
(applied after the variant, so every variant trains with the same patch, width and iterations). For each
variant :func:`run_ablation` trains, segments the held-out phantoms, evaluates them
(:func:`medseg.evaluation.evaluate_held_out`) and measures cost (:func:`medseg.engine.cost.measure_cost`). The
table goes to ``<out>/ablation.md`` and ``<out>/ablation.csv``; re-running some variants replaces their rows
and keeps the others.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from medseg.batch.run import segment_inputs
from medseg.config import checkpoint_config, load_config, recipe_path
from medseg.config.segment import SegmentOptions
from medseg.data.phantoms import write_msd_dataset
from medseg.engine.cost import measure_cost
from medseg.engine.trainer import train
from medseg.evaluation import evaluate_held_out, summary_table
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


def variant_config(name: str, overrides: Sequence[str] = ()):
    """The checked config of one variant: ``variants/<name>.yaml`` ← ``ablation/base.yaml`` ← overrides."""
    return load_config([recipe_path(f"variants/{name}"), recipe_path("ablation/base")], list(overrides))


def run_ablation(
    out: str | os.PathLike,
    variants: Sequence[str] | None = None,
    train_cases: int = 10,
    test_cases: int = 4,
    shape: tuple[int, int, int] = (96, 96, 40),
    extra_overrides: Sequence[str] = (),
    cost_size: int = 96,
    log: Callable[[str], object] = print,
) -> list[dict]:
    """Train/evaluate/measure each variant; write ``ablation.md`` and ``ablation.csv``; return the rows.

    Every variant's config is loaded (and so checked) before the first one trains.
    """
    out = Path(out)
    data = out / "data"
    names = list(variants or DEFAULT_VARIANTS)
    configs = {
        name: variant_config(
            name, [*extra_overrides, f"data.root={data}", f"train.output={out / 'runs' / name}"]
        )
        for name in names
    }
    if not (data / "dataset.json").exists():
        write_msd_dataset(data, train_cases, test_cases, shape=shape, seed=2027)
    num_classes = len(read_label_names(data / "dataset.json"))
    done = {r["variant"]: r for r in read_rows(out)}
    rows = []
    for name, cfg in configs.items():
        run = Path(cfg.train.output)
        t0 = time.monotonic()
        train(cfg, log=lambda *_: None)
        train_s = time.monotonic() - t0
        cpu = SegmentOptions(device="cpu")
        segment_inputs(data / "imagesTs", run / "pred", run / "best.pt", cpu, log=lambda *_: None)
        table = summary_table(evaluate_held_out(run / "pred", data, run / "eval.csv"))
        dice = {organ: r["dice"] for organ, r in table.items()}
        cost = measure_cost(cfg.model, num_classes, size=cost_size)
        row = {
            "variant": name,
            **{f"dice_{k}": v for k, v in dice.items()},
            "dice_mean": sum(dice.values()) / len(dice),
            **_cost_columns(cost),
            "train_s": train_s,
        }
        rows.append(row)
        done[name] = row
        log(
            f"{name:<20} mean Dice {row['dice_mean']:.3f}  pancreas {dice.get('pancreas', float('nan')):.3f}  "
            f"{row['params_M']:.2f} M  {row['gflops_96']:.1f} GFLOPs  {row['cpu_ms_96']:.0f} ms  {row['peak_mb_96']:.0f} MB"
        )
        write_tables(out, list(done.values()))
    return rows


def _cost_columns(cost: dict) -> dict:
    return {
        "params_M": cost["params"] / 1e6,
        "gflops_96": cost["gflops"],
        "cpu_ms_96": cost["ms"],
        "peak_mb_96": cost["peak_mb"],
    }


def read_rows(out: str | os.PathLike) -> list[dict]:
    """Rows of an existing ``ablation.csv`` (empty when there is none)."""
    path = Path(out) / "ablation.csv"
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [{k: (v if k == "variant" else float(v)) for k, v in r.items()} for r in csv.DictReader(fh)]


def remeasure_costs(
    out: str | os.PathLike, cost_size: int = 96, log: Callable[[str], object] = print
) -> list[dict]:
    """Re-measure the cost columns of an existing ``ablation.csv`` (e.g. on a quiet machine) and rewrite it."""
    from medseg.io.checkpoint import load_checkpoint

    rows = read_rows(out)
    for row in rows:
        best = Path(out) / "runs" / row["variant"] / "best.pt"
        ckpt = load_checkpoint(best)
        cost = measure_cost(checkpoint_config(ckpt, best).model, len(ckpt["labels"]), size=cost_size)
        row.update(_cost_columns(cost))
        log(
            f"{row['variant']:<20} {cost['gflops']:.1f} GFLOPs  {cost['ms']:.0f} ms  {cost['peak_mb']:.0f} MB"
        )
    write_tables(Path(out), rows)
    return rows


def write_tables(out: Path, rows: list[dict]) -> None:
    """``ablation.csv`` (all columns) and ``ablation.md`` (rounded), rows in :data:`DEFAULT_VARIANTS` order."""
    order = {name: i for i, name in enumerate(DEFAULT_VARIANTS)}
    rows = sorted(rows, key=lambda r: (order.get(r["variant"], len(order)), r["variant"]))
    columns = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "ablation.csv", buf.getvalue())
    organ_cols = [c for c in columns if c.startswith("dice_") and c != "dice_mean"]
    head = [
        "variant",
        "mean Dice",
        *[c.removeprefix("dice_") for c in organ_cols],
        "params (M)",
        "GFLOPs/96³",
        "CPU ms/96³",
        "peak MB/96³",
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"],
            f"{r['dice_mean']:.3f}",
            *[f"{r[c]:.3f}" for c in organ_cols],
            f"{r['params_M']:.2f}",
            f"{r['gflops_96']:.1f}",
            f"{r['cpu_ms_96']:.0f}",
            f"{r['peak_mb_96']:.0f}",
            f"{r['train_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
