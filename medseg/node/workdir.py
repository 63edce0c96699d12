"""The node's work folder and its JSON log.

::

    WORKDIR/
      node.sqlite (+ -wal, -shm)   the job store (:mod:`medseg.node.store`)
      node.lock                    held (flock) by the serving process: one node per work folder
      spool/<study>/<series>/<sop>.dcm   received instances (:mod:`medseg.node.spool`)
      jobs/<job>/input/            a version's instances, hard links into the spool (the sidecars'
                                   ``dicom.files`` point here, so ``medseg export`` can redo a SEG later)
      jobs/<job>/out/              the batch core's own output folder for the version (staging)
      outputs/                     a ``medseg segment`` output folder: ``<case>.nii.gz``, ``<case>.json``,
                                   ``<case>_seg.dcm``, … (``medseg review WORKDIR/outputs`` works)
      logs/node.jsonl              one JSON object per line: job state changes, refusals, sends
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from medseg.io import InputError


@dataclass(frozen=True)
class WorkDir:
    """The paths of a node work folder (module docstring)."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "node.sqlite"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def log(self) -> Path:
        return self.root / "logs" / "node.jsonl"

    def job_input(self, job_id: int) -> Path:
        return self.jobs / str(job_id) / "input"

    def job_staging(self, job_id: int) -> Path:
        return self.jobs / str(job_id) / "out"

    def create(self) -> WorkDir:
        """Create the folders (a file in the way is one :class:`InputError` line)."""
        try:
            for folder in (self.root, self.spool, self.jobs, self.outputs, self.log.parent):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.root}: cannot create the work folder ({exc.strerror or exc})") from None
        return self

    def existing(self) -> WorkDir:
        """Self, when the work folder has a job store; else :class:`InputError`."""
        if not self.db.is_file():
            raise InputError(
                f"{self.root}: not a node work folder (no {self.db.name}; start medseg node serve)"
            )
        return self

    @contextlib.contextmanager
    def locked(self):
        """Hold ``node.lock`` (flock, released by the kernel when the process dies, also by SIGKILL).

        Raises:
            InputError: another live process serves this work folder.
        """
        fh = open(self.root / "node.lock", "a+")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                raise InputError(
                    f"{self.root}: another medseg node (pid {holder}) serves this work folder"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            yield
        finally:
            fh.close()


class EventLog:
    """Writes each event as one JSON line (with ``time``, UTC ISO 8601) to ``logs/node.jsonl`` and to
    ``stream`` (stdout); safe to call from every thread."""

    def __init__(self, path: Path, stream: IO[str] | None = sys.stdout) -> None:
        self.path, self.stream = path, stream
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")

    def __call__(self, event: dict) -> None:
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        line = json.dumps({"time": stamp, **event}, default=str)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
            if self.stream is not None:
                print(line, file=self.stream, flush=True)

    def close(self) -> None:
        with self._lock:
            self._fh.close()
