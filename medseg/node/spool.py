"""The spool: where received instances wait, as ``spool/<study>/<series>/<sop>.dcm``, and the UID check
that makes those paths safe.

A path is built only from UIDs that :func:`valid_uid` accepted (DICOM PS3.5 §9.1: at most 64 characters,
components of digits separated by ``.``, no leading zero in a component other than ``0`` itself), so no peer
can name a file outside the spool (``..``, ``/``, NUL and every other character are refused before a path
exists). Files are written by :func:`write_instance`: a temporary name in the series folder
(:func:`medseg.io.atomic.atomic_path`), fsync, rename — the instance is either entirely there or not at all.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from medseg.io.atomic import atomic_path

#: PS3.5 §9.1 UID: components ``0`` or a digit string not starting with 0, joined by ``.``; 64 chars at most.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX_LEN = 64


def valid_uid(value: object) -> bool:
    """Whether ``value`` is a valid DICOM UID string (PS3.5 §9.1)."""
    return isinstance(value, str) and 0 < len(value) <= UID_MAX_LEN and _UID.fullmatch(value) is not None


def spool_path(spool: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """``spool/<study>/<series>/<sop>.dcm``.

    Raises:
        ValueError: a UID that is not valid (the caller checks first; this is the last guard).
    """
    for uid in (study_uid, series_uid, sop_uid):
        if not valid_uid(uid):
            raise ValueError(f"not a valid DICOM UID: {uid!r}")
    return spool / study_uid / series_uid / f"{sop_uid}.dcm"


def write_instance(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically and durably (fsync of the file before the rename, of the folder
    after it: the peer is told success only once the instance survives a power cut); return its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
