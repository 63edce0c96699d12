"""Pull a batch's input from a DICOMweb server into a hidden folder of the output folder, and clean it up.

``medseg segment -i dicomweb+https://host/dicom-web --study UID -o OUT`` (or ``--study-date …`` for a QIDO
search) uses :func:`pulled_series`: the CT series found (:func:`medseg.network.dicomweb.find_series`) are
fetched (:func:`~medseg.network.dicomweb.retrieve_series`) into ``OUT/.dicomweb-<hash>/<series_uid>/``, the
batch core reads that folder like any DICOM folder, and the folder is removed when the block ends — also on
error or on SIGINT/SIGTERM (the CLI turns those into an exception, so ``finally`` runs), like the extraction
folder of a ``.zip`` input. ``<hash>`` covers the query, the process and the host, so two runs never share
one; a folder whose writer died (``kill -9``) is removed by the next pull into the same output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medseg.io import InputError
from medseg.io.atomic import STALE_AFTER_S, process_alive
from medseg.network.credentials import Credentials
from medseg.network.destinations import parse_dicomweb_url
from medseg.network.dicomweb import PullLimits, check_study_date, check_uid, find_series, retrieve_series

#: ``-i`` values that name a DICOMweb server rather than a file.
SOURCE_SCHEMES = ("dicomweb+http://", "dicomweb+https://")
PULL_PREFIX = ".dicomweb-"
_OWNER = "owner"


def is_dicomweb_source(text: str | os.PathLike) -> bool:
    """True for ``dicomweb+http(s)://…``."""
    return str(text).lower().startswith(SOURCE_SCHEMES)


@dataclass(frozen=True)
class PullQuery:
    """What to fetch: one study's series of ``modality``, or those of the studies in ``study_date``."""

    url: str
    study_uid: str | None = None
    modality: str = "CT"
    study_date: str | None = None
    limit: int = 1000

    def __post_init__(self) -> None:
        url = self.url[len("dicomweb+") :] if is_dicomweb_source(self.url) else self.url
        object.__setattr__(self, "url", parse_dicomweb_url(url)[0])
        if self.study_uid is not None:
            check_uid(self.study_uid, "--study", self.url)
            if self.study_date:
                raise InputError("--study and --study-date: give one of them")
        elif not self.study_date:
            raise InputError(
                f"{self.url}: give --study UID or --study-date YYYYMMDD[-YYYYMMDD] to choose studies"
            )
        if self.study_date:
            check_study_date(self.study_date)

    def describe(self) -> str:
        what = f"study {self.study_uid}" if self.study_uid else f"studies of {self.study_date}"
        return f"{self.modality} series of {what} from {self.url}"


def remove_stale_pulls(folder: Path) -> list[Path]:
    """Remove ``.dicomweb-*`` folders in ``folder`` whose writer (recorded in ``owner``) is dead on this host,
    or that carry no owner and are older than a day."""
    removed = []
    for path in sorted(folder.glob(f"{PULL_PREFIX}*")) if folder.is_dir() else []:
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            pid, host = (path / _OWNER).read_text().split(maxsplit=1)
            stale = host.strip() == socket.gethostname() and not process_alive(int(pid))
        except (OSError, ValueError):
            stale = time.time() - path.lstat().st_mtime > STALE_AFTER_S
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def pulled_series(
    query: PullQuery,
    output: str | os.PathLike,
    *,
    credentials: Credentials | None = None,
    limits: PullLimits = PullLimits(),
    log: Callable[[str], object] = print,
) -> Iterator[Path]:
    """Fetch the series ``query`` selects into a hidden folder of ``output``; yield it; remove it afterwards.

    Raises:
        DicomwebError / InputError: the server or its answers (one line); no series found.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if removed := remove_stale_pulls(output):
        log(f"removed {len(removed)} DICOMweb download folder(s) of an interrupted run in {output}")
    key = f"{query}\n{os.getpid()}\n{socket.gethostname()}\n{time.time_ns()}"
    folder = output / f"{PULL_PREFIX}{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    folder.mkdir()
    try:
        (folder / _OWNER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        found = find_series(
            query.url,
            study_uid=query.study_uid,
            modality=query.modality,
            study_date=query.study_date,
            credentials=credentials,
            limit=query.limit,
        )
        if not found:
            raise InputError(f"{query.url}: no {query.describe()[: -len(' from ' + query.url)]} found")
        log(f"retrieving {len(found)} {query.describe()}")
        for ref in found:
            series_dir = retrieve_series(
                query.url, ref.study_uid, ref.series_uid, folder, credentials=credentials, limits=limits
            )
            log(f"retrieved series {ref.series_uid} ({sum(1 for _ in series_dir.glob('*.dcm'))} instances)")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
