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
  interpolation (:func:`separable_resample`, float64, each pass a banded matrix product), instead of MONAI's
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

from medseg.inference.slabs import SLAB_VOXELS, slab_ranges, slabs, source_window, translation
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


#: Destination indices per block of a banded interpolation product (:func:`_along`).
BAND = 64


def _along(matrix: torch.Tensor, values: torch.Tensor, last: bool) -> torch.Tensor:
    """``matrix @ values`` (``values`` ``(C, n, M)``, ``last`` False) or ``values @ matrix.T`` (``values``
    ``(..., n)``, ``last`` True) for a 1D interpolation matrix of :func:`interpolation_matrix`.

    Each row has at most two neighbouring non-zero weights, so a block of :data:`BAND` rows reads only the
    columns between its first and last non-zero: the product is done block by block on those columns — the same
    sums without the zero terms (a dense product of a 512×274 zoom multiplies ~137 zeros per weight). A matrix
    of ones and zeros with at most one 1 per row (an axis the zoom leaves alone) is a gather.
    """
    nonzero = matrix != 0
    if bool(((matrix == 1) | ~nonzero).all()) and bool((nonzero.sum(1) <= 1).all()):
        keep = nonzero.any(1).to(values.dtype)
        picked = values.index_select(-1 if last else 1, matrix.argmax(1))
        return picked * (keep if last else keep[:, None])
    rows = matrix.shape[0]
    out = values.new_empty((*values.shape[:-1], rows) if last else (values.shape[0], rows, values.shape[2]))
    for r0 in range(0, rows, BAND):
        r1 = min(rows, r0 + BAND)
        columns = torch.nonzero(nonzero[r0:r1].any(0)).ravel()
        if not len(columns):
            (out[..., r0:r1] if last else out[:, r0:r1]).zero_()
            continue
        c0, c1 = int(columns[0]), int(columns[-1]) + 1
        block = matrix[r0:r1, c0:c1]
        if last:
            out[..., r0:r1] = values[..., c0:c1] @ block.T
        else:
            out[:, r0:r1] = block @ values[:, c0:c1]
    return out


def separable_resample(
    values: torch.Tensor, scale: np.ndarray, offset: np.ndarray, dst_shape: Sequence[int]
) -> torch.Tensor:
    """Trilinear resampling of ``(C, X, Y, Z)`` onto ``dst_shape`` for the axis zoom ``(scale, offset)``.

    Source voxel coordinate of destination index ``i`` along axis ``a``: ``scale[a] * i + offset[a]``; samples
    outside the source are 0 (zero padding, per corner). Three passes of 1D linear interpolation, each a banded
    product with :func:`interpolation_matrix` (:func:`_along`; the last axis first: a slab, it shrinks the data).
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

    out = _along(matrix(2, z), out, last=True)  # (C, X, Y, z)
    out = _along(matrix(0, x), out.reshape(c, in_shape[0], -1), last=False).reshape(c, x, in_shape[1], z)
    out = _along(matrix(1, y), out.transpose(2, 3), last=True)  # (C, x, z, y)
    return out.float().transpose(2, 3)


def _argmax(values: torch.Tensor) -> np.ndarray:
    """Argmax over the first axis as ``uint8``: the first maximum, as ``torch.argmax``, by ``torch.max``'s
    reduction over the leading axis (faster on the CPU than ``torch.argmax``'s: ``docs/speed.md``, section
    ``medseg.inference.restore``), in the layout the values are stored in."""
    if not values.is_contiguous() and values.transpose(2, 3).is_contiguous():  # separable_resample's layout
        return _argmax(values.transpose(2, 3)).transpose(0, 2, 1)
    return torch.max(values, dim=0).indices.numpy().astype(np.uint8)


#: Marks a destination voxel whose eight model-grid corners do not all carry the same label (:func:`_cell_labels`).
MIXED = 255


def _axis_corners(scale: float, offset: float, n_dst: int, n_src: int) -> tuple[np.ndarray, ...]:
    """Per destination index along one axis: the two source indices trilinear interpolation reads (``lo`` and
    ``hi``, equal where the coordinate is a voxel centre within :data:`SNAP`), the weight ``frac`` of ``lo + 1``,
    whether both indices lie on the source and whether neither does (as :func:`interpolation_matrix` reads
    them: every weight then falls outside, so every probability is 0 and the label is background)."""
    coords = scale * np.arange(n_dst, dtype=np.float64) + offset
    nearest = np.rint(coords)
    coords = np.where(np.abs(coords - nearest) < SNAP, nearest, coords)
    lo = np.floor(coords).astype(np.int64)
    frac = coords - lo
    hi = lo + (frac > 0)
    return lo, hi, frac, (lo >= 0) & (hi < n_src), (hi < 0) | (lo >= n_src)


def _cell_labels(labels: np.ndarray, corners: list[tuple[np.ndarray, ...]]) -> np.ndarray:
    """The label every corner of each destination voxel's interpolation cell carries, or :data:`MIXED`.

    Separable, one axis at a time on ``uint8`` labels: pick the ``lo`` and ``hi`` planes along the axis and keep
    the value where they agree, :data:`MIXED` where they differ or leave the source. After the three axes a
    value other than :data:`MIXED` means all eight corners agree (the last axis first: it shrinks the data most).
    A voxel whose corners all lie beyond the source along some axis is background (0) outright.
    """
    out = labels
    for axis in (2, 0, 1):
        lo, hi, _, inside, beyond = corners[axis]
        n = out.shape[axis]
        a = np.take(out, np.clip(lo, 0, n - 1), axis=axis)
        b = np.take(out, np.clip(hi, 0, n - 1), axis=axis)
        a[a != b] = MIXED
        shape = [1, 1, 1]
        shape[axis] = -1
        np.putmask(a, ~np.broadcast_to(inside.reshape(shape), a.shape), MIXED)
        np.putmask(a, np.broadcast_to(beyond.reshape(shape), a.shape), 0)
        out = a
    return out


def _interpolate_at(
    rows: np.ndarray,
    shape: Sequence[int],
    index: tuple[np.ndarray, ...],
    corners: list[tuple[np.ndarray, ...]],
) -> np.ndarray:
    """Trilinear interpolation (float64, zero padding) at the destination voxels ``index`` (three index arrays)
    of the probabilities ``rows`` — ``(X * Y * Z, K)``, one row of ``K`` classes per model-grid voxel, so each
    corner is one contiguous read — rounded to float32 as :func:`separable_resample`'s output is, then the
    first-maximum argmax: the label that resampling every voxel gives.
    """
    picks = []
    for axis, i in enumerate(index):
        lo, _, frac, *_ = corners[axis]
        base, f = lo[i], frac[i]
        picks.append(
            [(base + d, w, (base + d >= 0) & (base + d < shape[axis])) for d, w in ((0, 1 - f), (1, f))]
        )
    acc = np.zeros((len(index[0]), rows.shape[1]), dtype=np.float64)
    for ix, wx, inx in picks[0]:
        for iy, wy, iny in picks[1]:
            wxy, inxy = wx * wy, inx & iny
            flat_xy = (np.clip(ix, 0, shape[0] - 1) * shape[1] + np.clip(iy, 0, shape[1] - 1)) * shape[2]
            for iz, wz, inz in picks[2]:
                weight = np.where(inxy & inz, wxy * wz, 0.0)
                acc += np.take(rows, flat_xy + np.clip(iz, 0, shape[2] - 1), axis=0) * weight[:, None]
    # float32 before the argmax, as the resampled probabilities are (a near-tie then resolves the same way)
    return np.argmax(acc.astype(np.float32), axis=1).astype(np.uint8)


#: Above this fraction of a slab's voxels to interpolate, the slab is resampled whole (:func:`separable_resample`):
#: per voxel the gather of :func:`_interpolate_at` costs about 3× a separable pass (``docs/speed.md``, section
#: ``medseg.inference.restore``), so a network whose labels change every few voxels is not restored slower.
WHOLE_SLAB_FRACTION = 1 / 3


def restore_labels_by_cells(
    probabilities: torch.Tensor,
    scale: np.ndarray,
    offset: np.ndarray,
    dst_shape: Sequence[int],
    slab_voxels: int = SLAB_VOXELS,
) -> np.ndarray:
    """Argmax labels of the trilinear resampling, computed only where the argmax can change.

    If the eight model-grid voxels that trilinear interpolation reads for a destination voxel all have argmax
    ``k``, the interpolated probabilities — a convex combination of theirs — have argmax ``k`` too (``p_k ≥ p_j``
    at every corner holds for any weighted mean; strict inequalities for ``j < k``, the first-maximum rule, stay
    strict). So the label map is the model grid's argmax carried over (:func:`_cell_labels`, ``uint8``
    gathers), and the probabilities are interpolated only at the voxels whose corners disagree — organ borders
    and the model grid's edge (:func:`_interpolate_at`) — one slab of the destination's last axis at a time
    (``slab_voxels``), reading only the model-grid slices under the slab; a slab where more than
    :data:`WHOLE_SLAB_FRACTION` of the voxels need it is resampled whole instead. Same labels as
    :func:`separable_resample` followed by the argmax, up to ties at float round-off; a fraction of its time
    where labels form regions (``docs/speed.md``, section ``medseg.inference.restore``).
    """
    values = probabilities.detach().cpu().contiguous()
    dst_shape = tuple(int(s) for s in dst_shape)
    corners = [_axis_corners(scale[a], offset[a], dst_shape[a], values.shape[1 + a]) for a in range(3)]
    labels = _cell_labels(_argmax(values), corners)
    lo_z, n_z = corners[2][0], values.shape[3]
    for k0, k1 in slab_ranges(dst_shape, slab_voxels):
        slab = labels[:, :, k0:k1]
        mixed = np.nonzero(slab == MIXED)
        if not len(mixed[0]):
            continue
        z0 = int(np.clip(lo_z[k0:k1].min(), 0, n_z - 1))
        z1 = int(np.clip(lo_z[k0:k1].max() + 2, z0 + 1, n_z))
        block = values[:, :, :, z0:z1]
        if len(mixed[0]) > WHOLE_SLAB_FRACTION * slab.size:
            shifted = offset.copy()
            shifted[2] = offset[2] + scale[2] * k0 - z0
            slab[...] = _argmax(separable_resample(block, scale, shifted, slab.shape))
            continue
        rows = block.permute(1, 2, 3, 0).contiguous().numpy().reshape(-1, values.shape[0])
        lo, hi, frac, inside, beyond = corners[2]
        local = [corners[0], corners[1], (lo[k0:k1] - z0, hi[k0:k1] - z0, frac[k0:k1], inside, beyond)]
        slab[mixed] = _interpolate_at(rows, block.shape[1:], mixed, local)
    return labels


def restore_labels(
    probabilities: torch.Tensor,
    src_affine: np.ndarray | torch.Tensor,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    slab_voxels: int = SLAB_VOXELS,
    separable: bool = True,
    cells: bool = True,
) -> np.ndarray:
    """Argmax labels ``uint8`` of shape ``dst_shape`` (Fortran order, like nibabel's arrays) on the input grid.

    Args:
        probabilities: ``(K, X, Y, Z)`` class probabilities on the model grid (float32, CPU); ``K ≤ 256``.
        src_affine: the model grid's affine (the preprocessed image's ``MetaTensor.affine``).
        dst_affine, dst_shape: the input scan's affine and 3D shape.
        slab_voxels: input voxels per slab (memory / call-overhead trade-off; the result does not depend on it).
        separable: use :func:`separable_resample` when the grids are an axis zoom of each other (module
            docstring); False always uses MONAI's resampler.
        cells: for an axis zoom, interpolate only where the corners' labels disagree
            (:func:`restore_labels_by_cells`, the same labels); False resamples every voxel, slab by slab.
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
    zoom = axis_zoom(src_affine, box_affine) if cells and separable and values.shape[0] < MIXED else None
    if zoom is not None:
        out[box] = restore_labels_by_cells(values, *zoom, box_shape, slab_voxels)
        return out
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
