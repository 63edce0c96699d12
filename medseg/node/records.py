"""The rows of the job store (:mod:`medseg.node.store`) as frozen records: a received instance, a job version,
a delivery to claim."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True)
class Instance:
    """One received instance, as the SCP records it."""

    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    path: str
    size: int
    sha256: str
    calling_ae: str = ""
    peer: str = ""


@dataclass(frozen=True)
class Job:
    """A row of ``jobs``."""

    id: int
    series_uid: str
    study_uid: str
    version: int
    state: str
    reason: str | None
    attempts: int
    last_error: str | None
    case_name: str | None
    outputs: tuple[str, ...]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            row["id"], row["series_uid"], row["study_uid"], row["version"], row["state"], row["reason"],
            row["attempts"], row["last_error"], row["case_name"], tuple(json.loads(row["outputs"])),
        )  # fmt: skip


@dataclass(frozen=True)
class Delivery:
    """A row of ``deliveries`` with its job's output files."""

    job_id: int
    destination: str
    attempts: int
    outputs: tuple[str, ...]
