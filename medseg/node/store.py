"""The node's durable job store: one SQLite database file (``<workdir>/node.sqlite``).

Tables (schema version :data:`SCHEMA_VERSION`, kept in ``meta``):

* ``instances`` — every received SOP instance: SOP / Series / Study UIDs, SOP class, spool path, size,
  SHA-256, calling AE, peer address, received time;
* ``jobs`` — one row per *version* of a series' job: state, reason (refused), attempts, last error,
  created / updated times, the time of its last instance, the case name and the output files;
* ``job_instances`` — the instances a version segments, fixed when a worker claims it;
* ``deliveries`` — job × destination: state, attempts, next attempt time, last error, delivered SOP UIDs.

**Job states** (:data:`JOB_STATES`): ``receiving`` → ``queued`` (no instance for ``stable_seconds``, like
Orthanc's StableAge) → ``running`` → ``sending`` → ``done``; or ``refused`` (a one-line reason: not CT,
missing slices, corrupt data, too many instances), ``failed`` (an error while segmenting), ``send-failed``
(a destination still refused after the last attempt). An instance that arrives while the series' newest
version is ``receiving``/``queued`` joins it; one that arrives after the version was claimed (or finished)
starts a **new version** with *all* the series' instances — a version's instance set never changes once a
worker has it, so no output mixes two states of a series, and the older version's outputs stay.

**Transactions.** Every state change is one ``BEGIN IMMEDIATE`` transaction: the write lock is taken at the
start, so two workers can never both claim one job (the second sees it ``running``) and a read never has to
be upgraded to a write (the case where SQLite gives up with ``database is locked`` at once). Other waits are
covered by the busy timeout (:data:`BUSY_TIMEOUT_S`). One :class:`Store` (one connection) per thread.

**Durability.** WAL journal (readers do not block the writer: ``status`` while the node works) with
``synchronous=FULL``: a C-STORE is answered *success* only after its instance is recorded, and the PACS may
then delete its copy, so a commit must survive a power cut, not only a crash of the process (``NORMAL``
in WAL mode can lose the last commits on power loss). The cost is one fsync per commit, about a millisecond
on an SSD, small beside the instance's own write.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from medseg.io import InputError
from medseg.node.records import Delivery, Instance, Job
from medseg.node.retry import backoff_seconds

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
DB_NAME = "node.sqlite"

#: A version whose segmentation was cut short this often (the process died) fails instead of looping.
MAX_RUN_ATTEMPTS = 3
JOB_STATES = ("receiving", "queued", "running", "sending", "done", "refused", "failed", "send-failed")
#: States after which a new instance starts a new version (the version's instance set is fixed).
CLOSED = ("running", "sending", "done", "refused", "failed", "send-failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, calling_ae TEXT, peer TEXT,
    received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, version INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, last_instance_at REAL NOT NULL,
    case_name TEXT, outputs TEXT NOT NULL DEFAULT '[]', UNIQUE (series_uid, version));
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS job_instances (
    job_id INTEGER NOT NULL REFERENCES jobs (id), sop_uid TEXT NOT NULL, path TEXT NOT NULL,
    PRIMARY KEY (job_id, sop_uid));
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs (id), destination TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT,
    sop_uids TEXT NOT NULL DEFAULT '[]', updated_at REAL NOT NULL, PRIMARY KEY (job_id, destination));
"""


class StoreError(InputError):
    """The database cannot be used (newer schema, not a node database); one line naming the file."""


EventLog = Callable[[dict], object]


class Store:
    """A connection to the job store (create one per thread; module docstring).

    Args:
        path: the database file (created with the schema when missing).
        log_event: receives one dict per job state change, after its commit.
        shared: the connection may be handed from thread to thread (a pool: one user at a time).
    """

    def __init__(self, path: str | Path, log_event: EventLog | None = None, *, shared: bool = False) -> None:
        self.path = Path(path)
        self.log_event = log_event
        self.db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=not shared
        )
        self.db.row_factory = sqlite3.Row
        self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        try:
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a medseg node database ({exc})") from None
        if mode != "wal":
            raise StoreError(f"{self.path}: cannot use the WAL journal here (journal mode {mode})")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("PRAGMA foreign_keys = ON")
        self._create_schema()

    def _create_schema(self) -> None:
        with self.transaction() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: job store schema {row[0]} is newer than this medseg's ({SCHEMA_VERSION}); "
                    "upgrade medseg"
                )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on any exception)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _emit(self, events: list[dict]) -> None:
        for event in events if self.log_event is not None else ():
            self.log_event(event)

    @staticmethod
    def _event(db: sqlite3.Connection, job_id: int, state: str, **extra: object) -> dict:
        row = db.execute("SELECT series_uid, version FROM jobs WHERE id = ?", (job_id,)).fetchone()
        event = {"event": "job", "job": job_id, "series": row[0], "version": row[1], "state": state}
        return {**event, **{k: v for k, v in extra.items() if v is not None}}

    def _set_state(
        self, db: sqlite3.Connection, job_id: int, state: str, *, note: str | None = None, **fields: object
    ) -> dict:
        """Set the state (and ``fields``, column → value) of a job; return its log event."""
        fields = {"state": state, "updated_at": time.time(), **fields}
        assignments = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))
        shown = {k: v for k, v in fields.items() if k in ("reason", "last_error", "case_name")}
        return self._event(db, job_id, state, note=note, **shown)

    # ------------------------------------------------------------------ receiving (the SCP)

    def spool_bytes(self) -> int:
        """Bytes of every recorded instance (what the spool quota counts)."""
        return int(self.db.execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()[0])

    def series_instances(self, series_uid: str) -> int:
        """How many instances of ``series_uid`` are recorded."""
        return int(
            self.db.execute("SELECT COUNT(*) FROM instances WHERE series_uid = ?", (series_uid,)).fetchone()[
                0
            ]
        )

    def has_instance(self, sop_uid: str) -> bool:
        return self.db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone() is not None

    def record_instance(self, inst: Instance, now: float | None = None) -> tuple[str, int]:
        """Record a received instance and attach it to its series' open job version; return
        ``(what, job_id)`` with ``what`` ``new`` | ``replaced`` (same SOP UID, other bytes) | ``duplicate``
        (same bytes again: nothing changes, no new version)."""
        now = time.time() if now is None else now
        events: list[dict] = []
        with self.transaction() as db:
            old = db.execute("SELECT sha256 FROM instances WHERE sop_uid = ?", (inst.sop_uid,)).fetchone()
            job = db.execute(
                "SELECT id, state, version FROM jobs WHERE series_uid = ? ORDER BY version DESC LIMIT 1",
                (inst.series_uid,),
            ).fetchone()
            if old is not None and old["sha256"] == inst.sha256 and job is not None:
                return "duplicate", job["id"]
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (inst.sop_uid, inst.series_uid, inst.study_uid, inst.sop_class_uid, inst.path, inst.size,
                 inst.sha256, inst.calling_ae, inst.peer, now),
            )  # fmt: skip
            if job is not None and job["state"] in ("receiving", "queued"):
                job_id = job["id"]
                db.execute(
                    "UPDATE jobs SET state = 'receiving', last_instance_at = ?, updated_at = ? WHERE id = ?",
                    (now, now, job_id),
                )
                if job["state"] == "queued":
                    events.append(
                        self._event(db, job_id, "receiving", note="late instance joined the queued job")
                    )
            else:
                version = 1 if job is None else job["version"] + 1
                cur = db.execute(
                    "INSERT INTO jobs (series_uid, study_uid, version, state, created_at, updated_at, "
                    "last_instance_at) VALUES (?, ?, ?, 'receiving', ?, ?, ?)",
                    (inst.series_uid, inst.study_uid, version, now, now, now),
                )
                job_id = int(cur.lastrowid)
                note = None if job is None else f"instance after version {job['version']} was {job['state']}"
                events.append(self._event(db, job_id, "receiving", note=note))
        self._emit(events)
        return ("new" if old is None else "replaced"), job_id

    def refuse_series(self, series_uid: str, reason: str) -> None:
        """Refuse the series' open version (``receiving``/``queued``) with ``reason`` (it grew too big)."""
        events = []
        with self.transaction() as db:
            for row in db.execute(
                "SELECT id FROM jobs WHERE series_uid = ? AND state IN ('receiving', 'queued')", (series_uid,)
            ).fetchall():
                events.append(self._set_state(db, row["id"], "refused", reason=reason))
        self._emit(events)

    # ------------------------------------------------------------------ the stabiliser

    def queue_stable(self, stable_seconds: float, now: float | None = None) -> list[int]:
        """``receiving`` → ``queued`` for every version without a new instance for ``stable_seconds``."""
        now = time.time() if now is None else now
        events = []
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE state = 'receiving' AND last_instance_at <= ?",
                (now - stable_seconds,),
            ).fetchall()
            events = [self._set_state(db, row["id"], "queued") for row in rows]
        self._emit(events)
        return [row["id"] for row in rows]

    def hold_receiving(self) -> None:
        """Give every ``receiving`` series a full stable period from now: called when a restarted node listens
        again (a peer whose association died with the node may be sending the rest; a half series must not
        be queued the moment the node is back)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET last_instance_at = ? WHERE state = 'receiving'", (time.time(),))

    # ------------------------------------------------------------------ workers: segmenting

    def claim_job(self) -> Job | None:
        """Take the oldest ``queued`` job: ``running``, attempts + 1, its instance set fixed — in one
        transaction, so no two workers take one job."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT id, series_uid FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM job_instances WHERE job_id = ?", (row["id"],))
            db.execute(
                "INSERT INTO job_instances SELECT ?, sop_uid, path FROM instances WHERE series_uid = ?",
                (row["id"], row["series_uid"]),
            )
            db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", (row["id"],))
            event = self._set_state(db, row["id"], "running")
            job = Job.from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())
        self._emit([event])
        return job

    def job_instances(self, job_id: int) -> list[tuple[str, str]]:
        """``(sop_uid, spool path)`` of a claimed version, sorted by SOP UID."""
        rows = self.db.execute(
            "SELECT sop_uid, path FROM job_instances WHERE job_id = ? ORDER BY sop_uid", (job_id,)
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def job(self, job_id: int) -> Job:
        return Job.from_row(self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def jobs(self, state: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", ()
        if state is not None:
            query, args = query + " WHERE state = ?", (state,)
        return [Job.from_row(r) for r in self.db.execute(query + " ORDER BY id", args).fetchall()]

    def segmented(self, job_id: int, case_name: str, outputs: list[str], destinations: list[str]) -> str:
        """``running`` → ``sending`` with one pending delivery per destination (→ ``done`` when none)."""
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
            for dest in destinations:
                db.execute(
                    "INSERT INTO deliveries (job_id, destination, state, next_attempt_at, updated_at) "
                    "VALUES (?, ?, 'pending', ?, ?)",
                    (job_id, dest, now, now),
                )
            state = "sending" if destinations and outputs else "done"
            event = self._set_state(
                db,
                job_id,
                state,
                case_name=case_name,
                outputs=json.dumps(outputs),
                last_error=None,
                reason=None,
            )
        self._emit([event])
        return state

    def end_job(self, job_id: int, state: str, message: str) -> None:
        """``refused`` (``reason``) or ``failed`` (``last_error``) with a one-line message."""
        field = "reason" if state == "refused" else "last_error"
        with self.transaction() as db:
            event = self._set_state(db, job_id, state, **{field: message})
        self._emit([event])

    # ------------------------------------------------------------------ workers: sending

    def claim_delivery(self, now: float | None = None) -> Delivery | None:
        """Take the most overdue ``pending`` delivery whose time has come (→ ``sending``), or None."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute(
                "SELECT d.job_id, d.destination, d.attempts, j.outputs FROM deliveries d JOIN jobs j "
                "ON j.id = d.job_id WHERE d.state = 'pending' AND d.next_attempt_at <= ? AND j.state = 'sending' "
                "ORDER BY d.next_attempt_at LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE deliveries SET state = 'sending', updated_at = ? WHERE job_id = ? AND destination = ?",
                (now, row[0], row[1]),
            )
        return Delivery(row[0], row[1], row[2], tuple(json.loads(row[3])))

    def next_delivery_at(self) -> float | None:
        """When the earliest pending delivery is due (None: none pending)."""
        row = self.db.execute(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending'"
        ).fetchone()
        return row[0]

    def delivered(self, job_id: int, destination: str, sop_uids: list[str]) -> None:
        """A delivery succeeded; the job is ``done`` once all its deliveries are."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'done', attempts = attempts + 1, sop_uids = ?, last_error = NULL, "
                "updated_at = ? WHERE job_id = ? AND destination = ?",
                (json.dumps(sorted(sop_uids)), now, job_id, destination),
            )
            events = self._settle(db, job_id)
        self._emit(events)

    def delivery_failed(
        self, job_id: int, destination: str, error: str, max_attempts: int, base_seconds: float
    ) -> float | None:
        """A delivery attempt failed: retry after an exponential backoff, or ``failed`` after
        ``max_attempts``; the job becomes ``send-failed`` when no delivery is left to try. Returns the next
        attempt time (None: no more)."""
        now = time.time()
        with self.transaction() as db:
            attempts = (
                1
                + db.execute(
                    "SELECT attempts FROM deliveries WHERE job_id = ? AND destination = ?",
                    (job_id, destination),
                ).fetchone()[0]
            )
            give_up = attempts >= max_attempts
            at = None if give_up else now + backoff_seconds(attempts, base_seconds)
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?, updated_at = ? "
                "WHERE job_id = ? AND destination = ?",
                ("failed" if give_up else "pending", attempts, at or now, error, now, job_id, destination),
            )
            events = [self._event(db, job_id, "sending", destination=destination, attempt=attempts,
                                  error=error, retry_at=at)]  # fmt: skip
            events += self._settle(db, job_id)
        self._emit(events)
        return at

    def _settle(self, db: sqlite3.Connection, job_id: int) -> list[dict]:
        states = [r[0] for r in db.execute("SELECT state FROM deliveries WHERE job_id = ?", (job_id,))]
        if any(s in ("pending", "sending") for s in states):
            return []
        if all(s == "done" for s in states):
            return [self._set_state(db, job_id, "done", last_error=None)]
        failed = db.execute(
            "SELECT destination, last_error FROM deliveries WHERE job_id = ? AND state = 'failed'", (job_id,)
        ).fetchall()
        error = "; ".join(f"{r[0]}: {r[1]}" for r in failed)
        return [self._set_state(db, job_id, "send-failed", last_error=error)]

    # ------------------------------------------------------------------ recovery, retry, status

    def recover(self) -> dict[str, int]:
        """After a crash (no other node runs on this work folder: the service holds its lock): jobs left
        ``running`` go back to ``queued``, deliveries left ``sending`` back to ``pending``."""
        now = time.time()
        with self.transaction() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            events = []
            for r in rows:
                if r["attempts"] >= MAX_RUN_ATTEMPTS:
                    error = (
                        f"the node stopped {r['attempts']} times while segmenting this series (killed or "
                        "crashed: out of memory?); not started again (medseg node retry)"
                    )
                    events.append(self._set_state(db, r["id"], "failed", last_error=error))
                else:
                    events.append(self._set_state(db, r["id"], "queued", note="recovered: was running"))
            sent = db.execute(
                "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, updated_at = ? WHERE state = 'sending'",
                (now, now),
            ).rowcount
        self._emit(events)
        return {"jobs": len(rows), "deliveries": sent}

    def retry(self, job_ids: list[int] | None = None) -> list[int]:
        """Re-queue ``failed`` jobs (segmenting again) and resend the failed deliveries of ``send-failed``
        ones (attempts reset); ``job_ids`` None: all of them. Returns the jobs changed."""
        now = time.time()
        events: list[dict] = []
        with self.transaction() as db:
            query = "SELECT id, state FROM jobs WHERE state IN ('failed', 'send-failed')"
            rows = db.execute(query).fetchall()
            chosen = [r for r in rows if job_ids is None or r["id"] in job_ids]
            for row in chosen:
                if row["state"] == "failed":
                    events.append(self._set_state(db, row["id"], "queued", attempts=0, note="retry"))
                    continue
                db.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ? "
                    "WHERE job_id = ? AND state = 'failed'",
                    (now, now, row["id"]),
                )
                events.append(self._set_state(db, row["id"], "sending", note="retry"))
        self._emit(events)
        return [r["id"] for r in chosen]

    def status(self) -> dict:
        """Jobs by state, queue depth, spool use, the last errors and per-destination failures."""
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update(
            {r[0]: r[1] for r in self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        )
        problems = [
            {"job": r["id"], "series": r["series_uid"], "version": r["version"], "state": r["state"],
             "message": r["reason"] or r["last_error"]}
            for r in self.db.execute(
                "SELECT * FROM jobs WHERE state IN ('refused', 'failed', 'send-failed') ORDER BY updated_at DESC "
                "LIMIT 10"
            )
        ]  # fmt: skip
        destinations = {}
        for r in self.db.execute(
            "SELECT destination, state, COUNT(*) AS n, MAX(last_error) AS error FROM deliveries "
            "GROUP BY destination, state"
        ):
            entry = destinations.setdefault(
                r["destination"], {"done": 0, "pending": 0, "sending": 0, "failed": 0}
            )
            entry[r["state"]] = r["n"]
            if r["state"] in ("failed", "pending") and r["error"]:
                entry["last_error"] = r["error"]
        return {
            "jobs": counts,
            "queue_depth": counts["receiving"] + counts["queued"],
            "instances": int(self.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]),
            "spool_bytes": self.spool_bytes(),
            "problems": problems,
            "destinations": destinations,
        }
