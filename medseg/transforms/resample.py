"""Resampling between two voxel grids of one scan, through their affines (patient space, not array order).

One resampler for the whole library: predictions restored to the input geometry (probabilities, bilinear)
and label maps moved onto a reference grid for evaluation (nearest neighbour) both use
:func:`resample_to_reference`, which wraps MONAI's ``SpatialResample``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample


def resample_to_reference(
    values: torch.Tensor | np.ndarray,
    src_affine: torch.Tensor | np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample channel-first ``values`` (C, ...) on the grid ``src_affine`` onto ``(dst_affine, dst_shape)``.

    Exact for any orientation, spacing, oblique direction and crop: the mapping is
    ``inv(src_affine) @ dst_affine`` from destination to source voxel indices. Voxels of the destination
    outside the source grid get 0. ``mode="bilinear"`` for probabilities (class boundaries interpolated
    before the argmax), ``mode="nearest"`` for label maps. Returns float32.
    """
    src = MetaTensor(
        torch.as_tensor(values).float(), affine=torch.as_tensor(np.asarray(src_affine), dtype=torch.float64)
    )
    out = SpatialResample(mode=mode, padding_mode="zeros", align_corners=False, dtype=torch.float64)(
        src,
        dst_affine=torch.as_tensor(np.asarray(dst_affine), dtype=torch.float64),
        spatial_size=tuple(int(s) for s in dst_shape),
    )
    return torch.as_tensor(out).float()
