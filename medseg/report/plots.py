"""Figures: metric box plots of an evaluation and the loss / validation-Dice curves of a training run.

matplotlib with the Agg backend (no display needed); every PNG is written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from medseg.io import atomic_path
from medseg.report.tables import read_history

#: Metrics drawn by :func:`box_plots`, one figure each.
PLOT_METRICS = ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int) -> None:
    """Save a figure as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def box_plots(stem: str | os.PathLike, rows: list[dict], names: dict[int, str]) -> list[Path]:
    """One box plot per metric, ``<stem>_<metric>.png``: one box per label over cases (finite values; the
    number of ``inf`` values is written under the label)."""
    plt = pyplot()
    stem = Path(stem)
    labels = sorted({r["label"] for r in rows})
    written = []
    for metric in PLOT_METRICS:
        data, ticks = [], []
        for label in labels:
            values = np.array([r[metric] for r in rows if r["label"] == label], dtype=float)
            finite = values[np.isfinite(values)]
            data.append(finite if finite.size else np.array([np.nan]))
            tick = names.get(label) or str(label)
            n_inf = int(np.sum(np.isinf(values)))
            ticks.append(f"{tick}\n({n_inf} inf)" if n_inf else tick)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 2), 4))
        ax.boxplot(data)
        ax.set_xticks(range(1, len(labels) + 1), ticks, rotation=45 if len(labels) > 8 else 0)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per label ({len({r['case'] for r in rows})} cases)")
        fig.tight_layout()
        target = stem.with_name(f"{stem.name}_{metric}.png")
        save_png(fig, target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def training_curves(metrics_csv: str | os.PathLike, png: str | os.PathLike) -> None:
    """Training loss and validation Dice (mean and per label) against epoch, from ``metrics.csv``."""
    rows = read_history(metrics_csv)
    if not rows:
        return
    plt = pyplot()

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        pts = [(e, v) for e, v in pts if math.isfinite(v)]
        return [e for e, _ in pts], [v for _, v in pts]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(*series("train_loss"), label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_title("loss")
    dice_keys = [k for k in rows[-1] if k.startswith("val_dice_")]
    for key in dice_keys:
        ax2.plot(*series(key), label=key.removeprefix("val_dice_"), alpha=0.6, marker=".")
    ax2.plot(*series("val_dice"), label="mean", color="black", linewidth=2, marker="o")
    ax2.set_xlabel("epoch")
    ax2.set_title("validation Dice")
    ax2.set_ylim(0, 1)
    if dice_keys:
        ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, Path(png), dpi=90)
    plt.close(fig)
