"""Small building pieces shared by every block: normalisation factory, conv–norm–act, a U-Net level, resize.

All blocks in :mod:`medseg.nets.blocks` take and return ``(B, C, D, H, W)`` tensors and build their
normalisation layers through :func:`get_norm`, so a network can switch every block between instance,
batch and group normalisation with one config value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nets.registry import NORMS


def get_norm(name: str, channels: int) -> nn.Module:
    """Return a 3D normalisation layer by name (``instance`` | ``batch`` | ``group``).

    Instance norm is affine (learned scale/shift), as in nnU-Net; group norm uses up to 8 groups.
    """
    if name == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if name == "batch":
        return nn.BatchNorm3d(channels)
    if name == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {name!r}; valid names: {', '.join(NORMS)}")


class ConvNormAct(nn.Sequential):
    """``Conv3d → norm → ReLU`` (the conv has no bias because the norm has one).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: cubic kernel size; padding keeps the spatial size for stride 1.
        stride: convolution stride.
        norm: normalisation name, see :func:`get_norm`.
        act: append a ReLU when true.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm: str = "instance",
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
            get_norm(norm, out_channels),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two 3×3×3 conv–norm–ReLU layers: one level of the 3D U-Net (Çiçek et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance") -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, 3, norm=norm),
            ConvNormAct(out_channels, out_channels, 3, norm=norm),
        )


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of ``(B, C, *spatial)`` to ``size`` (no-op when the size already matches)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
