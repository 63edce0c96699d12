"""Sliding-window inference, test-time mirroring, ensembles, and restoring predictions to the input geometry."""

from __future__ import annotations

from medseg.inference.postprocess import ComponentRule
from medseg.inference.predictor import Prediction, Predictor, model_from_checkpoint
from medseg.inference.restore import restore_labels
from medseg.inference.sliding import sliding_window_logits

__all__ = [
    "ComponentRule",
    "Prediction",
    "Predictor",
    "model_from_checkpoint",
    "restore_labels",
    "sliding_window_logits",
]
