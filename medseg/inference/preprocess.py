"""The inference preset applied to one scan without whole-volume float64 temporaries.

:func:`medseg.transforms.infer_transforms` is ``Orientationd → Spacingd → [CropForegroundd] → intensity →
EnsureTyped``. Run eagerly on a 512×512×300 CT, ``Spacingd`` converts the whole oriented image to float64 and
builds MONAI's sampling grid for the whole model grid in float64 (``affine_grid``: 32 B per output voxel for the
base grid and 24 B for the grid) — about 3 GB at its peak, more than the network needs. :func:`preprocess`
gives the same image with the same transforms, differently scheduled:

1. the scan's voxels enter as they are stored when float32 holds them exactly (int8, uint8, int16, float32:
   no float32 copy of the scan; other types are converted to float32, as before);
2. ``Orientationd`` runs eagerly (an axis flip/permutation: one copy in the scan's own type);
3. ``Spacingd`` runs *lazily* (``lazy=True``) to obtain the model grid it would produce (affine and shape, by its
   own rules), then its own resampler (``spacing_transform.sp_resample``, with the transform's mode, padding,
   align_corners and dtype) fills that grid one slab at a time from the matching crop of the oriented scan
   (:mod:`medseg.inference.slabs`) into one float32 buffer;
4. the rest of the chain (body crop, intensity, type) runs eagerly on the model-grid image.

Peak memory of this stage is about ``2 B`` (the oriented int16 copy) per input voxel plus ``3 × 4 B`` per
model-grid voxel (resampled, cropped, normalised) plus one slab's temporaries, instead of
``~8 + 4 + 4`` B per input voxel plus ``~64`` B per model voxel. The values equal the eager chain's up to the
last float32 bit (round-off in the per-slab index arithmetic); a chain that does not start with
``Orientationd, Spacingd`` is run eagerly as a whole.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.inference.slabs import SLAB_VOXELS, slabs

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


def _spacing_in_slabs(spacing: mt.Spacingd, image: MetaTensor, key: str, slab_voxels: int) -> MetaTensor:
    """What ``spacing({key: image})[key]`` holds, computed slab by slab (module docstring, step 3)."""
    planned = spacing({key: image}, lazy=True)[key]
    dst_affine = np.asarray(planned.peek_pending_affine(), dtype=np.float64)
    dst_shape = tuple(int(s) for s in planned.peek_pending_shape())
    del planned
    resampler = spacing.spacing_transform.sp_resample
    mode, padding, corners, dtype = (
        spacing.mode[0],
        spacing.padding_mode[0],
        spacing.align_corners[0],
        spacing.dtype[0],
    )
    src_affine = np.asarray(image.affine, dtype=np.float64)
    source = image.as_tensor()
    out = torch.empty((source.shape[0], *dst_shape), dtype=torch.float32)
    for k0, k1, window, window_affine, slab_affine in slabs(
        src_affine, source.shape[1:], dst_affine, dst_shape, slab_voxels
    ):
        crop = MetaTensor(source[(slice(None), *window)], affine=torch.as_tensor(window_affine))
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
        del block, crop
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
    oriented = chain[0]({key: MetaTensor(tensor, affine=affine)})[key]
    del tensor
    image = _spacing_in_slabs(chain[1], oriented, key, slab_voxels)
    del oriented
    return mt.Compose(chain[2:])({key: image})[key]
