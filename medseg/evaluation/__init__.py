"""Evaluating segmentations: a folder against a folder in one call (:mod:`.folder`)."""

from __future__ import annotations

from medseg.evaluation.folder import (
    EvaluationError,
    EvaluationSettings,
    evaluate_case,
    evaluate_folder,
    evaluate_held_out,
    label_index_names,
    summary_table,
)

__all__ = [
    "EvaluationError",
    "EvaluationSettings",
    "evaluate_case",
    "evaluate_folder",
    "evaluate_held_out",
    "label_index_names",
    "summary_table",
]
