"""Class probabilities on the model grid → a ``uint8`` label map on the input grid, one slab at a time.

The label of an input voxel is the argmax over classes of the probabilities resampled (trilinear, zero padding)
to that voxel. The input grid is cut into slabs along its last axis (:mod:`medseg.inference.slabs`), each slab
gets the probabilities cropped to the slab's footprint, and only its argmax (1 byte per voxel) is kept, so
temporary memory is bounded by the slab (:data:`medseg.inference.slabs.SLAB_VOXELS`), whatever the volume —
not a float64 sampling grid and ``K`` resampled channels the size of the whole input grid (what those would
cost: ``docs/speed.md``, section ``medseg.inference.restore``).

Two samplers give the same values:

* the model grid is an axis-aligned zoom of the input grid (:func:`axis_zoom`) — for a scan stored without
  rotation with its axes in x, y, z order (flips allowed: LPS or RAS), since ``Orientationd`` only flips and
  ``Spacingd`` keeps the direction — then trilinear interpolation is *separable*: three passes of 1D linear
  interpolation (:func:`separable_resample`, float64, each pass one matrix product), instead of MONAI's
  sampler, which builds a float64 sampling grid of 3 coordinates per output voxel and gathers 8 corners per
  channel;
* otherwise (an oblique scan, whose float32-stored rotation leaves ~1e-7 off the diagonal, or permuted axes)
  :func:`medseg.transforms.resample.resample_to_reference`, the library's one general resampler (MONAI
  ``SpatialResample``).

Both samplers compute the same trilinear weights for the same voxel coordinates ``inv(src) @ dst @ index``, so
the label maps agree voxel for voxel wherever the model grid reaches, up to ties at float round-off; in the
one-voxel shell just beyond the model grid MONAI's float64 sampler leaves round-off that its argmax turns into
labels, where the separable sampler gives exact zeros, i.e. background (:data:`SNAP`; tested). The argmax is
``torch.max``'s (:func:`_argmax`): the same first maximum as ``torch.argmax``, faster over the class axis.
Timings of the two samplers and the two argmaxes: ``docs/speed.md``, section ``medseg.inference.restore``.

Voxels of the input that lie outside the model grid (cropped away as air by the body crop) get probability 0
for every class under zero padding, hence label 0 (background); so only the box of input voxels the
model grid reaches (:func:`medseg.inference.slabs.source_window` with the roles of the grids swapped) is
resampled, and the rest of the map is left 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medseg.inference.slabs import SLAB_VOXELS, slabs, source_window, translation
from medseg.transforms.resample import resample_to_reference

#: MONAI's ``AFFINE_TOL``: ``SpatialResample`` returns its input unchanged when the mapping is this close to the
#: identity and the shapes agree; :func:`separable_resample` does the same.
AFFINE_TOL = 1e-3


def axis_zoom(src_affine: np.ndarray, dst_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scale, offset)`` with source index ``= scale * destination index + offset`` per axis, or None.

    None when ``inv(src_affine) @ dst_affine`` is not diagonal (a rotation or an axis permutation between the
    grids): the separable sampler does not apply.
    """
    xform = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    scale = np.diag(xform)[:3].copy()
    if not np.allclose(xform[:3, :3], np.diag(scale), rtol=0, atol=1e-9 * max(1.0, np.abs(scale).max())):
        return None
    return scale, xform[:3, 3].copy()


#: Distance (in voxels) below which a sampling coordinate is taken to be a voxel centre (:func:`interpolation_matrix`).
SNAP = 1e-9


def interpolation_matrix(coords: np.ndarray, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(len(coords), n)`` matrix of 1D linear interpolation at fractional source ``coords``; zero outside.

    Row ``i`` holds ``1 - f`` at ``floor(c_i)`` and ``f`` at ``floor(c_i) + 1`` (``f`` the fraction), each only
    where that source index exists (zero padding per corner, as ``grid_sample``). A coordinate within
    :data:`SNAP` of a voxel centre is that centre: the affine arithmetic's round-off (~1e-15) must not give a
    voxel one grid step outside the model grid a weight of 1e-15 on the grid's edge — an argmax would turn
    that into a label where every class has probability 0.
    """
    nearest = np.rint(coords)
    coords = np.where(np.abs(coords - nearest) < SNAP, nearest, coords)
    lo = np.floor(coords)
    frac = coords - lo
    lo = lo.astype(np.int64)
    matrix = np.zeros((len(coords), n), dtype=np.float64)
    rows = np.arange(len(coords))
    for index, weight in ((lo, 1.0 - frac), (lo + 1, frac)):
        inside = (index >= 0) & (index < n)
        np.add.at(matrix, (rows[inside], index[inside]), weight[inside])
    return torch.from_numpy(matrix).to(dtype)


def separable_resample(
    values: torch.Tensor, scale: np.ndarray, offset: np.ndarray, dst_shape: Sequence[int]
) -> torch.Tensor:
    """Trilinear resampling of ``(C, X, Y, Z)`` onto ``dst_shape`` for the axis zoom ``(scale, offset)``.

    Source voxel coordinate of destination index ``i`` along axis ``a``: ``scale[a] * i + offset[a]``; samples
    outside the source are 0 (zero padding, per corner). Three passes of 1D linear interpolation, each one
    matrix product with :func:`interpolation_matrix` (the last axis first: a slab, it shrinks the data).
    Computed in float64 (MONAI's sampler's dtype); returns float32, as :func:`resample_to_reference` does —
    a ``(C, X, Y, Z)`` view of a tensor stored as ``(C, X, Z, Y)`` (the last product's layout).
    """
    out = values.to(torch.float64)
    c, *in_shape = out.shape
    x, y, z = (int(n) for n in dst_shape)
    if (
        (x, y, z) == tuple(in_shape)
        and np.allclose(scale, 1, atol=AFFINE_TOL)
        and np.allclose(offset, 0, atol=AFFINE_TOL)
    ):
        return out.float()  # what SpatialResample does for a mapping this close to the identity

    def matrix(axis: int, n: int) -> torch.Tensor:
        return interpolation_matrix(
            scale[axis] * np.arange(n, dtype=np.float64) + offset[axis], in_shape[axis]
        )

    out = out @ matrix(2, z).T  # (C, X, Y, z)
    out = (matrix(0, x) @ out.reshape(c, in_shape[0], -1)).reshape(c, x, in_shape[1], z)
    out = out.transpose(2, 3) @ matrix(1, y).T  # (C, x, z, y): one large product
    return out.float().transpose(2, 3)


def _argmax(values: torch.Tensor) -> np.ndarray:
    """Argmax over the first axis as ``uint8``: the first maximum, as ``torch.argmax``, by ``torch.max``'s
    reduction over the leading axis (faster on the CPU than ``torch.argmax``'s: ``docs/speed.md``, section
    ``medseg.inference.restore``), in the layout the values are stored in."""
    if not values.is_contiguous() and values.transpose(2, 3).is_contiguous():  # separable_resample's layout
        return _argmax(values.transpose(2, 3)).transpose(0, 2, 1)
    return torch.max(values, dim=0).indices.numpy().astype(np.uint8)


def restore_labels(
    probabilities: torch.Tensor,
    src_affine: np.ndarray | torch.Tensor,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    slab_voxels: int = SLAB_VOXELS,
    separable: bool = True,
) -> np.ndarray:
    """Argmax labels ``uint8`` of shape ``dst_shape`` (Fortran order, like nibabel's arrays) on the input grid.

    Args:
        probabilities: ``(K, X, Y, Z)`` class probabilities on the model grid (float32, CPU); ``K ≤ 256``.
        src_affine: the model grid's affine (the preprocessed image's ``MetaTensor.affine``).
        dst_affine, dst_shape: the input scan's affine and 3D shape.
        slab_voxels: input voxels per slab (memory / call-overhead trade-off; the result does not depend on it).
        separable: use :func:`separable_resample` when the grids are an axis zoom of each other (module
            docstring); False always uses MONAI's resampler.
    """
    if probabilities.shape[0] > 256:
        raise ValueError(f"{probabilities.shape[0]} classes do not fit a uint8 label map")
    src_affine = np.asarray(torch.as_tensor(src_affine, dtype=torch.float64).cpu())
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    dst_shape = tuple(int(s) for s in dst_shape)
    out = np.zeros(dst_shape, dtype=np.uint8, order="F")
    values = probabilities.detach().cpu()
    # the input voxels the model grid reaches (beyond it, zero padding gives all-zero probabilities: label 0)
    box = source_window(dst_affine, dst_shape, src_affine, values.shape[1:])
    box_affine = dst_affine @ translation([b.start for b in box])
    box_shape = tuple(b.stop - b.start for b in box)
    target = out[box]
    for k0, k1, window, window_affine, slab_affine in slabs(
        src_affine, values.shape[1:], box_affine, box_shape, slab_voxels
    ):
        crop = values[(slice(None), *window)]
        slab_shape = (*box_shape[:-1], k1 - k0)
        zoom = axis_zoom(window_affine, slab_affine) if separable else None
        if zoom is not None:
            restored = separable_resample(crop, *zoom, slab_shape)
        else:
            restored = resample_to_reference(crop, window_affine, slab_affine, slab_shape)
        target[..., k0:k1] = _argmax(restored)
        del restored
    return out
