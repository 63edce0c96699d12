"""The review application: ``medseg review OUTDIR --serve`` — a NiiVue viewer per case, verdicts in SQLite,
corrections saved beside the masks and exported as a training dataset."""

from __future__ import annotations

from medseg.review.corrections import export_corrections, save_correction
from medseg.review.server import ReviewServer, make_server
from medseg.review.store import VERDICTS, CaseState, ReviewStore, StaleVersion

__all__ = [
    "VERDICTS",
    "CaseState",
    "ReviewServer",
    "ReviewStore",
    "StaleVersion",
    "export_corrections",
    "make_server",
    "save_correction",
]
