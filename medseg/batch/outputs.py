"""The files a batch writes for each case, and how a later run reads them back.

Per case ``<case>`` in the output folder: the mask ``<case>.nii.gz``, its sidecar ``<case>.json``
(:func:`sidecar_path`, :func:`read_sidecar`; the identity in it decides :func:`is_complete`), for DICOM cases
the sidecar's ``dicom`` block (:func:`dicom_block`), and with statistics ``<case>_stats.json``
(:func:`statistics_path`); for the folder, ``statistics.csv`` rebuilt from all of those
(:func:`write_statistics_table`). What goes into them and in which order is described in
:mod:`medseg.batch.run`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from medseg.batch.inputs import CaseSource
from medseg.io import case_name, is_nifti
from medseg.report.statistics import write_statistics_csv

STATISTICS_CSV = "statistics.csv"


def output_path_for(case: CaseSource, output: Path, single: bool) -> Path:
    """``output`` itself for a single NIfTI input and an ``output`` named ``*.nii[.gz]``, else
    ``output/<case>.nii.gz``."""
    if single and is_nifti(output):
        return output
    return output / f"{case.name}.nii.gz"


def sidecar_path(mask_path: Path) -> Path:
    """``<case>.json`` beside ``<case>.nii.gz``."""
    return mask_path.parent / f"{case_name(mask_path)}.json"


def statistics_path(mask_path: Path) -> Path:
    """``<case>_stats.json`` beside ``<case>.nii.gz``."""
    return mask_path.parent / f"{case_name(mask_path)}_stats.json"


def read_sidecar(mask_path: Path) -> dict | None:
    """The sidecar of a mask as a dict, or None when it is missing or not a JSON object."""
    try:
        side = json.loads(sidecar_path(mask_path).read_text())
    except (OSError, ValueError):
        return None
    return side if isinstance(side, dict) else None


#: Identity keys added after sidecars were first written, and the value a sidecar without them stands for:
#: every mask written before the back end was recorded came from PyTorch.
RECORDED_LATER = {"backend": "torch"}


def is_complete(mask_path: Path, identity: dict) -> bool:
    """Whether ``mask_path`` exists and its sidecar records exactly ``identity`` (see the module docstring); a key
    of :data:`RECORDED_LATER` missing from an older sidecar counts as its value there."""
    if not mask_path.is_file():
        return False
    side = read_sidecar(mask_path)
    if side is None:
        return False
    return all(side.get(key, RECORDED_LATER.get(key)) == value for key, value in identity.items())


def dicom_block(case: CaseSource) -> dict:
    """The sidecar's ``dicom`` entry: what a DICOM SEG export of this series needs. ``files`` are absolute
    paths in slice order (for a series from a ``.zip``: member names, with ``archive`` the archive)."""
    s = case.series
    block = {
        "study_uid": s.study_uid,
        "series_uid": s.series_uid,
        "frame_of_reference_uid": s.frame_of_reference_uid,
        "sop_instance_uids": list(s.sop_instance_uids),
        "files": [case.member(p) if case.archive else os.path.abspath(p) for p in s.files],
        "patient_id": s.patient_id,
        "study_date": s.study_date,
        "series_number": s.series_number,
        "series_description": s.series_description,
        "modality": s.modality,
        "notes": [case.shown(n) for n in s.notes],
    }
    if case.archive is not None:
        block["archive"] = os.path.abspath(case.archive)
    return block


def read_statistics(folder: Path) -> list[dict]:
    """The rows of every ``*_stats.json`` in ``folder`` written by a batch (an object with ``case`` and a
    ``rows`` list; other JSON files, e.g. a sidecar of a case named ``x_stats``, are not statistics)."""
    rows: list[dict] = []
    for path in sorted(folder.glob("*_stats.json")):
        if path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "case" in data and isinstance(data.get("rows"), list):
            rows += [r for r in data["rows"] if isinstance(r, dict)]
    return rows


def _statistics_files(folder: Path) -> list[tuple[str, int, int]]:
    """Name, mtime and size of every statistics file (what tells that one changed)."""
    found = []
    for path in folder.glob("*_stats.json"):
        with contextlib.suppress(FileNotFoundError):  # a concurrent redo deleted it
            st = path.stat()
            found.append((path.name, st.st_mtime_ns, st.st_size))
    return sorted(found)


def write_statistics_table(folder: Path) -> Path:
    """``folder/statistics.csv`` from every ``*_stats.json`` in ``folder`` (:func:`read_statistics`),
    written atomically, and written again while the statistics files changed meanwhile: of parts finishing
    at once, the one that replaces the table last has read every file the others wrote."""
    while True:
        before = _statistics_files(folder)
        path = write_statistics_csv(folder / STATISTICS_CSV, read_statistics(folder))
        if _statistics_files(folder) == before:
            return path
