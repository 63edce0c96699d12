"""Segmentation metrics with the semantics of the literature: Dice, IoU, HD95, ASSD, NSD, volumes.

Definitions and the empty-mask policy: :mod:`medseg.metrics.pair`; surface distances:
:mod:`medseg.metrics.surface` (nearest-corner search: :mod:`medseg.metrics.nearest`); overlap counts: :mod:`medseg.metrics.overlap`; per-label summaries:
:mod:`medseg.metrics.summary`.
"""

from __future__ import annotations

from medseg.metrics.overlap import dice_per_label
from medseg.metrics.pair import METRIC_KEYS, check_label_map, evaluate_pair, surface_metrics
from medseg.metrics.summary import image_diagonal_mm, summarize
from medseg.metrics.surface import SurfaceDistances, compute_surface_distances

__all__ = [
    "METRIC_KEYS",
    "SurfaceDistances",
    "check_label_map",
    "compute_surface_distances",
    "dice_per_label",
    "evaluate_pair",
    "image_diagonal_mm",
    "summarize",
    "surface_metrics",
]
