"""What ``medseg segment -i INPUT -m MODEL`` reads: the cases of a NIfTI file, a folder, a DICOM tree or a
``.zip``, and the checkpoint files of ``-m`` (:func:`resolve_checkpoints`).

>>> with opened_cases("export.zip", "out/") as cases:                   # doctest: +SKIP
...     print([(c.name, c.kind, c.status) for c in cases])
[('P1_20240101_2', 'dicom', 'ok'), ('P1_20240101_3', 'dicom', 'skipped'), ('ct_007', 'nifti', 'ok')]

INPUT may be

* **a NIfTI file** (``.nii`` / ``.nii.gz``): one case, named by the file (:func:`medseg.io.case_name`);
* **a folder**: the NIfTI files directly inside it (:func:`medseg.io.list_cases`, the rule of
  ``medseg evaluate``) *and* every DICOM image series anywhere below it (:func:`medseg.io.dicom.find_series`:
  grouped by SeriesInstanceUID, ordered along the slice normal, checked). A DICOM series folder, a PACS
  export tree with many series and a folder mixing NIfTI and DICOM files are all folders;
* **a DICOM file** (any other file that is DICOM): the series of that one file (refused: one slice);
* **a ``.zip``** of any of these, extracted by :func:`opened_cases` (below) and then read as a folder.

Every DICOM series is one case named ``PatientID_StudyDate_SeriesNumber`` (made filesystem-safe, and unique
among the series, by the reader). Series that are not CT (or localizers only) are listed with ``skipped``
set, series the reader refuses (gantry tilt, missing slices, …) with ``error`` set: a batch reports the first
as skipped and the second as failed cases, one line each. Should a DICOM case name equal a NIfTI case name
of the same folder (``P1_20240101_2.nii.gz`` beside that series), the series' name gets ``_`` and 8 hex
digits of the SHA-1 of its SeriesInstanceUID appended, so no two cases ever write one output file.

**Archives.** :func:`opened_cases` extracts a ``.zip`` into a temporary folder inside the output folder
(``.tmp-<pid>-<host>-unzip.<random>``: the same disk the masks go to, and the name of
:mod:`medseg.io.atomic`, so a killed run's folder is recognised as stale and removed by the next run, see
:func:`remove_stale_extractions`), and removes it when the block ends, also on error. What is extracted and
when an archive is refused is :mod:`medseg.io.archive`'s: the whole member list is judged first, then only
the NIfTI and DICOM members are extracted, within :class:`~medseg.io.archive.ArchiveLimits` (members, total
size, free disk, compression ratio); the members not read are named in the yielded list's ``notes``. Cases
from an archive are identified, for resuming, by the archive's path, size and modification time and the
member's path inside it, and their messages name ``<archive>/<member>``, never the temporary folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal

from medseg.io import InputError, is_nifti, list_cases
from medseg.io.archive import ArchiveLimits, extract_zip, is_zip
from medseg.io.atomic import TEMP_PREFIX, is_stale_temp, temp_prefix
from medseg.io.dicom import SeriesInfo, find_series

CaseKind = Literal["nifti", "dicom"]


@dataclass(frozen=True)
class CaseSource:
    """One case of a batch: a NIfTI file (``path``) or a DICOM series (``series``), and its case name.

    ``archive``/``root`` are set for cases extracted from a ``.zip``: ``root`` is the temporary folder the
    archive was extracted to, ``archive`` the ``.zip`` itself (see :meth:`shown`).
    """

    name: str
    kind: CaseKind
    path: Path | None = None
    series: SeriesInfo | None = None
    archive: Path | None = None
    root: Path | None = None

    @property
    def skipped(self) -> str | None:
        """Why the case is not segmented by policy (a DICOM series that is not CT), else None."""
        return self.series.skipped if self.series is not None else None

    @property
    def error(self) -> str | None:
        """Why the reader refused the case before any voxel was read (``<where>: <cause>``), else None."""
        if self.series is None or self.series.error is None:
            return None
        return self.shown(f"{self.series.where}: {self.series.error}")

    @property
    def status(self) -> Literal["ok", "skipped", "refused"]:
        return "skipped" if self.skipped else "refused" if self.error else "ok"

    @property
    def source(self) -> str:
        """The input as the user knows it: the NIfTI file or the series folder (inside the archive)."""
        where = self.path if self.kind == "nifti" else self.series.folder
        return self.shown(str(where))

    @property
    def label(self) -> str:
        """Short name for progress lines: the NIfTI file name, or the case name of a series."""
        return self.path.name if self.kind == "nifti" else self.name

    def member(self, path: Path) -> str:
        """``path`` relative to the extraction folder (POSIX), i.e. its member name in the archive."""
        return PurePosixPath(*Path(path).relative_to(self.root).parts).as_posix()

    def shown(self, text: str) -> str:
        """``text`` with the temporary extraction folder replaced by the archive's path."""
        if self.root is None:
            return text
        return text.replace(str(self.root), str(self.archive))


def source_stamp(path: str | os.PathLike) -> dict:
    """What identifies a file for resuming: absolute path, size and modification time (``st_mtime_ns``) —
    what ``make`` and ``rsync`` trust; cheap for a 500-scan folder, where hashing would read it all again."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def case_stamp(case: CaseSource) -> dict:
    """The identity of a case's input (a key of the sidecar, see :mod:`medseg.batch.run`).

    A NIfTI file: its :func:`source_stamp`. A DICOM series: its SeriesInstanceUID, the number of files and
    the SHA-256 of the list of every file's :func:`source_stamp` sorted by path (a changed, added or removed
    file changes it; the sidecar's ``dicom.files`` lists the files). From an archive: the archive's
    :func:`source_stamp` and the member names instead of the extracted files (whose temporary paths change
    every run).
    """
    if case.kind == "nifti":
        if case.archive is None:
            return source_stamp(case.path)
        return {"archive": source_stamp(case.archive), "member": case.member(case.path)}
    files = case.series.files
    stamp: dict = {"series_uid": case.series.series_uid, "files": len(files)}
    if case.archive is None:
        listing: list = sorted((source_stamp(p) for p in files), key=lambda s: s["path"])
    else:
        stamp["archive"] = source_stamp(case.archive)
        listing = sorted(case.member(p) for p in files)
    stamp["files_sha256"] = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    return stamp


def resolve_checkpoints(models: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The checkpoint files of ``-m`` values, in order: a file is itself; a folder gives its
    ``fold_K/best.pt`` (a cross-validation run, folds in numeric order; ``fold_all`` only when there is no
    numbered fold) when there are any, else — for a ``medseg train`` run folder (``best.pt``
    beside ``last.pt``) — its ``best.pt``, else every ``*.pt`` directly inside (sorted).

    Raises:
        InputError: nothing given, a path that does not exist, a folder without checkpoints, or one file
            given twice (an ensemble would weigh it double).
    """
    items = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    if not items:
        raise InputError("no checkpoint given (-m CHECKPOINT or -m FOLDER)")
    found: list[Path] = []
    for model in map(Path, items):
        if not model.exists():
            raise InputError(f"{model}: checkpoint not found")
        if not model.is_dir():
            found.append(model)
        elif folds := _fold_checkpoints(model):
            found += folds
        elif (model / "best.pt").is_file() and (model / "last.pt").is_file():
            found.append(model / "best.pt")
        elif files := sorted(p for p in model.glob("*.pt") if p.is_file()):
            found += files
        else:
            raise InputError(f"{model}: folder holds no checkpoint (fold_*/best.pt or *.pt)")
    seen: dict[Path, Path] = {}
    for path in found:
        real = path.resolve()
        if real in seen:
            raise InputError(f"{path}: checkpoint given twice (also as {seen[real]})")
        seen[real] = path
    return found


def _fold_checkpoints(run: Path) -> list[Path]:
    """``fold_0/best.pt``, ``fold_1/best.pt``, … of a cross-validation run folder (``fold_all/best.pt`` when
    there is no numbered fold: nnU-Net's ensemble is of the folds, ``all`` is a model of its own)."""
    numbered = [p for p in run.glob("fold_*/best.pt") if p.parent.name[5:].isdigit()]
    if numbered:
        return sorted(numbered, key=lambda p: int(p.parent.name[5:]))
    return [p for p in [run / "fold_all" / "best.pt"] if p.is_file()]


def _series_suffix(info: SeriesInfo) -> str:
    key = info.series_uid or "|".join(info.sop_instance_uids)
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def discover_cases(input_path: str | os.PathLike) -> list[CaseSource]:
    """The cases of ``input_path`` (a NIfTI file, a DICOM file, or a folder), sorted by case name.

    Skipped and refused DICOM series are included (:attr:`CaseSource.status`), so that a batch lists them.
    For a ``.zip`` use :func:`opened_cases`.

    Raises:
        InputError: the input does not exist, holds no case at all, a folder has two NIfTI files for one
            case, or a case name cannot be made unique.
    """
    input_path = Path(input_path)
    if not input_path.exists() and not input_path.is_symlink():
        raise InputError(f"{input_path}: input not found")
    if not input_path.is_dir() and is_nifti(input_path):
        return [CaseSource(name, "nifti", path=p) for name, p in list_cases(input_path).items()]
    nifti = list_cases(input_path) if input_path.is_dir() else {}
    cases = [CaseSource(name, "nifti", path=p) for name, p in nifti.items()]
    for info in find_series(input_path):
        if info.case in nifti:
            renamed = f"{info.case}_{_series_suffix(info)}"
            if renamed in nifti:
                raise InputError(
                    f"{input_path}: case name {info.case!r} is taken by both {nifti[info.case]} and the "
                    f"DICOM series in {info.folder}, and {renamed!r} too; rename one of the NIfTI files"
                )
            info = replace(info, case=renamed)
        cases.append(CaseSource(info.case, "dicom", series=info))
    if not cases:
        what = "folder" if input_path.is_dir() else "file"
        raise InputError(
            f"{input_path}: {what} holds no NIfTI file (.nii, .nii.gz) and no DICOM image series"
            + ("" if input_path.is_dir() else "; expected a NIfTI file, a DICOM file, a folder or a .zip")
        )
    return sorted(cases, key=lambda c: c.name)


def remove_stale_extractions(folder: str | os.PathLike) -> list[Path]:
    """Remove extraction folders of :func:`opened_cases` left in ``folder`` by runs that were killed (their
    writer process is dead: :func:`medseg.io.atomic.is_stale_temp`); a live run's folder stays."""
    folder = Path(folder)
    removed = []
    for path in sorted(folder.glob(f"{TEMP_PREFIX}*-unzip.*")) if folder.is_dir() else []:
        if path.is_dir() and not path.is_symlink() and is_stale_temp(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class CaseList(list):
    """The cases of an input (a ``list`` of :class:`CaseSource`), with ``notes``: one line each for the batch to
    show as a warning — the members of an archive that were not read (:meth:`Extraction.note`)."""

    notes: tuple[str, ...] = ()


@contextlib.contextmanager
def opened_cases(
    input_path: str | os.PathLike, work_folder: str | os.PathLike, *, limits: ArchiveLimits | None = None
) -> Iterator[CaseList]:
    """Yield the cases of ``input_path`` (:func:`discover_cases`); a ``.zip`` is first extracted into a
    temporary folder in ``work_folder`` (:func:`medseg.io.archive.extract_zip`, only its NIfTI and DICOM
    members, within ``limits``), removed when the block ends, also on error. The members not read are named
    in the yielded list's ``notes``.

    Raises:
        InputError: from :func:`discover_cases` or :func:`medseg.io.archive.extract_zip`.
    """
    input_path = Path(input_path)
    if not is_zip(input_path):
        yield CaseList(discover_cases(input_path))
        return
    if not input_path.is_file():
        raise InputError(f"{input_path}: input not found")
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(Path(work_folder) / "unzip"), dir=work_folder))
    try:
        try:
            found = extract_zip(input_path, tmp, limits=limits)
        except InputError as exc:  # "… but out/.tmp-…-unzip.x has 2.0 GiB free": the output folder's disk
            raise InputError(str(exc).replace(str(tmp), str(work_folder))) from None
        try:
            cases = discover_cases(found.folder)
        except InputError as exc:
            raise InputError(str(exc).replace(str(found.folder), str(input_path))) from None
        listed = CaseList(replace(c, archive=input_path, root=tmp) for c in cases)
        listed.notes = tuple(n for n in [found.note()] if n)
        yield listed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
