"""Decoder fusions: how a U-Net level merges the coarser decoder feature with its skip connection.

* :class:`ConcatFusion` — the U-Net's: trilinear ×2 up-sampling to the skip's exact size, concatenation,
  two 3×3×3 conv–norm–ReLU (Ronneberger et al. 2015; Oktay et al. 2018 Fig. 1).
* :class:`GAUFusion` — PAN's global attention upsample (Li et al., BMVC 2018, Fig. 3;
  :mod:`medseg.nets.blocks.pan`) followed by the level's two 3×3×3 convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nets.blocks.common import DoubleConv
from medseg.nets.blocks.pan import GlobalAttentionUpsample3D


class ConcatFusion(nn.Module):
    """U-Net decoder fusion: trilinear up-sampling of the coarse feature to the skip's size, concatenation."""

    def __init__(self, high_channels: int, low_channels: int, out_channels: int, norm: str = "instance"):
        super().__init__()
        self.conv = DoubleConv(high_channels + low_channels, out_channels, norm)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(high, size=low.shape[2:], mode="trilinear", align_corners=False)
        return self.conv(torch.cat([low, up], dim=1))


class GAUFusion(nn.Module):
    """PAN's global attention upsample (Li et al. 2018) followed by the level's two 3×3×3 convolutions."""

    def __init__(self, high: int, low: int, out: int, norm: str = "instance", **options) -> None:
        super().__init__()
        self.gau = GlobalAttentionUpsample3D(high, low, out, norm=norm, **options)
        self.conv = DoubleConv(out, out, norm)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.conv(self.gau(high, low))
