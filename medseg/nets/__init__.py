"""Networks: the 3D (Attention) U-Net and the registry that builds every variant from a config."""

from __future__ import annotations

from medseg.nets.registry import RegistryError, build_network
from medseg.nets.unet import AttentionUNet3D, UNet3D, count_parameters

__all__ = ["AttentionUNet3D", "RegistryError", "UNet3D", "build_network", "count_parameters"]
