"""The inference preset applied to one scan without whole-volume float64 temporaries.

:func:`medseg.transforms.infer_transforms` is ``Orientationd → Spacingd → [CropForegroundd] → intensity →
EnsureTyped``. Run eagerly, ``Spacingd`` converts the whole oriented image to float64 and builds MONAI's
sampling grid for the whole model grid in float64 (``affine_grid``), so its peak grows with the whole volume
(measured: ``docs/speed.md``, section ``medseg.inference.preprocess``). :func:`preprocess` gives the same image
with the same transforms, differently scheduled:

1. the scan's voxels enter as they are stored when float32 holds them exactly (int8, uint8, int16, float32:
   no float32 copy of the scan; other types are converted to float32, as the eager chain does);
2. ``Orientationd`` and ``Spacingd`` run *lazily* (``lazy=True``) to obtain the grids they would produce (affine
   and shape, by their own rules) without moving a voxel; the oriented scan is then a numpy view of the scan
   (:func:`oriented_view`: transposes and flips, no copy);
3. when the next step is the body crop (``CropForegroundd`` with :func:`medseg.transforms.presets.body_mask`),
   only the part of the model grid that can hold the crop's box is resampled (:func:`_crop_box`: the scan's
   body box mapped onto the model grid, widened by the interpolation's reach and the crop's margin): the body
   is cropped *before* resampling, not after. ``Spacingd``'s own resampler (``spacing_transform.sp_resample``,
   with the transform's mode, padding, align_corners and dtype) fills that grid one slab at a time from the
   matching crop of the oriented scan (:mod:`medseg.inference.slabs`) into one float32 buffer;
4. the rest of the chain (body crop, intensity, type) runs eagerly on the model-grid image; the crop finds the
   same box as on the whole grid, since no voxel outside the resampled part is above the threshold.

Peak memory of this stage, besides the scan as stored (and its float32 copy when step 1 makes one: another
stored type, or a read-only array), is one slab's boolean mask for the body box plus ``3 × 4 B`` per model-grid
voxel (resampled, cropped, normalised) plus one slab's temporaries (what the eager chain needs instead:
``docs/speed.md``, section ``medseg.inference.preprocess``). The values equal the eager chain's up to the last
float32 bit (round-off in the per-slab index arithmetic); a chain that does not start with ``Orientationd,
Spacingd`` is run eagerly as a whole.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.inference.slabs import SLAB_VOXELS, slabs, translation
from medseg.transforms.presets import BODY_HU_THRESHOLD, body_mask

#: Stored voxel types that float32 represents exactly: passed to the chain without a float32 copy.
EXACT_IN_FLOAT32 = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.float32))


def scan_tensor(reference: nib.Nifti1Image) -> torch.Tensor:
    """The scan's voxels as a channel-first tensor ``(1, X, Y, Z)``, sharing memory with the image when exact.

    Raises:
        ValueError: the image is not 3D (a trailing singleton fourth axis is dropped).
    """
    data = np.asanyarray(reference.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, found {data.ndim}D with shape {tuple(data.shape)}")
    if data.dtype not in EXACT_IN_FLOAT32 or not data.flags.writeable:
        data = np.asarray(data, dtype=np.float32)
    return torch.from_numpy(data)[None]


def oriented_view(data: np.ndarray, src_affine: np.ndarray, oriented_affine: np.ndarray) -> np.ndarray:
    """``data`` seen in the oriented grid's axis order and directions: a numpy view (transposes and flips).

    ``Orientationd`` only permutes and flips axes, so ``inv(src_affine) @ oriented_affine`` is a signed
    permutation with offsets; the view holds exactly the values of the eager ``Orientationd`` output without
    copying the scan.

    Raises:
        ValueError: the two affines are not related by an axis permutation and flips.
    """
    xform = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(oriented_affine, np.float64))
    axes = [int(np.argmax(np.abs(xform[:3, k]))) for k in range(3)]
    rounded = np.rint(xform[:3, :3])
    if sorted(axes) != [0, 1, 2] or not np.allclose(xform[:3, :3], rounded, atol=1e-6):
        raise ValueError("the oriented grid is not an axis permutation of the scan's grid")
    view = np.transpose(data, axes)
    flips = tuple(k for k in range(3) if rounded[axes[k], k] < 0)
    return np.flip(view, flips) if flips else view


def body_box(data: np.ndarray, threshold: float, slab: int = 16) -> list[tuple[int, int]] | None:
    """Inclusive index range ``(lo, hi)`` per axis of the voxels above ``threshold``, or None when there are none.

    Computed ``slab`` slices of the last axis at a time (a boolean mask of one slab at a time).
    """
    hits = [np.zeros(n, dtype=bool) for n in data.shape]
    for k0 in range(0, data.shape[2], slab):
        inside = data[:, :, k0 : k0 + slab] > threshold
        hits[0] |= inside.any(axis=(1, 2))
        hits[1] |= inside.any(axis=(0, 2))
        hits[2][k0 : k0 + slab] = inside.any(axis=(0, 1))
    if not hits[2].any():
        return None
    return [(int(np.argmax(h)), int(len(h) - 1 - np.argmax(h[::-1]))) for h in hits]


def _crop_box(
    crop: mt.Transform | None,
    oriented: np.ndarray,
    oriented_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, ...],
) -> tuple[slice, ...]:
    """The part of the model grid that can hold the body crop's box (module docstring, step 3); else all of it.

    The crop keeps the model voxels above the body threshold, widened by its margin. A model voxel at oriented
    coordinate ``c`` interpolates the scan voxels ``floor(c)`` and ``floor(c) + 1`` (the edge voxel beyond
    the scan, under border padding), so it can be above the threshold only if they reach the scan's body box;
    the box of such voxels, widened by the crop's margin and two voxels for round-off, is returned.
    """
    whole = tuple(slice(0, n) for n in dst_shape)
    cropper = getattr(crop, "cropper", None)
    if (
        not isinstance(crop, mt.CropForegroundd)
        or cropper.select_fn is not body_mask
        or cropper.k_divisible not in (1, (1,), (1, 1, 1))
    ):
        return whole
    xform = np.linalg.solve(np.asarray(oriented_affine, np.float64), np.asarray(dst_affine, np.float64))
    scale, offset = np.diag(xform)[:3], xform[:3, 3]
    if not np.allclose(xform[:3, :3], np.diag(scale), atol=1e-9) or np.any(scale <= 0):
        return whole  # not an axis-aligned zoom: resample the whole grid
    box = body_box(oriented, BODY_HU_THRESHOLD)
    if box is None:
        return whole  # no body: the crop is empty either way, as in the eager chain
    margins = np.broadcast_to(np.asarray(cropper.margin, dtype=int), (3,))
    out = []
    rows = zip(box, oriented.shape, dst_shape, scale, offset, margins, strict=True)
    for (lo, hi), n_src, n_dst, m, t, margin in rows:
        first = 0 if lo == 0 else int(np.floor((lo - 1 - t) / m)) - margin - 2
        last = n_dst - 1 if hi == n_src - 1 else int(np.ceil((hi + 1 - t) / m)) + margin + 2
        out.append(slice(max(first, 0), min(last, n_dst - 1) + 1))
    return tuple(out)


def _resample_in_slabs(
    spacing: mt.Spacingd,
    source: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, ...],
    slab_voxels: int,
) -> MetaTensor:
    """``spacing``'s resampler filling the grid ``(dst_affine, dst_shape)`` from ``source`` (X, Y, Z) slab by slab."""
    resampler = spacing.spacing_transform.sp_resample
    mode, padding, corners, dtype = (
        spacing.mode[0],
        spacing.padding_mode[0],
        spacing.align_corners[0],
        spacing.dtype[0],
    )
    out = torch.empty((1, *dst_shape), dtype=torch.float32)
    for k0, k1, window, window_affine, slab_affine in slabs(
        src_affine, source.shape, dst_affine, dst_shape, slab_voxels
    ):
        values = torch.from_numpy(np.ascontiguousarray(source[window]))[None]
        crop = MetaTensor(values, affine=torch.as_tensor(window_affine))
        block = resampler(
            crop,
            dst_affine=torch.as_tensor(slab_affine),
            spatial_size=(*dst_shape[:-1], k1 - k0),
            mode=mode,
            padding_mode=padding,
            align_corners=corners,
            dtype=dtype,
            lazy=False,
        )
        out[..., k0:k1] = torch.as_tensor(block)
        del block, crop, values
    return MetaTensor(out, affine=torch.as_tensor(dst_affine))


def preprocess(
    reference: nib.Nifti1Image, transforms: mt.Compose, slab_voxels: int = SLAB_VOXELS
) -> MetaTensor:
    """Channel-first model-space image (float32 MetaTensor with the model-grid affine); see module docstring.

    Args:
        reference: the scan (its ``dataobj`` holds the voxels, its ``affine`` the geometry).
        transforms: the inference preset, ``medseg.transforms.infer_transforms(plan, load=False)``.
        slab_voxels: model-grid voxels resampled per slab (the result does not depend on it).
    """
    key = "image"
    chain = list(transforms.transforms)
    affine = torch.as_tensor(np.asarray(reference.affine), dtype=torch.float64)
    tensor = scan_tensor(reference)
    staged = len(chain) >= 2 and isinstance(chain[0], mt.Orientationd) and isinstance(chain[1], mt.Spacingd)
    if not staged:
        whole = MetaTensor(tensor.float(), affine=affine)
        return mt.Compose(chain)({key: whole})[key]
    # the grids only (lazy: no voxel moves): oriented scan, then the model grid Spacingd would make of it
    planned = chain[0]({key: MetaTensor(tensor, affine=affine)}, lazy=True)[key]
    oriented_affine = np.asarray(planned.peek_pending_affine(), dtype=np.float64)
    oriented_shape = tuple(int(n) for n in planned.peek_pending_shape())
    grid = torch.zeros((1,), dtype=tensor.dtype).expand(1, *oriented_shape)  # no memory behind it
    planned = chain[1]({key: MetaTensor(grid, affine=torch.as_tensor(oriented_affine))}, lazy=True)[key]
    dst_affine = np.asarray(planned.peek_pending_affine(), dtype=np.float64)
    dst_shape = tuple(int(n) for n in planned.peek_pending_shape())
    del planned, grid
    oriented = oriented_view(tensor[0].numpy(), np.asarray(affine), oriented_affine)
    box = _crop_box(chain[2] if len(chain) > 2 else None, oriented, oriented_affine, dst_affine, dst_shape)
    box_affine = dst_affine @ translation([b.start for b in box])
    box_shape = tuple(b.stop - b.start for b in box)
    image = _resample_in_slabs(chain[1], oriented, oriented_affine, box_affine, box_shape, slab_voxels)
    del oriented, tensor
    return mt.Compose(chain[2:])({key: image})[key]
