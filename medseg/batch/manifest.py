"""The run manifest of a batch: ``OUTDIR/manifest.jsonl``, one JSON object per line, one line per case per run.

>>> with Manifest("pred/manifest.jsonl", part=0, num_parts=1) as manifest:       # doctest: +SKIP
...     manifest.append("ct_001", "in/ct_001.nii.gz", "nifti", "written", seconds=4.2)
>>> [e["status"] for e in read_manifest("pred/manifest.jsonl")]                # doctest: +SKIP
['written']

Each line: ``case``, ``source`` (the NIfTI file or the DICOM series folder), ``kind`` (``nifti`` |
``dicom``), ``status`` (:data:`STATUSES`), ``seconds`` (wall time of the case), ``error`` (the one-line
reason, or null), ``part`` and ``num_parts`` (:mod:`medseg.batch.sharding`), ``time`` (UTC, ISO 8601,
when the line was written) and ``pid``. A re-run appends; the file is the history of every run into that
folder.

**Appended atomically.** The file is opened with ``O_APPEND`` and every line goes out in one ``os.write``
call: the kernel moves the end-of-file and writes the bytes as one step, so lines of parts running at once
(and of a killed run) never interleave or overwrite each other — on a local POSIX file system. (NFS does
not honour ``O_APPEND`` across machines; parts on several machines should write to a local manifest or
accept that lines may be lost there.) A reader skips a last line cut short (:func:`read_manifest`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

#: What happened to a case in one run: ``claimed`` — left to another live run segmenting it
#: (:mod:`medseg.io.claims`); ``failed-export`` — mask written, a viewer file (DICOM SEG) could not be.
STATUSES = ("written", "skipped", "failed", "skipped-modality", "claimed", "failed-export")
Status = Literal["written", "skipped", "failed", "skipped-modality", "claimed", "failed-export"]
MANIFEST_NAME = "manifest.jsonl"


class Manifest:
    """An open ``manifest.jsonl`` that one run appends to; use as a context manager (closes the file)."""

    def __init__(self, path: str | os.PathLike, part: int = 0, num_parts: int = 1) -> None:
        self.path = Path(path)
        self.part, self.num_parts = part, num_parts
        mode = 0o666 & ~_umask()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)

    def append(
        self,
        case: str,
        source: str,
        kind: str,
        status: Status,
        seconds: float = 0.0,
        error: str | None = None,
    ) -> dict:
        """Append one line (a single ``os.write``) and return the entry written."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        entry = {
            "case": case,
            "source": source,
            "kind": kind,
            "status": status,
            "seconds": round(float(seconds), 3),
            "error": error,
            "part": self.part,
            "num_parts": self.num_parts,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "pid": os.getpid(),
        }
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk; the reader drops the cut line
            raise OSError(f"{self.path}: only {written} of {len(line)} bytes of a manifest line written")
        return entry

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_manifest(path: str | os.PathLike) -> Iterator[dict]:
    """The entries of a manifest in file order; lines that are not a JSON object (a write cut by a full
    disk or a crash) are skipped. A missing file has no entries."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            yield entry
