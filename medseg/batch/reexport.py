"""``medseg export``: viewer files for cases a batch already segmented, from the mask and its sidecar alone.

A ``medseg segment`` output folder holds, per case, ``<case>.nii.gz`` and the sidecar ``<case>.json``
(:mod:`medseg.batch.outputs`). Everything a DICOM SEG, an RT Structure Set, a Slicer ``.seg.nrrd`` or
per-organ masks need is there — no network runs again:

* the label map and its geometry: the mask (written in the scan's exact shape and affine);
* label names: the sidecar's ``labels``;
* the source series of a DICOM case: the sidecar's ``dicom`` block (series UID, the files in slice order, or
  the ``.zip`` they came from). Only the recorded files (or archive members) are opened, confined to one
  series folder, outside system folders and, with ``--source-root``, inside that folder
  (:mod:`medseg.batch.recorded_series`); the series is matched by Series Instance UID;
  :func:`medseg.export.dicom_seg.write_dicom_seg` then checks that the mask lies on that series' grid and
  reads the written SEG back voxel for voxel, as on a first write (and
  :func:`medseg.export.rtstruct.write_rtstruct` rasterises the written RT Structure Set back);
* algorithm identification: the sidecar's ``checkpoints`` and ``checkpoint_sha256``.

The sidecar is data, not authority: every ``<case>.nii.gz`` with a ``<case>.json`` beside it is a case, and a
sidecar that cannot be read or does not match its schema (:mod:`medseg.batch.sidecar`) fails its case.

The sidecar's ``exports`` entry gets the new files and its ``warnings`` the new notes (atomically rewritten).
The identity keys that decide whether ``segment`` skips a complete case are left as they were, so a later
``medseg segment`` into the same folder still recognises its cases. A case that cannot be exported (moved
source series, a broken sidecar, a refused source, a mask that no longer matches it) fails alone, with one
line naming the file and the cause.
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

from medseg.batch.exports import ITKSNAP_LABELS, MaskOnGrid, write_case_exports, write_folder_exports
from medseg.batch.inputs import CaseSource, remove_stale_extractions
from medseg.batch.outputs import sidecar_path
from medseg.batch.recorded_series import open_recorded_series
from medseg.batch.sidecar import load_sidecar
from medseg.config.segment import ExportOptions
from medseg.io import InputError, atomic_write_text, case_name
from medseg.io.atomic import TEMP_PREFIX, check_writable, no_space, remove_stale_temps


@dataclass
class ExportReport:
    """What :func:`export_outputs` did: cases exported, failed (case → one-line reason), warnings per case."""

    exported: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)


def segmented_cases(folder: Path) -> list[Path]:
    """Masks ``<case>.nii.gz`` of ``folder`` with a sidecar ``<case>.json`` beside them, by name: the cases,
    whatever their sidecar holds (:func:`medseg.batch.sidecar.load_sidecar` judges it). Files another
    case wrote (``<case>_entropy.nii.gz``, …) have no sidecar; temporary files (``.tmp-*``) are never cases."""
    return [
        path
        for path in sorted(folder.glob("*.nii.gz"))
        if not path.name.startswith(TEMP_PREFIX) and sidecar_path(path).is_file() and path.is_file()
    ]


def export_outputs(
    folder: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
    *,
    log: Callable[[str], object] = print,
) -> ExportReport:
    """Write ``options.types`` (``dicom-seg``, ``dicom-seg-labelmap``, ``dicom-rtstruct``, ``slicer``) and, with
    ``options.split``, the per-organ masks for every segmented case of a ``medseg segment`` output ``folder``
    (:class:`~medseg.config.segment.ExportOptions`; an unknown type fails when the options are made).

    Every case's sidecar is checked against its schema (:mod:`medseg.batch.sidecar`), and a DICOM case's
    source is opened only as recorded and confined (:mod:`medseg.batch.recorded_series`): to
    ``options.source_root`` too when given. A case that fails either is reported in ``failed``, the others go
    on.

    Raises:
        InputError: the folder does not exist or holds no segmented case, or a ``source_root`` that is not a
            folder.
    """
    folder, types, split = Path(folder), options.types, options.split
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder not found")
    root = None
    if options.source_root is not None:
        root = options.source_root.resolve()
        if not root.is_dir():
            raise InputError(f"{options.source_root}: --source-root is not a folder")
    masks = segmented_cases(folder)
    if not masks:
        raise InputError(f"{folder}: no segmented case found (no <case>.nii.gz with its <case>.json sidecar)")
    try:
        check_writable(folder)
    except OSError as exc:
        raise InputError(
            f"{folder}: the folder cannot be written ({exc.strerror or exc}); nothing was done"
        ) from None
    remove_stale_temps(folder)
    remove_stale_extractions(folder)
    report = ExportReport()
    label_names: dict[str, int] = {}
    full: str | None = None  # a write failed for lack of space: no further case is started
    for i, mask in enumerate(masks, 1):
        name = case_name(mask)
        if full:
            report.failed[name] = f"{mask}: not started: {full}; free space and run again"
            log(f"[{i}/{len(masks)}] {name}: not started (no space left)")
            continue
        try:
            side = load_sidecar(sidecar_path(mask))
            with contextlib.ExitStack() as stack:
                exports, notes = _export_case(mask, side, types, split, folder, stack, root)
            side["exports"] = {**(side.get("exports") or {}), **exports}
            side["warnings"] = list(dict.fromkeys([*(side.get("warnings") or []), *notes]))
            side.pop("export_error", None)  # a viewer file that failed when the case was segmented
            atomic_write_text(sidecar_path(mask), json.dumps(side, indent=2, default=str))
        except InputError as exc:
            report.failed[name] = str(exc)
            log(f"[{i}/{len(masks)}] {name}: failed")
            continue
        except Exception as exc:  # one case fails alone, named, in one line
            if no_space(exc):
                full = f"no space left on device in {folder}"
                report.failed[name] = f"{mask}: cannot write its files: {full}"
            else:
                first = str(exc).splitlines()[0] if str(exc) else ""
                report.failed[name] = f"{mask}: {type(exc).__name__}: {first}"
            log(f"[{i}/{len(masks)}] {name}: failed")
            continue
        if notes:
            report.warnings[name] = notes
        report.exported.append(name)
        label_names.update({str(k): int(v) for k, v in side["labels"].items()})
        log(f"[{i}/{len(masks)}] {name}: {', '.join(sorted(exports)) or 'nothing to write'}")
    if ("slicer" in types or split) and label_names:
        try:
            write_folder_exports(folder, label_names)
        except OSError as exc:
            report.failed[ITKSNAP_LABELS] = f"{folder / ITKSNAP_LABELS}: cannot write ({exc.strerror or exc})"
    return report


def _export_case(
    mask: Path,
    side: dict,
    types: tuple[str, ...],
    split: bool,
    folder: Path,
    stack: contextlib.ExitStack,
    source_root: Path | None,
) -> tuple[dict, list[str]]:
    img = nib.load(str(mask))
    labels = np.asarray(img.dataobj)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{mask}: not an integer label map ({labels.dtype})")
    names = {str(k): int(v) for k, v in side["labels"].items()}
    if side["kind"] == "dicom":
        case = open_recorded_series(mask, side["case"], side["dicom"], folder, stack, source_root)
    else:
        case = CaseSource(name=case_name(mask), kind="nifti", path=Path(str(side.get("source", mask))))
    checkpoints = side.get("checkpoints") or ["unknown"]
    hashes = side.get("checkpoint_sha256") or [""]
    pred = MaskOnGrid(labels=labels, reference=img, label_names=names)
    return write_case_exports(case, mask, pred, types, split, Path(checkpoints[0]), str(hashes[0]))
