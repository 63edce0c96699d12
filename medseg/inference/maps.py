"""Voxel-wise maps besides the label map: softmax entropy, and any model-grid map restored to the input grid.

* :func:`entropy_map` — the Shannon entropy of the class probabilities per voxel, ``H = -Σ_k p_k log p_k``,
  divided by ``log K`` so that it lies in [0, 1] whatever the number of classes (0: one class has all the
  probability; 1: all ``K`` classes equally likely). The predictive entropy is the usual voxel-wise
  uncertainty of a softmax segmentation (e.g. Kendall & Gal, NeurIPS 2017, Sec. 2; Mehrtash et al., IEEE TMI
  2020, "Confidence calibration and predictive uncertainty estimation for deep medical image segmentation").
  Applied to probabilities averaged over mirrored passes or folds it also grows where they disagree.
* :func:`label_means` — the mean of a map inside each label: the per-organ number the QA flags
  (:func:`medseg.report.qa.qa_flags`, rule ``low_confidence``) read.
* :func:`restore_map` — continuous values ``(C, X, Y, Z)`` on the model grid → float32 on the input scan's
  grid, slab by slab, with the library's one resampler
  (:func:`medseg.transforms.resample.resample_to_reference`, bilinear) — the path the probabilities take in
  :func:`medseg.inference.restore.restore_labels`, keeping the values instead of their argmax. Input voxels
  the model grid does not reach (cropped away as air by the body crop) get 0.

Example (what the predictor does with its probabilities, one extra float32 map on the model grid):

>>> entropy = entropy_map(probs)                                               # doctest: +SKIP
>>> on_input = restore_map(entropy[None], model_affine, ref.affine, ref.shape)[0]  # doctest: +SKIP
>>> label_means(on_input, labels, {"liver": 1, "spleen": 2})                   # doctest: +SKIP
{'liver': 0.04, 'spleen': 0.11}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from medseg.inference.slabs import SLAB_VOXELS, slabs, source_window, translation
from medseg.transforms.resample import resample_to_reference


def entropy_map(probabilities: torch.Tensor | np.ndarray, normalise: bool = True) -> np.ndarray:
    """Voxel-wise softmax entropy of ``(K, ...)`` class probabilities, float32 of shape ``probabilities[0]``.

    Args:
        probabilities: class probabilities along axis 0 (each voxel sums to 1; e.g. the predictor's softmax).
        normalise: divide by ``log K`` so the result is in [0, 1] (the QA threshold then does not depend on
            the number of classes); ``False`` gives nats.

    ``0 log 0`` is taken as 0. Computed one class at a time (one float32 accumulator, no ``K``-sized
    temporary).

    Example:
        >>> p = np.array([[1.0, 0.5], [0.0, 0.5]])     # two classes, two voxels
        >>> entropy_map(p).tolist()
        [0.0, 1.0]
    """
    probs = torch.as_tensor(probabilities)
    if probs.ndim < 2:
        raise ValueError(f"expected (K, ...) class probabilities, got shape {tuple(probs.shape)}")
    k = int(probs.shape[0])
    out = torch.zeros(probs.shape[1:], dtype=torch.float32)
    for c in range(k):
        p = probs[c].to(torch.float32)
        out -= torch.xlogy(p, p)
    if normalise:
        out /= math.log(k) if k > 1 else 1.0
    return out.clamp_(min=0.0).numpy()


def label_means(
    values: np.ndarray, labels: np.ndarray, label_names: Mapping[str, int]
) -> dict[str, float | None]:
    """Mean of ``values`` inside each named non-background label (None for a label with no voxel).

    Raises:
        ValueError: ``values`` and ``labels`` differ in shape.
    """
    if values.shape != labels.shape:
        raise ValueError(f"map {values.shape} and label map {labels.shape} differ in shape")
    wanted = {str(n): int(i) for n, i in label_names.items() if int(i) > 0}
    if not wanted:
        return {}
    flat = labels.ravel().astype(np.int64, copy=False)
    size = max(max(wanted.values()), int(flat.max(initial=0))) + 1
    counts = np.bincount(flat, minlength=size)
    sums = np.bincount(flat, weights=values.ravel().astype(np.float64, copy=False), minlength=size)
    return {n: (float(sums[i] / counts[i]) if counts[i] else None) for n, i in wanted.items()}


def restore_map(
    values: torch.Tensor | np.ndarray,
    src_affine: np.ndarray | torch.Tensor,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    slab_voxels: int = SLAB_VOXELS,
) -> np.ndarray:
    """Continuous maps ``(C, X, Y, Z)`` on the model grid → float32 ``(C, *dst_shape)`` on the input grid.

    Bilinear resampling through the affines (patient space, any orientation), slab by slab along the input
    grid's last axis as in :func:`medseg.inference.restore.restore_labels`; input voxels outside the model
    grid are 0. Each slab is resampled from the crop of the model grid it reads
    (:func:`medseg.inference.slabs.slabs`), so memory follows the slab, not the volume.

    Args:
        values: float maps on the model grid, channel first.
        src_affine: the model grid's affine (the preprocessed image's ``MetaTensor.affine``).
        dst_affine, dst_shape: the input scan's affine and 3D shape.
        slab_voxels: input voxels per slab (the result does not depend on it).
    """
    src = torch.as_tensor(values).detach().cpu().float()
    if src.ndim != 4:
        raise ValueError(f"expected (C, X, Y, Z) maps, got shape {tuple(src.shape)}")
    src_affine = np.asarray(torch.as_tensor(src_affine, dtype=torch.float64).cpu())
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    dst_shape = tuple(int(s) for s in dst_shape)
    out = np.zeros((src.shape[0], *dst_shape), dtype=np.float32)
    box = source_window(dst_affine, dst_shape, src_affine, src.shape[1:])
    box_affine = dst_affine @ translation([b.start for b in box])
    box_shape = tuple(b.stop - b.start for b in box)
    target = out[(slice(None), *box)]
    for k0, k1, window, window_affine, slab_affine in slabs(
        src_affine, src.shape[1:], box_affine, box_shape, slab_voxels
    ):
        crop = src[(slice(None), *window)]
        restored = resample_to_reference(crop, window_affine, slab_affine, (*box_shape[:-1], k1 - k0))
        target[..., k0:k1] = restored.numpy()
    return out


def argmax_labels(probabilities: torch.Tensor) -> np.ndarray:
    """The label map of ``(K, ...)`` class probabilities (uint8 when K ≤ 256, else int32), for
    :func:`label_means` on the model grid."""
    # torch.max's indices: the first maximum, as argmax's, and several times faster over a leading class axis
    labels = torch.max(torch.as_tensor(probabilities), dim=0).indices
    return labels.to(torch.uint8 if probabilities.shape[0] <= 256 else torch.int32).numpy()
