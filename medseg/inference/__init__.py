"""Sliding-window inference, postprocessing and restoring predictions to the input geometry."""

from __future__ import annotations

from medseg.inference.predictor import Prediction, Predictor, model_from_checkpoint
from medseg.inference.sliding import resample_to_reference, resolve_device, sliding_window_logits

__all__ = [
    "Prediction",
    "Predictor",
    "model_from_checkpoint",
    "resample_to_reference",
    "resolve_device",
    "sliding_window_logits",
]
