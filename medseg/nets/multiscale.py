"""Attention to Scale around a U-Net (Chen et al., CVPR 2016), with the U-Net's output contract.

The fusion itself is the block :class:`medseg.nets.blocks.scale_attention.ScaleAttention3D` (Eq. 1-2 of the
paper); this wrapper gives it the training/eval outputs of :mod:`medseg.nets.unet` so the loss, the
trainer and the predictor treat it like any other network.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.nets.blocks.scale_attention import ScaleAttention3D
from medseg.nets.unet import UNet3D


class MultiScaleNet(nn.Module):
    """A U-Net applied at several input scales, its predictions fused by learned per-voxel scale weights."""

    def __init__(self, backbone: UNet3D, scales: list[float], fusion: str) -> None:
        super().__init__()
        self.num_classes = backbone.num_classes
        self.scale_attention = ScaleAttention3D(
            backbone, backbone.filters[0], backbone.num_classes, scales=tuple(scales), fusion=fusion
        )

    def init_class_prior(self, log_prior: torch.Tensor) -> None:
        """See :meth:`medseg.nets.unet.UNet3D.init_class_prior`."""
        self.scale_attention.backbone.init_class_prior(log_prior)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if not self.training:
            if return_attention:
                fused, weights = self.scale_attention.forward_with_weights(x)
                return fused, [] if weights is None else [weights]
            return self.scale_attention(x)
        fused, aux = self.scale_attention(x)
        return {"logits": [fused], "aux": aux}
