"""Per-epoch metrics: ``metrics.csv`` (rewritten atomically each epoch) and the ``curves.png`` plot."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from medseg.io import atomic_path, atomic_write_text


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def append_metrics(path: str | Path, row: dict) -> None:
    """Append one epoch's row; columns are the union over rows (validation columns appear when validated).

    A resumed run replaces rows of epochs it repeats, so the file always has one row per epoch.
    """
    rows = [r for r in read_metrics(path) if int(r["epoch"]) < int(row["epoch"])]
    rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_curves(metrics_csv: str | Path, png: str | Path) -> None:
    """Training loss and validation Dice (mean and per label) against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    if not rows:
        return

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
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
