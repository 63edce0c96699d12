"""Sliding-window inference: MONAI ``sliding_window_inference`` with Gaussian weighting, as a small function.

Restoring the result to the input's voxel grid is :func:`medseg.transforms.resample.resample_to_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn


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
