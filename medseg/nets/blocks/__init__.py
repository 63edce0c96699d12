"""Reusable 3D attention blocks; each takes and returns ``(B, C, D, H, W)`` and cites its paper."""

from __future__ import annotations

from medseg.nets.blocks.danet import (
    ChannelAttention3D,
    DualAttention3D,
    DualAttentionHead3D,
    PositionAttention3D,
)
from medseg.nets.blocks.ema import EMAUnit3D
from medseg.nets.blocks.encnet import ContextEncoding3D, EncodingLayer3D
from medseg.nets.blocks.grid_attention import GridAttentionGate3D
from medseg.nets.blocks.pan import FeaturePyramidAttention3D, GlobalAttentionUpsample3D
from medseg.nets.blocks.psa import PointwiseSpatialAttention3D
from medseg.nets.blocks.reverse_attention import ReverseAttentionHead3D
from medseg.nets.blocks.scale_attention import ScaleAttention3D

__all__ = [
    "ChannelAttention3D",
    "ContextEncoding3D",
    "DualAttention3D",
    "DualAttentionHead3D",
    "EMAUnit3D",
    "EncodingLayer3D",
    "FeaturePyramidAttention3D",
    "GlobalAttentionUpsample3D",
    "GridAttentionGate3D",
    "PointwiseSpatialAttention3D",
    "PositionAttention3D",
    "ReverseAttentionHead3D",
    "ScaleAttention3D",
]
