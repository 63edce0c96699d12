"""Several checkpoints as one predictor: what they must share to be averaged.

A fold ensemble averages class probabilities voxel by voxel on one model grid, so every checkpoint must
preprocess a scan identically and mean the same thing by each channel: equal label names and indices, and
equal plan entries :data:`SHARED_PLAN_KEYS` (orientation, spacing, intensity normalisation, body crop, input
channels). The networks may differ (architecture, patch size); ``mirror_axes`` may differ too (the mirrored
passes use the axes all of them allow). Folds trained with ``preprocess.spacing: auto`` or z-score intensity
get their own plan from their own training split and may therefore differ: train folds with an explicit
spacing and the window intensity mode to ensemble them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from medseg.io import InputError
from medseg.io.plan import Plan

#: Plan entries that decide the model grid and the network's input: equal in every member of an ensemble.
SHARED_PLAN_KEYS = ("orientation", "spacing", "intensity", "crop_foreground", "in_channels")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return bool(np.isclose(float(a), float(b), rtol=1e-9, atol=0.0))
    return a == b


def _label_difference(a: Mapping[str, int], b: Mapping[str, int]) -> str:
    only_a = sorted(set(a.items()) - set(b.items()), key=lambda kv: kv[1])
    only_b = sorted(set(b.items()) - set(a.items()), key=lambda kv: kv[1])
    show = lambda items: ", ".join(f"{k}={v}" for k, v in items[:4]) + (" …" if len(items) > 4 else "")  # noqa: E731
    return f"label names differ ({show(only_a) or 'nothing'} vs {show(only_b) or 'nothing'})"


def ensemble_mismatch(first: Mapping[str, Any], other: Mapping[str, Any]) -> str | None:
    """What keeps two loaded checkpoints from being averaged (labels or a :data:`SHARED_PLAN_KEYS` entry),
    as a phrase, or None when they can be. ``first``/``other``: ``{"labels": mapping, "plan": Plan}``; a plan
    that lacks an entry has the :class:`~medseg.io.plan.Plan` default."""
    labels_a = {str(k): int(v) for k, v in first["labels"].items()}
    labels_b = {str(k): int(v) for k, v in other["labels"].items()}
    if labels_a != labels_b:
        return _label_difference(labels_a, labels_b)
    plan_a, plan_b = first["plan"].to_dict(), other["plan"].to_dict()  # shown as in plan.json
    for key in SHARED_PLAN_KEYS:
        value_a, value_b = plan_a[key], plan_b[key]
        if not _same(value_a, value_b):
            return f"plans differ in {key} ({value_a!r} vs {value_b!r})"
    return None


def check_ensemble(checkpoints: list[tuple[str | os.PathLike, Mapping[str, Any]]]) -> None:
    """Raise :class:`InputError` naming both files and the difference when any checkpoint differs from the
    first, e.g. ``a.pt and b.pt cannot be averaged: plans differ in spacing ([1.5, 1.5, 1.5] vs [2.0, 2.0,
    2.0]); an ensemble needs the same labels and preprocessing plan``."""
    first_path, first = checkpoints[0]
    for path, ckpt in checkpoints[1:]:
        why = ensemble_mismatch(first, ckpt)
        if why:
            raise InputError(
                f"{first_path} and {path} cannot be averaged: {why}; an ensemble needs the same labels and "
                "preprocessing plan"
            )


def check_single_channel(plan: Plan, checkpoint: str | os.PathLike, source: object = None) -> None:
    """Refuse, in one line, to segment one scan with a model trained on several input channels.

    A model trained on an nnU-Net dataset with ``k`` channels (``_0000`` … files per case) needs ``k``
    co-registered images per case; ``medseg segment`` reads one image per case, so it segments single-channel
    models only.

    Raises:
        InputError: naming the input (when given), the checkpoint and its channels.
    """
    k = plan.in_channels
    if k == 1:
        return
    names = ", ".join(plan.channels())
    if isinstance(source, str | os.PathLike):
        where = f"{source}: "
    elif source is not None:
        where = f"{source.get_filename() or 'image'}: " if hasattr(source, "get_filename") else "image: "
    else:
        where = ""
    raise InputError(
        f"{where}{checkpoint} was trained on {k} input channels ({names}), one image file per channel; "
        "medseg segment reads one image per case and segments single-channel models only"
    )
