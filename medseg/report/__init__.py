"""What people read about a run or a batch: metric tables and JSON summaries (:mod:`.tables`), figures
(:mod:`.plots`), previews (:mod:`.preview`), QA flags (:mod:`.qa`, :mod:`.reference_ranges`) and organ
statistics (:mod:`.statistics`)."""

from __future__ import annotations

from medseg.report.plots import PLOT_METRICS, box_plots, training_curves
from medseg.report.tables import (
    CSV_COLUMNS,
    append_history,
    json_safe,
    read_history,
    write_json,
    write_metrics_csv,
)

__all__ = [
    "CSV_COLUMNS",
    "PLOT_METRICS",
    "append_history",
    "box_plots",
    "json_safe",
    "read_history",
    "training_curves",
    "write_json",
    "write_metrics_csv",
]
