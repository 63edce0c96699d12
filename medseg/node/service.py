"""``medseg node serve``: the Storage SCP, the stabiliser and the workers in one process.

**Threads, not processes.** One process holds the SCP (pynetdicom runs one thread per association), the
stabiliser (the main thread: every :data:`TICK_S` it moves series quiet for ``stable_seconds`` to
``queued``) and ``workers`` worker threads (:func:`medseg.node.worker.work_once`). Threads because the
heavy work — torch's convolutions, SimpleITK's decoding, zlib — runs outside the GIL, the threads share
nothing but the SQLite file (one connection each), and one process is one thing to supervise, signal and
account for (its peak RSS is the node's). torch's intra-op threads are set to ``cpu_count // workers`` so N
workers do not oversubscribe the cores (2 cores, 1 worker: 2 threads).

**Start-up recovery** (:func:`recover`), under the work folder's lock (one node per folder, so whatever is
``running`` was left by a dead process): stale temporary files (:func:`medseg.io.atomic.remove_stale_temps`)
are removed from the spool and the outputs; spool files that were written but not recorded (killed between
the two) are recorded when they are whole, valid CT instances at the right path — the peer was never told
success and may send them again, which then changes nothing — and removed otherwise; jobs left ``running``
go back to ``queued`` and deliveries left ``sending`` back to ``pending``
(:meth:`medseg.node.store.Store.recover`); once the port listens again, series still ``receiving`` get a
full stable period (:meth:`~medseg.node.store.Store.hold_receiving`).

**Shutdown.** SIGTERM or SIGINT (the first; later ones are ignored, as in ``medseg segment``): no new
association is accepted, open ones end, each worker finishes the unit it is in (segmenting one version or
one send attempt) and records it, and :func:`serve` returns the signal number, which the command turns
into exit code 128 + signal (143 / 130), like every medseg command. SIGKILL loses nothing either: the next
start recovers. ``once``: serve until idle — no association for ``stable_seconds``, nothing receiving,
queued, running or being sent — then return 0 (for scripts and tests: the PACS has ``stable_seconds``
from the start to begin sending).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from medseg.io.atomic import remove_stale_temps
from medseg.node.scp import ScpConfig, StorageScp
from medseg.node.spool import valid_uid
from medseg.node.store import Instance, Store
from medseg.node.workdir import EventLog, WorkDir
from medseg.node.worker import WorkerConfig, work_once

#: Seconds between two passes of the stabiliser (and a worker's nap when there is nothing to do).
TICK_S = 0.25


@dataclass(frozen=True)
class NodeConfig:
    """A node: where it works, how it listens, what its workers do, when a series is complete."""

    workdir: Path
    scp: ScpConfig = field(default_factory=ScpConfig)
    worker: WorkerConfig | None = None
    stable_seconds: float = 10.0
    workers: int = 1
    once: bool = False


def recover(workdir: WorkDir, store: Store, log) -> dict:
    """The start-up recovery of the module docstring; returns what it did (also logged)."""
    import pydicom
    from pydicom.uid import CTImageStorage

    removed = remove_stale_temps(workdir.outputs)
    known = {r[0] for r in store.db.execute("SELECT sop_uid FROM instances")}
    recorded = dropped = 0
    for folder in sorted(p for p in workdir.spool.glob("*/*") if p.is_dir()):
        removed += remove_stale_temps(folder)
        for path in sorted(folder.glob("*.dcm")):
            if path.stem in known:
                continue
            study, series, sop = folder.parent.name, folder.name, path.stem
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                ok = all(valid_uid(u) for u in (study, series, sop)) and (
                    ds.SOPInstanceUID,
                    ds.SeriesInstanceUID,
                    ds.StudyInstanceUID,
                    ds.SOPClassUID,
                ) == (sop, series, study, CTImageStorage)
            except Exception:
                ok = False
            if not ok:
                path.unlink(missing_ok=True)
                dropped += 1
                continue
            from medseg.node.spool import file_sha256

            size = path.stat().st_size
            store.record_instance(
                Instance(
                    sop, series, study, CTImageStorage, str(path), size, file_sha256(path), peer="recovered"
                )
            )
            recorded += 1
    state = store.recover()
    done = {"temps_removed": len(removed), "spool_recorded": recorded, "spool_removed": dropped, **state}
    log({"event": "recovered", **done})
    return done


def _idle(store: Store, scp: StorageScp, stable_seconds: float) -> bool:
    """Nothing received for ``stable_seconds`` (counted from the start before the first association) and no
    job or delivery left to do."""
    if scp.active_associations or time.monotonic() - scp.last_activity < stable_seconds:
        return False
    busy = store.db.execute(
        "SELECT (SELECT COUNT(*) FROM jobs WHERE state IN ('receiving', 'queued', 'running', 'sending')) + "
        "(SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'sending'))"
    ).fetchone()[0]
    return busy == 0


def _worker_loop(workdir: WorkDir, config: WorkerConfig, log, stop: threading.Event) -> None:
    with Store(workdir.db, log_event=log) as store:
        while not stop.is_set():
            try:
                did = work_once(store, workdir, config, log)
            except Exception as exc:  # the store itself failed (disk): say so, wait, try again
                log({"event": "worker-error", "error": f"{type(exc).__name__}: {exc}"})
                did = False
            if not did:
                stop.wait(TICK_S)


class _Signals:
    """The first SIGTERM/SIGINT sets ``stop`` and is remembered; later ones are ignored (main thread only)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop, self.signum, self.previous = stop, 0, {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)
        self.signum = signum
        self.stop.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def serve(config: NodeConfig, stream: IO[str] | None = sys.stdout) -> int:
    """Run the node until a signal (or, with ``once``, until idle); return the signal number, 0 for none.

    Raises:
        InputError: the work folder cannot be created or another node serves it; the port cannot be bound.
    """
    from medseg.io import InputError

    workdir = WorkDir(Path(config.workdir)).create()
    with workdir.locked():
        log = EventLog(workdir.log, stream)
        store = Store(workdir.db, log_event=log)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        scp = StorageScp(workdir.spool, workdir.db, config.scp, log)
        try:
            recover(workdir, store, log)
            if config.worker is not None:
                import torch

                torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))
            try:
                port = scp.start()
            except OSError as exc:
                where = f"{config.scp.host}:{config.scp.port}"
                raise InputError(f"{where}: cannot listen ({exc.strerror or exc})") from None
            store.hold_receiving()
            log({"event": "listening", "ae_title": config.scp.ae_title, "host": config.scp.host, "port": port,
                 "pid": os.getpid(), "workers": config.workers if config.worker else 0})  # fmt: skip
            for i in range(config.workers if config.worker is not None else 0):
                thread = threading.Thread(
                    target=_worker_loop, args=(workdir, config.worker, log, stop), name=f"node-worker-{i}"
                )
                thread.start()
                threads.append(thread)
            with _Signals(stop) as signals:
                while not stop.is_set():
                    store.queue_stable(config.stable_seconds)
                    if config.once and _idle(store, scp, config.stable_seconds):
                        break
                    stop.wait(TICK_S)
                stop.set()
                scp.stop()
                for thread in threads:
                    thread.join()
            log({"event": "stopped", "signal": signals.signum or None, **store.status()["jobs"]})
            return signals.signum
        finally:
            stop.set()
            scp.stop()
            for thread in threads:
                thread.join()
            store.close()
            log.close()
