"""Sliding-window inference and restoring predictions to the input geometry."""

from __future__ import annotations

from medseg.inference.predictor import Prediction, Predictor, model_from_checkpoint
from medseg.inference.sliding import sliding_window_logits

__all__ = ["Prediction", "Predictor", "model_from_checkpoint", "sliding_window_logits"]
