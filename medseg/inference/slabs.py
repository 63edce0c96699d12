"""Resampling one voxel grid onto another a slab at a time, so memory follows the slab, not the volume.

A destination grid ``(dst_affine, dst_shape)`` is cut into slabs along its last axis. Slab ``[k0, k1)`` is itself
a grid: the same voxels with an index offset, so its affine is ``dst_affine @ T(0, 0, k0)`` (:func:`translation`).
Its voxels map into the source's index space through ``inv(src_affine) @ slab_affine``; the box spanned by the
slab's eight corner voxels there, widened by :data:`MARGIN` voxels and clipped to the source
(:func:`source_window`), holds every source voxel that trilinear interpolation of the slab reads. Resampling the
source cropped to that box (its affine ``src_affine @ T(box start)``) onto the slab therefore gives the values
the whole-volume resampling gives at those voxels — same sampler, same interpolation weights up to float
round-off in the index arithmetic — while only ``slab + box`` values exist at a time.

Padding needs no special case: where the box stops short of the source's edge no sample reaches past it, and
where it is clipped the box's edge *is* the source's edge, so zero and border padding see what they would see
on the whole source.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

#: Source voxels added around a slab's footprint: trilinear interpolation reads ``floor(c)`` and ``floor(c) + 1``;
#: one more guards against round-off in the corner arithmetic.
MARGIN = 2

#: Default destination voxels per slab (2 Mi: e.g. 8 slices of 512×512; a slab has at least one slice).
#: Temporary memory grows with it and per-slab call overhead shrinks; the values do not depend on it beyond
#: float round-off. What a slab costs in MONAI's float64 resampler: ``docs/speed.md``, section
#: ``medseg.inference.slabs``.
SLAB_VOXELS = 2**21


def translation(offset: Sequence[float]) -> np.ndarray:
    """4×4 homogeneous translation by ``offset`` voxels."""
    out = np.eye(4)
    out[:3, 3] = np.asarray(offset, dtype=np.float64)
    return out


def slab_ranges(shape: Sequence[int], slab_voxels: int = SLAB_VOXELS) -> Iterator[tuple[int, int]]:
    """``(k0, k1)`` slabs along the last axis of ``shape``, each at most ``slab_voxels`` voxels (≥ 1 slice)."""
    per_slice = int(np.prod(shape[:-1]))
    thickness = max(1, slab_voxels // max(per_slice, 1))
    for k0 in range(0, int(shape[-1]), thickness):
        yield k0, min(int(shape[-1]), k0 + thickness)


def source_window(
    src_affine: np.ndarray,
    src_shape: Sequence[int],
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    margin: int = MARGIN,
) -> tuple[slice, slice, slice]:
    """The box of source voxels that resampling onto ``(dst_affine, dst_shape)`` reads (module docstring).

    Always non-empty: a destination entirely outside the source gets the source's nearest edge voxels, which is
    what border padding reads (zero padding reads nothing and gives zeros either way).
    """
    xform = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    last = np.asarray(dst_shape, dtype=np.float64) - 1
    corners = np.array(np.meshgrid(*[[0.0, v] for v in last], indexing="ij")).reshape(3, -1)
    mapped = xform[:3, :3] @ corners + xform[:3, 3:]
    window = []
    for lo_c, hi_c, n in zip(mapped.min(axis=1), mapped.max(axis=1), src_shape, strict=True):
        lo = int(np.clip(np.floor(lo_c) - margin, 0, n - 1))
        hi = int(np.clip(np.ceil(hi_c) + margin + 1, lo + 1, n))
        window.append(slice(lo, hi))
    return tuple(window)  # type: ignore[return-value]


def slabs(
    src_affine: np.ndarray,
    src_shape: Sequence[int],
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    slab_voxels: int = SLAB_VOXELS,
) -> Iterator[tuple[int, int, tuple[slice, slice, slice], np.ndarray, np.ndarray]]:
    """For each slab ``[k0, k1)`` of the destination: ``(k0, k1, window, window_affine, slab_affine)``.

    ``window`` indexes the source's spatial axes (:func:`source_window`); ``window_affine`` is the cropped
    source's affine and ``slab_affine`` the slab's (module docstring).
    """
    src_affine = np.asarray(src_affine, dtype=np.float64)
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    for k0, k1 in slab_ranges(dst_shape, slab_voxels):
        slab_affine = dst_affine @ translation((0, 0, k0))
        slab_shape = (*dst_shape[:-1], k1 - k0)
        window = source_window(src_affine, src_shape, slab_affine, slab_shape)
        window_affine = src_affine @ translation([w.start for w in window])
        yield k0, k1, window, window_affine, slab_affine
