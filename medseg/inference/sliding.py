"""Sliding-window inference and restoring predictions to the input scan's geometry.

Small pure functions: :func:`sliding_window_logits` (MONAI ``sliding_window_inference`` with Gaussian
weighting) and :func:`resample_to_reference` (MONAI ``SpatialResample`` from the model-space grid onto the
input's voxel grid, using the two affines — exact for any orientation, spacing, oblique direction and crop).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample
from torch import nn


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
    return device


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    mode: str = "gaussian",
    amp: bool = True,
) -> torch.Tensor:
    """Logits ``(B, K, *image.shape[2:])`` by Gaussian-weighted sliding windows (on ``image.device``).

    Autocast (fp16) is used on CUDA when ``amp``; the result is float32.
    """
    model.eval()
    roi = [int(r) for r in roi_size]  # volumes smaller than the window are padded by MONAI
    use_amp = amp and image.device.type == "cuda"
    with torch.autocast(device_type=image.device.type, enabled=use_amp):
        out = sliding_window_inference(
            torch.as_tensor(image),
            roi,
            sw_batch_size,
            model,
            overlap=overlap,
            mode=mode,
            padding_mode="constant",
        )
    return torch.as_tensor(out).float()


def resample_to_reference(
    values: torch.Tensor,
    src_affine: torch.Tensor | np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample channel-first ``values`` (C, ...) on the grid ``src_affine`` onto ``(dst_affine, dst_shape)``.

    Voxels of the destination outside the source grid get 0. Used with probabilities (bilinear) before the
    argmax, so class boundaries are interpolated, not nearest-neighbour staircases.
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
