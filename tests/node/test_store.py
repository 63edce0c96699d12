"""The job store: schema and pragmas, states, versioning of late instances, one claim per job under
concurrency, the durable retry schedule, recovery and retry."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from medseg.node.retry import backoff_seconds
from medseg.node.store import MAX_RUN_ATTEMPTS, SCHEMA_VERSION, Instance, Store, StoreError


def _inst(sop: str, series: str = "1.2.3", sha: str = "a", size: int = 100) -> Instance:
    return Instance(
        sop, series, "1.2", "1.2.840.10008.5.1.4.1.1.2", f"/spool/{sop}.dcm", size, sha, "SCU", "127.0.0.1"
    )


@pytest.fixture
def store(tmp_path):
    events: list[dict] = []
    with Store(tmp_path / "node.sqlite", log_event=events.append) as s:
        s.events = events
        yield s


def test_a_real_sqlite_file_in_wal_mode_with_a_schema_version(tmp_path, store):
    db = sqlite3.connect(tmp_path / "node.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"instances", "jobs", "job_instances", "deliveries", "meta"} <= tables
    db.execute("UPDATE meta SET value = ? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this medseg"):
        Store(tmp_path / "node.sqlite")


def test_not_a_database_is_one_line(tmp_path):
    (tmp_path / "node.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match=r"node\.sqlite: not a medseg node database"):
        Store(tmp_path / "node.sqlite")


def test_states_receiving_queued_running_sending_done(store):
    assert store.record_instance(_inst("1.1"), now=100.0) == ("new", 1)
    assert store.record_instance(_inst("1.2"), now=101.0) == ("new", 1)
    assert store.queue_stable(10, now=105.0) == []  # not quiet long enough
    assert store.queue_stable(10, now=111.0) == [1]
    job = store.claim_job()
    assert (job.state, job.version, job.attempts) == ("running", 1, 1)
    assert [s for s, _ in store.job_instances(1)] == ["1.1", "1.2"]
    assert store.segmented(1, "case_v1", ["/out/a_seg.dcm"], ["dimse://PACS@h:104"]) == "sending"
    delivery = store.claim_delivery()
    assert (delivery.job_id, delivery.destination, delivery.outputs) == (
        1,
        "dimse://PACS@h:104",
        ("/out/a_seg.dcm",),
    )
    assert store.claim_delivery() is None  # taken
    store.delivered(1, "dimse://PACS@h:104", ["9.9"])
    assert store.job(1).state == "done"
    states = [e["state"] for e in store.events if e["event"] == "job"]
    assert states == ["receiving", "queued", "running", "sending", "done"]


def test_late_instance_after_claim_starts_a_new_version_with_all_instances(store):
    store.record_instance(_inst("1.1"), now=0.0)
    store.queue_stable(0, now=1.0)
    v1 = store.claim_job()
    what, job_id = store.record_instance(_inst("1.2"), now=2.0)  # arrives while v1 runs
    assert what == "new" and job_id != v1.id
    v2 = store.job(job_id)
    assert (v2.series_uid, v2.version, v2.state) == ("1.2.3", 2, "receiving")
    assert [s for s, _ in store.job_instances(v1.id)] == ["1.1"]  # v1's set never changes
    store.segmented(v1.id, "c_v1", [], [])
    store.queue_stable(0, now=3.0)
    assert store.claim_job().id == v2.id
    assert [s for s, _ in store.job_instances(v2.id)] == ["1.1", "1.2"]  # all of the series
    assert store.job(v1.id).state == "done"  # the old version stays done


def test_instance_while_queued_joins_the_queued_job(store):
    store.record_instance(_inst("1.1"), now=0.0)
    store.queue_stable(0, now=1.0)
    assert store.record_instance(_inst("1.2"), now=2.0) == ("new", 1)
    assert store.job(1).state == "receiving"  # waits to be quiet again
    assert len(store.jobs()) == 1


def test_identical_resend_changes_nothing_but_changed_bytes_make_a_new_version(store):
    store.record_instance(_inst("1.1", sha="a"), now=0.0)
    store.queue_stable(0, now=1.0)
    store.claim_job()
    store.segmented(1, "c", [], [])
    assert store.record_instance(_inst("1.1", sha="a"), now=2.0) == ("duplicate", 1)
    assert len(store.jobs()) == 1
    what, job_id = store.record_instance(_inst("1.1", sha="b"), now=3.0)
    assert what == "replaced" and store.job(job_id).version == 2
    assert store.spool_bytes() == 100  # the replaced instance counts once


def test_two_workers_never_take_one_job(tmp_path):
    path = tmp_path / "node.sqlite"
    with Store(path) as s:
        for n in range(40):
            s.record_instance(_inst(f"1.{n + 1}", series=f"2.{n + 1}"), now=0.0)
        s.queue_stable(0, now=1.0)
    taken: dict[str, list[int]] = {"a": [], "b": []}

    def worker(name: str) -> None:
        with Store(path) as mine:
            while (job := mine.claim_job()) is not None:
                taken[name].append(job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both = taken["a"] + taken["b"]
    assert sorted(both) == list(range(1, 41)) and len(set(both)) == 40


def test_send_retries_back_off_then_send_failed_then_retry(store):
    store.record_instance(_inst("1.1"), now=0.0)
    store.queue_stable(0, now=1.0)
    store.claim_job()
    store.segmented(1, "c", ["/o_seg.dcm"], ["dimse://A@h:1", "dimse://B@h:2"])
    store.delivered(1, "dimse://B@h:2", ["9.9"])
    waits = []
    for _ in range(3):
        store.db.execute("UPDATE deliveries SET next_attempt_at = 0 WHERE state = 'pending'")
        d = store.claim_delivery()
        assert d.destination == "dimse://A@h:1"
        at = store.delivery_failed(1, d.destination, "connection refused", 3, 10.0)
        waits.append(at)
        assert store.job(1).state == ("sending" if at else "send-failed")
    assert waits[2] is None and waits[1] - waits[0] > 9  # 10 s then 20 s
    assert "dimse://A@h:1: connection refused" in store.job(1).last_error
    status = store.status()
    assert status["jobs"]["send-failed"] == 1
    assert status["destinations"]["dimse://A@h:1"]["failed"] == 1
    assert status["destinations"]["dimse://B@h:2"]["done"] == 1
    assert store.retry() == [1]
    assert store.job(1).state == "sending"
    d = store.claim_delivery()
    assert (d.destination, d.attempts) == ("dimse://A@h:1", 0)  # only the failed one, attempts reset
    store.delivered(1, d.destination, ["9.9"])
    assert store.job(1).state == "done"


def test_backoff_is_exponential_and_capped():
    assert [backoff_seconds(n, 5.0) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff_seconds(30, 30.0) == 3600.0


def test_recover_requeues_running_and_resends_sending_but_stops_a_crashing_job(store):
    store.record_instance(_inst("1.1"), now=0.0)
    store.record_instance(_inst("2.1", series="2.2"), now=0.0)
    store.queue_stable(0, now=1.0)
    store.claim_job()
    store.claim_job()
    store.segmented(2, "c", ["/o_seg.dcm"], ["dimse://A@h:1"])
    store.claim_delivery()
    assert store.recover() == {"jobs": 1, "deliveries": 1}
    assert store.job(1).state == "queued" and store.claim_delivery().job_id == 2
    for _ in range(MAX_RUN_ATTEMPTS - 1):  # the same job kills the node again and again
        store.claim_job()
        store.recover()
    assert store.job(1).state == "failed" and "stopped 3 times" in store.job(1).last_error
    assert store.retry([1]) == [1] and store.job(1).state == "queued"
