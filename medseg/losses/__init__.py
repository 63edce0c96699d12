"""Losses: Dice+CE with deep supervision and auxiliary outputs (:mod:`.segmentation`), loss targets."""

from __future__ import annotations

from medseg.losses.segmentation import SegmentationLoss, build_loss
from medseg.losses.targets import presence_targets

__all__ = ["SegmentationLoss", "build_loss", "presence_targets"]
