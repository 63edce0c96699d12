"""Training loop and metric history (checkpoint files are :mod:`medseg.io.checkpoint`)."""

from __future__ import annotations

from medseg.engine.trainer import train

__all__ = ["train"]
