"""Review verdicts of an output folder: a SQLite file with an append-only history, and its exports.

``OUTDIR/review.sqlite`` (stdlib :mod:`sqlite3`, write-ahead log, so readers never block the one writer)
holds two tables:

=============  ===========================================================================================
``history``    one row per change, never updated or deleted (triggers refuse both): ``case_name``,
               ``version`` (1, 2, … per case), ``action`` (``verdict`` or ``correction``), ``verdict``,
               ``comment``, ``reviewer``, ``time`` (UTC, ISO 8601), ``correction`` (the corrected mask's
               file name, for a correction)
``current``    the latest state per case (a cache of the last history row, rewritten in the same
               transaction): what the page shows and the exports list
=============  ===========================================================================================

**Optimistic concurrency** (no lost update when two reviewers work on one folder): a save names the version it
was made from; inside one ``BEGIN IMMEDIATE`` transaction the store compares it with the case's current
version and refuses the save with :class:`StaleVersion` (naming who changed the case and when) when they
differ. Otherwise the change is version + 1.

After every change :func:`export_review` rewrites ``review.csv`` and ``review.json`` (the current state per
case) and ``review.jsonl`` (the history, one JSON object per line with ``case``, ``status`` =
``"reviewed"`` and ``time`` like the lines of ``manifest.jsonl``), each atomically.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from medseg.io import InputError, atomic_write_text

DB_NAME = "review.sqlite"
EXPORTS = ("review.csv", "review.json", "review.jsonl")
#: The verdicts a reviewer can give, in the order the page offers them.
VERDICTS = ("accept", "needs_correction", "reject")
MAX_COMMENT = 4000
MAX_REVIEWER = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    case_name TEXT NOT NULL,
    version INTEGER NOT NULL,
    action TEXT NOT NULL,
    verdict TEXT,
    comment TEXT NOT NULL DEFAULT '',
    reviewer TEXT NOT NULL,
    time TEXT NOT NULL,
    correction TEXT,
    UNIQUE (case_name, version)
);
CREATE TABLE IF NOT EXISTS current (
    case_name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    verdict TEXT,
    comment TEXT NOT NULL DEFAULT '',
    reviewer TEXT NOT NULL,
    time TEXT NOT NULL,
    correction TEXT
);
CREATE TRIGGER IF NOT EXISTS history_no_update BEFORE UPDATE ON history
BEGIN SELECT RAISE(ABORT, 'review history is append-only'); END;
CREATE TRIGGER IF NOT EXISTS history_no_delete BEFORE DELETE ON history
BEGIN SELECT RAISE(ABORT, 'review history is append-only'); END;
"""


@dataclass(frozen=True)
class CaseState:
    """A case's current review state (version 0: never reviewed)."""

    case: str
    version: int = 0
    verdict: str | None = None
    comment: str = ""
    reviewer: str = ""
    time: str = ""
    correction: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class StaleVersion(Exception):
    """A save made from an older version than the case's current one (someone else saved in between)."""

    def __init__(self, current: CaseState, expected: int) -> None:
        self.current = current
        who = f" by {current.reviewer} at {current.time}" if current.reviewer else ""
        super().__init__(
            f"{current.case}: changed{who} (version {current.version}) since you opened it (version "
            f"{expected}); reload the case to see the change, then save again"
        )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_entry(verdict: str | None, comment: object, reviewer: object) -> tuple[str | None, str, str]:
    """``(verdict, comment, reviewer)`` checked: a known verdict (or None with a correction), strings of
    bounded length, a non-empty reviewer name.

    Raises:
        InputError: one line naming the field and the allowed values.
    """
    if verdict is not None and verdict not in VERDICTS:
        raise InputError(f"verdict: expected one of {', '.join(VERDICTS)}, found {verdict!r}")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise InputError(f"comment: expected text of at most {MAX_COMMENT} characters")
    if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > MAX_REVIEWER:
        raise InputError(f"reviewer: expected your name (1 to {MAX_REVIEWER} characters)")
    return verdict, comment, reviewer.strip()


class ReviewStore:
    """The verdict database of one output folder (module docstring). Thread-safe: one connection per call.

    Example:
        >>> store = ReviewStore("out")                                    # doctest: +SKIP
        >>> store.save("case_1", 0, "accept", "fine", "Dr. A")            # doctest: +SKIP
        CaseState(case='case_1', version=1, verdict='accept', ...)
    """

    def __init__(self, folder: str | os.PathLike, export: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / DB_NAME
        self.export = export
        self._export_lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise InputError(f"{self.path}: review database cannot be opened ({exc})") from None
        try:
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    def state(self, case: str) -> CaseState:
        """The case's current state (version 0 when never reviewed)."""
        with self._connect() as db:
            return self._state(db, case)

    @staticmethod
    def _state(db: sqlite3.Connection, case: str) -> CaseState:
        row = db.execute("SELECT * FROM current WHERE case_name = ?", (case,)).fetchone()
        if row is None:
            return CaseState(case)
        return CaseState(
            case,
            row["version"],
            row["verdict"],
            row["comment"],
            row["reviewer"],
            row["time"],
            row["correction"],
        )

    def states(self) -> dict[str, CaseState]:
        """Every reviewed case's current state, by case name."""
        with self._connect() as db:
            rows = db.execute("SELECT case_name FROM current ORDER BY case_name").fetchall()
            return {r["case_name"]: self._state(db, r["case_name"]) for r in rows}

    def history(self, case: str | None = None) -> list[dict]:
        """The history rows (oldest first), of one case or of all."""
        query, args = "SELECT * FROM history ORDER BY id", ()
        if case is not None:
            query, args = "SELECT * FROM history WHERE case_name = ? ORDER BY id", (case,)
        with self._connect() as db:
            return [dict(r) for r in db.execute(query, args).fetchall()]

    def save(
        self,
        case: str,
        expected_version: int,
        verdict: str | None,
        comment: str,
        reviewer: str,
        correction: str | None = None,
    ) -> CaseState:
        """Record a verdict (``correction=None``) or a saved correction as the case's next version.

        Raises:
            StaleVersion: the case's current version is not ``expected_version``.
            InputError: a field is invalid (:func:`check_entry`).
        """
        verdict, comment, reviewer = check_entry(verdict, comment, reviewer)
        action = "correction" if correction else "verdict"
        if action == "verdict" and verdict is None:
            raise InputError(f"verdict: expected one of {', '.join(VERDICTS)}")
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                current = self._state(db, case)
                if current.version != int(expected_version):
                    raise StaleVersion(current, int(expected_version))
                if action == "correction":  # a correction keeps the verdict and comment it was made under
                    verdict = verdict or current.verdict
                new = CaseState(case, current.version + 1, verdict, comment, reviewer, _now(), correction)
                db.execute(
                    "INSERT INTO history (case_name, version, action, verdict, comment, reviewer, time, "
                    "correction) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (case, new.version, action, new.verdict, comment, reviewer, new.time, correction),
                )
                db.execute(
                    "INSERT OR REPLACE INTO current VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (case, new.version, new.verdict, comment, reviewer, new.time,
                     correction or current.correction),
                )  # fmt: skip
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if self.export:
            export_review(self)
        return self.state(case)


def _csv(states: list[CaseState]) -> str:
    buffer = io.StringIO()
    fields = list(CaseState("").to_dict())
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for state in states:
        writer.writerow(state.to_dict())
    return buffer.getvalue()


def export_review(store: ReviewStore) -> list[Path]:
    """Rewrite ``review.csv``, ``review.json`` and ``review.jsonl`` from the database (module docstring)."""
    with store._export_lock:
        states = list(store.states().values())
        history = store.history()
        lines = [
            json.dumps({"case": h["case_name"], "status": "reviewed", "time": h["time"],
                        **{k: h[k] for k in ("version", "action", "verdict", "comment", "reviewer", "correction")}})
            for h in history
        ]  # fmt: skip
        texts = {
            "review.csv": _csv(states),
            "review.json": json.dumps(
                {"written": _now(), "cases": [s.to_dict() for s in states]}, indent=2, ensure_ascii=False
            ),
            "review.jsonl": "".join(f"{line}\n" for line in lines),
        }
        paths = []
        for name, text in texts.items():
            atomic_write_text(store.folder / name, text)
            paths.append(store.folder / name)
        return paths
