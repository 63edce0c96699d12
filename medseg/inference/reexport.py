"""``medseg export``: viewer files for cases a batch already segmented, from the mask and its sidecar alone.

A ``medseg segment`` output folder holds, per case, ``<case>.nii.gz`` and the sidecar ``<case>.json``
(:mod:`medseg.inference.outputs`). Everything a DICOM SEG, a Slicer ``.seg.nrrd`` or per-organ masks need is
there — no network runs again:

* the label map and its geometry: the mask (written in the scan's exact shape and affine);
* label names: the sidecar's ``labels``;
* the source series of a DICOM case: the sidecar's ``dicom`` block (series UID, the files in slice order, or
  the ``.zip`` they came from). The series is found again at its recorded folder (or archive) and matched by
  Series Instance UID; :func:`medseg.export.dicom_seg.write_dicom_seg` then checks that the mask lies on that
  series' grid and reads the written SEG back voxel for voxel, as on a first write;
* algorithm identification: the sidecar's ``checkpoints`` and ``checkpoint_sha256``.

The sidecar's ``exports`` entry gets the new files and its ``warnings`` the new notes (atomically rewritten).
The identity keys that decide whether ``segment`` skips a complete case are left as they were, so a later
``medseg segment`` into the same folder still recognises its cases. A case that cannot be exported (moved
source series, a mask that no longer matches it) fails alone, with one line naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.inference.exports import parse_output_types, write_case_exports, write_folder_exports
from medseg.inference.inputs import CaseSource, opened_cases
from medseg.inference.outputs import read_sidecar
from medseg.inference.predictor import Prediction
from medseg.io import InputError, atomic_write_text, case_name
from medseg.io.atomic import remove_stale_temps


@dataclass
class ExportReport:
    """What :func:`export_outputs` did: cases exported, failed (case → one-line reason), warnings per case."""

    exported: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)


def segmented_cases(folder: Path) -> list[Path]:
    """Masks ``<case>.nii.gz`` of ``folder`` that have a sidecar with label names, by name."""
    masks = []
    for path in sorted(folder.glob("*.nii.gz")):
        side = read_sidecar(path)
        if side is not None and isinstance(side.get("labels"), dict) and side.get("case") == case_name(path):
            masks.append(path)
    return masks


def _series_source(mask: Path, block: dict) -> tuple[Path, str]:
    """The input to reopen for a DICOM case (its archive, or its series folder) and the series UID."""
    uid = block.get("series_uid")
    files = block.get("files") or []
    if not uid or not files:
        raise InputError(f"{mask}: the sidecar's dicom block names no series UID or files")
    if block.get("archive"):
        return Path(block["archive"]), str(uid)
    return Path(files[0]).parent, str(uid)


def _find_series(mask: Path, block: dict, work: Path, stack) -> CaseSource:
    where, uid = _series_source(mask, block)
    if not where.exists():
        raise InputError(f"{mask}: source series not found at {where} (moved or deleted?)")
    cases = stack.enter_context(opened_cases(where, work))
    for case in cases:
        if case.kind == "dicom" and case.series.series_uid == uid:
            return case
    raise InputError(f"{mask}: series {uid} is no longer in {where}")


def export_outputs(
    folder: str | os.PathLike,
    output_types: str = "dicom-seg",
    split: bool = False,
    log: Callable[[str], object] = print,
) -> ExportReport:
    """Write ``output_types`` (``dicom-seg``, ``dicom-seg-labelmap``, ``slicer``) and, with ``split``, the
    per-organ masks for every segmented case of a ``medseg segment`` output ``folder``.

    Raises:
        InputError: the folder does not exist or holds no segmented case, or an unknown output type.
    """
    folder = Path(folder)
    try:
        types = parse_output_types(output_types)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder not found")
    masks = segmented_cases(folder)
    if not masks:
        raise InputError(f"{folder}: no segmented case found (no <case>.nii.gz with its <case>.json sidecar)")
    remove_stale_temps(folder)
    report = ExportReport()
    label_names: dict[str, int] = {}
    for i, mask in enumerate(masks, 1):
        name = case_name(mask)
        side = read_sidecar(mask) or {}
        try:
            with contextlib.ExitStack() as stack:
                exports, notes = _export_case(mask, side, types, split, folder, stack)
        except InputError as exc:
            report.failed[name] = str(exc)
            log(f"[{i}/{len(masks)}] {name}: failed")
            continue
        except Exception as exc:  # one case fails alone, named, in one line
            report.failed[name] = (
                f"{mask}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            log(f"[{i}/{len(masks)}] {name}: failed")
            continue
        side["exports"] = {**(side.get("exports") or {}), **exports}
        side["warnings"] = list(dict.fromkeys([*(side.get("warnings") or []), *notes]))
        atomic_write_text(mask.parent / f"{name}.json", json.dumps(side, indent=2, default=str))
        if notes:
            report.warnings[name] = notes
        report.exported.append(name)
        label_names.update({str(k): int(v) for k, v in side["labels"].items()})
        log(f"[{i}/{len(masks)}] {name}: {', '.join(sorted(exports)) or 'nothing to write'}")
    if ("slicer" in types or split) and label_names:
        write_folder_exports(folder, label_names)
    return report


def _export_case(
    mask: Path, side: dict, types: tuple[str, ...], split: bool, folder: Path, stack
) -> tuple[dict, list[str]]:
    img = nib.load(str(mask))
    labels = np.asarray(img.dataobj)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{mask}: not an integer label map ({labels.dtype})")
    names = {str(k): int(v) for k, v in side["labels"].items()}
    if side.get("kind") == "dicom" and isinstance(side.get("dicom"), dict):
        case = _find_series(mask, side["dicom"], folder, stack)
    else:
        case = CaseSource(name=case_name(mask), kind="nifti", path=Path(str(side.get("source", mask))))
    checkpoints = side.get("checkpoints") or ["unknown"]
    hashes = side.get("checkpoint_sha256") or [""]
    pred = Prediction(labels=labels, reference=img, label_names=names)
    return write_case_exports(case, mask, pred, types, split, Path(checkpoints[0]), str(hashes[0]))
