"""Class probabilities on the model grid → a ``uint8`` label map on the input grid, one slab at a time.

The label of an input voxel is the argmax over classes of the probabilities resampled (bilinear) to that voxel
by :func:`medseg.transforms.resample.resample_to_reference`, the library's one resampler. Resampling all ``K``
channels onto the whole input grid at once costs about ``(40 + 12 K)`` bytes per *input* voxel in MONAI's
float64 sampler (~80 B for ``K = 7``: 6.3 GB for a 512×512×300 CT); here the input grid is cut into slabs
along its last axis (:mod:`medseg.inference.slabs`), each slab gets the probabilities cropped to the slab's
footprint, and only its argmax (1 byte per voxel) is kept. Temporary memory is then bounded by the slab
(:data:`medseg.inference.slabs.SLAB_VOXELS`), whatever the volume; the result is the same label map as the
whole-volume restore up to float round-off in the index arithmetic, which can only matter where two classes'
probabilities tie to ~1e-12.

Voxels of the input that lie outside the model grid (cropped away as air by the body crop) get probability 0
for every class under zero padding, hence label 0 (background), as before; so only the box of input voxels the
model grid reaches (:func:`medseg.inference.slabs.source_window` with the roles of the grids swapped) is
resampled, and the rest of the map is left 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medseg.inference.slabs import SLAB_VOXELS, slabs, source_window, translation
from medseg.transforms.resample import resample_to_reference


def restore_labels(
    probabilities: torch.Tensor,
    src_affine: np.ndarray | torch.Tensor,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    slab_voxels: int = SLAB_VOXELS,
) -> np.ndarray:
    """Argmax labels ``uint8`` of shape ``dst_shape`` (Fortran order, like nibabel's arrays) on the input grid.

    Args:
        probabilities: ``(K, X, Y, Z)`` class probabilities on the model grid (float32, CPU); ``K ≤ 256``.
        src_affine: the model grid's affine (the preprocessed image's ``MetaTensor.affine``).
        dst_affine, dst_shape: the input scan's affine and 3D shape.
        slab_voxels: input voxels per slab (memory / call-overhead trade-off; the result does not depend on it).
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
        restored = resample_to_reference(crop, window_affine, slab_affine, slab_shape)
        target[..., k0:k1] = torch.argmax(restored, dim=0).numpy().astype(np.uint8)
        del restored
    return out
