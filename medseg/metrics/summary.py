"""Per-label summaries of per-case metrics that never drop a missed structure silently.

A per-case table may hold ``inf`` for HD95 / ASSD (exactly one of prediction and reference empty). Averaging
only the finite values hides such failures — the known flaw of reporting MONAI's percentile Hausdorff
distance with ``nan``/``inf`` filtered out. So each label's summary gives, for every metric:

* ``mean``, ``median``, ``std`` (population, ddof=0) over the **finite** values and ``n_finite``;
* for the distance metrics, ``worst_mean`` / ``worst_median`` / ``worst_std`` where each ``inf`` is replaced
  by the diagonal of that case's image in mm (the largest distance possible inside the image),

and per label ``n_cases``, ``n_missed`` (reference non-empty, prediction empty) and ``n_spurious``
(prediction non-empty, reference empty).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["DISTANCE_METRICS", "SUMMARY_METRICS", "image_diagonal_mm", "summarize"]

SUMMARY_METRICS = ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd", "vol_pred_ml", "vol_ref_ml")
DISTANCE_METRICS = ("hd95", "assd")


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of an image of ``shape`` voxels of size ``spacing`` mm."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def _stats(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "n_finite": 0}
    return {
        "mean": float(np.mean(finite)),
        "median": float(np.median(finite)),
        "std": float(np.std(finite)),
        "n_finite": int(finite.size),
    }


def summarize(
    rows: Iterable[Mapping],
    metrics: Sequence[str] = SUMMARY_METRICS,
    diagonal_mm: float | None = None,
) -> dict[int, dict]:
    """Summarise per-case rows label by label.

    Args:
        rows: one mapping per (case, label) with at least ``label``, the ``metrics`` keys, ``vol_pred_ml``
            and ``vol_ref_ml``; optionally ``diagonal_mm`` (the case's image diagonal, used for the
            worst-case variant of the distance metrics).
        metrics: metric keys to summarise; missing keys are skipped.
        diagonal_mm: diagonal used for rows without their own ``diagonal_mm``. If neither is known, the
            worst-case statistics of a label with an ``inf`` are ``inf``.

    Returns:
        ``{label: {"n_cases", "n_missed", "n_spurious", metric: {"mean", "median", "std", "n_finite",
        ["worst_mean", "worst_median", "worst_std"]}}}``, labels sorted.
    """
    by_label: dict[int, list[Mapping]] = {}
    for row in rows:
        by_label.setdefault(int(row["label"]), []).append(row)
    out: dict[int, dict] = {}
    for label in sorted(by_label):
        group = by_label[label]
        vp = np.array([float(r.get("vol_pred_ml", math.nan)) for r in group])
        vr = np.array([float(r.get("vol_ref_ml", math.nan)) for r in group])
        entry: dict = {
            "n_cases": len(group),
            "n_missed": int(np.sum((vr > 0) & (vp == 0))),
            "n_spurious": int(np.sum((vp > 0) & (vr == 0))),
        }
        for metric in metrics:
            if not all(metric in r for r in group):
                continue
            values = np.array([float(r[metric]) for r in group])
            stats = _stats(values)
            if metric in DISTANCE_METRICS:
                diag = np.array([float(r.get("diagonal_mm", diagonal_mm or math.inf)) for r in group])
                worst = np.where(np.isinf(values), diag, values)
                worst = worst[~np.isnan(worst)]
                if worst.size:
                    stats.update(
                        worst_mean=float(np.mean(worst)),
                        worst_median=float(np.median(worst)),
                        worst_std=float(np.std(worst)) if np.all(np.isfinite(worst)) else math.inf,
                    )
                else:
                    stats.update(worst_mean=math.nan, worst_median=math.nan, worst_std=math.nan)
            entry[metric] = stats
        out[label] = entry
    return out
