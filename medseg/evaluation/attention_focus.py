"""Where a gated network's attention goes: α mass near each organ, and how spread out α is.

A grid attention gate (Oktay et al. 2018, Eq. 2; :mod:`medseg.nets.blocks.grid_attention`) gives each skip
level a coefficient map ``α ∈ [0, 1]``. To ask whether a gate "looks at" an organ, treat ``α`` as a mass
over the voxels and measure, for each organ, with :func:`alpha_focus`:

* ``mass_fraction`` — ``Σ α inside box / Σ α``, where *box* is the organ's bounding box in the reference
  label map dilated by ``margin_vox`` voxels on every side (clipped to the volume);
* ``volume_fraction`` — ``box voxels / all voxels``: the mass fraction a uniform α would give;
* ``concentration`` — ``mass_fraction / volume_fraction``: 1 for attention that ignores the organ, above 1
  where α concentrates on it (at most ``1 / volume_fraction``, all the mass in the box);

and once per map the normalised entropy of ``p = α / Σ α`` over the ``N`` voxels,
``H(p) / log N = −Σ p log p / log N`` (``0 log 0 = 0``): 1 for a uniform α, ``log k / log N`` for α constant
on ``k`` voxels and 0 elsewhere, 0 for all mass on one voxel.

Every voxel of the map counts in ``N`` and in the box fractions, including voxels outside the body where
:func:`medseg.inference.attention.attention_maps` writes α = 0: crop α and label to the same region first
to measure inside it. The box is a box, not the organ: a margin of a few voxels forgives boundary blur of
the coarse gates (level ``l`` is ``2^(l−1)`` voxels coarse), and a small organ's box is what matters for a
small organ like the pancreas.

α on a coarser grid than the label (a gate's own skip grid) is brought to the label's shape by
:func:`resize_alpha`; both arrays must cover the same field of view.

>>> import numpy as np
>>> label = np.zeros((8, 8, 8), np.uint8); label[2:4, 2:4, 2:4] = 1
>>> alpha = np.zeros((8, 8, 8)); alpha[2:4, 2:4, 2:4] = 1.0
>>> focus = alpha_focus(alpha, label, {"organ": 1}, margin_vox=0)
>>> focus["organs"]["organ"]["mass_fraction"], focus["organs"]["organ"]["concentration"]
(1.0, 64.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.metrics.overlap import label_boxes


def resize_alpha(alpha: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``alpha`` resampled to ``shape`` (float64, clipped to [0, 1]); returned unchanged in value when the
    shapes agree.

    Linear interpolation (``scipy.ndimage.zoom``, ``order=1``) with voxels as cells (``grid_mode=True``: the
    outer voxel edges of both grids coincide, so coarse voxel ``i`` is centred on the fine voxels it covers)
    and edge values repeated (``mode="nearest"``). For whole-number factors this is the trilinear
    ``align_corners=False`` upsampling of :func:`medseg.inference.attention.upsample_alpha` — the one the
    gates themselves use — to float32 precision.
    """
    values = np.asarray(alpha, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    if values.ndim != len(shape):
        raise ValueError(f"alpha has {values.ndim} axes, the target shape {shape} has {len(shape)}")
    if values.shape == shape:
        return values
    if min(values.shape) == 0 or min(shape) == 0:
        raise ValueError(f"cannot resize alpha of shape {values.shape} to {shape}: an axis is empty")
    factors = [want / have for want, have in zip(shape, values.shape, strict=True)]
    out = ndimage.zoom(values, factors, order=1, grid_mode=True, mode="nearest")
    if out.shape != shape:  # zoom rounds the output size; guard against an off-by-one
        raise ValueError(f"resizing alpha {values.shape} → {shape} gave {out.shape}")
    return np.clip(out, 0.0, 1.0)


def normalized_entropy(alpha: np.ndarray) -> float:
    """``H(α / Σα) / log N`` over all ``N`` voxels (module docstring); NaN when ``Σα = 0`` or ``N < 2``."""
    values = np.asarray(alpha, dtype=np.float64).ravel()
    total = float(values.sum())
    if values.size < 2 or not total > 0.0:
        return math.nan
    p = values[values > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(values.size))


def _margins(margin_vox: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    margins = (margin_vox,) * ndim if np.isscalar(margin_vox) else tuple(margin_vox)
    if len(margins) != ndim or any(int(m) != m or m < 0 for m in margins):
        raise ValueError(f"margin_vox must be one or {ndim} non-negative integers, found {margin_vox!r}")
    return tuple(int(m) for m in margins)


def _organ_items(organs: Mapping[str, int] | Iterable[int]) -> list[tuple[Any, int]]:
    items = list(organs.items()) if isinstance(organs, Mapping) else [(int(o), int(o)) for o in organs]
    bad = [name for name, value in items if int(value) != value or value < 1]
    if bad:
        raise ValueError(f"organ labels must be integers ≥ 1 (0 is background); check {bad}")
    return [(name, int(value)) for name, value in items]


def alpha_focus(
    alpha: np.ndarray,
    label: np.ndarray,
    organs: Mapping[str, int] | Iterable[int],
    margin_vox: int | Sequence[int] = 4,
) -> dict[str, Any]:
    """α mass inside each organ's dilated bounding box, against a uniform α, and α's normalised entropy.

    Args:
        alpha: one gate's coefficient map, values in [0, 1], on the label's grid or on a coarser grid of the
            same field of view (then resized by :func:`resize_alpha`).
        label: integer label map (0 background), e.g. the reference segmentation of the case.
        organs: ``{name: label value}``, or label values (then the values are the keys of the result).
        margin_vox: voxels added to each side of an organ's box: one number or one per axis.

    Returns:
        ``{"mass": Σα, "entropy": normalised entropy, "organs": {name: {"mass_fraction",
        "volume_fraction", "concentration"}}}`` (definitions in the module docstring). An organ absent from
        ``label`` gets NaN for all three; ``Σα = 0`` gives NaN mass fractions, concentrations and entropy.
    """
    labels = np.asarray(label)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"label must be an integer label map, found dtype {labels.dtype}")
    values = resize_alpha(alpha, labels.shape)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0.0):
        raise ValueError("alpha must be finite and non-negative (gate coefficients lie in [0, 1])")
    margins = _margins(margin_vox, labels.ndim)
    items = _organ_items(organs)
    total = float(values.sum())
    boxes = label_boxes(labels, max((v for _, v in items), default=0))
    result: dict[str, Any] = {"mass": total, "entropy": normalized_entropy(values), "organs": {}}
    for name, value in items:
        box = boxes[value - 1]
        if box is None:
            result["organs"][name] = dict.fromkeys(
                ("mass_fraction", "volume_fraction", "concentration"), math.nan
            )
            continue
        grown = tuple(
            slice(max(0, s.start - m), min(n, s.stop + m))
            for s, m, n in zip(box, margins, labels.shape, strict=True)
        )
        volume_fraction = math.prod(s.stop - s.start for s in grown) / labels.size
        mass_fraction = float(values[grown].sum()) / total if total > 0.0 else math.nan
        result["organs"][name] = {
            "mass_fraction": mass_fraction,
            "volume_fraction": volume_fraction,
            "concentration": mass_fraction / volume_fraction,
        }
    return result
