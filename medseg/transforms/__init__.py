"""MONAI transform presets for CT: train / validate / infer."""

from __future__ import annotations

from medseg.transforms.presets import infer_transforms, train_transforms, val_transforms

__all__ = ["infer_transforms", "train_transforms", "val_transforms"]
