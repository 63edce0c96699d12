"""Training loop, checkpoints and metric history."""

from __future__ import annotations

from medseg.engine.checkpoint import load_checkpoint, save_checkpoint
from medseg.engine.trainer import train

__all__ = ["load_checkpoint", "save_checkpoint", "train"]
