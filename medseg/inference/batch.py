"""Batch segmentation: a NIfTI file or a folder of them in → label maps in each scan's exact geometry out.

>>> from medseg.inference.batch import segment_inputs
>>> report = segment_inputs("imagesTs/", "pred/", "runs/demo/best.pt")    # doctest: +SKIP
>>> report.written, report.skipped, report.failed                         # doctest: +SKIP

Inputs are listed by :func:`medseg.io.list_cases` (the same rule as ``medseg evaluate``); an entry that is
not a readable file (dangling link, folder named ``x.nii.gz``) is a failure of that case. A bad input is
reported in one line and the other cases go on.

**Kill-safe outputs.** Each case writes two files, each atomically (:mod:`medseg.io.atomic`): first the
JSON sidecar ``<case>.json``, then the mask ``<case>.nii.gz``. So wherever a run is killed, a mask never
exists without its sidecar. (When a case is redone, its old mask is deleted before the new sidecar is
written, so an old mask never sits beside a new sidecar either.)

**Complete cases are skipped.** A case is *complete* when its mask exists and its sidecar exists and says
the mask belongs to this input and this checkpoint:

* the input: its absolute path, size in bytes and modification time (``st_mtime_ns``) — what ``make`` and
  ``rsync`` trust; cheap for a 500-scan folder, where hashing every scan would read them all again;
* the checkpoint: the SHA-256 of the file, computed once per run — a retrained ``best.pt`` at the same path
  is a different checkpoint;
* the sliding-window overlap actually used (another ``--overlap`` gives another mask).

A re-run into the same folder (e.g. after a killed batch) skips complete cases and redoes the rest: a
sidecar without a mask, a mask without a sidecar, or a sidecar recording another input or checkpoint.
``overwrite=True`` redoes every case.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medseg.inference.predictor import Prediction, Predictor
from medseg.io import InputError, atomic_write_text, case_name, is_nifti, list_cases, save_like
from medseg.io.atomic import remove_stale_temps
from medseg.io.cases import check_case_file


@dataclass
class SegmentReport:
    """What a batch did: masks written, masks skipped as complete, failures (input path → one-line reason
    naming the file), warnings (input path → one-line notes, also kept in the sidecar) and the stale
    temporary files removed from the output folder at the start."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    removed_temps: list[Path] = field(default_factory=list)


def list_inputs(input_path: str | os.PathLike) -> list[Path]:
    """The NIfTI files to segment: the file itself, or the folder's cases sorted by name."""
    input_path = Path(input_path)
    files = list(list_cases(input_path, "input").values())
    if input_path.is_dir() and not files:
        raise InputError(f"{input_path}: folder contains no .nii or .nii.gz files")
    return files


def output_path_for(src: Path, output: Path, single: bool) -> Path:
    """``output`` itself for a single input named ``*.nii[.gz]``, else ``output/<case>.nii.gz``."""
    if single and is_nifti(output):
        return output
    return output / f"{case_name(src)}.nii.gz"


def sidecar_path(mask_path: Path) -> Path:
    """``<case>.json`` beside ``<case>.nii.gz``."""
    return mask_path.parent / f"{case_name(mask_path)}.json"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def source_stamp(src: Path) -> dict:
    """What identifies an input for :func:`is_complete`: absolute path, size and modification time."""
    st = src.stat()
    return {"path": os.path.abspath(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_sidecar(mask_path: Path) -> dict | None:
    """The sidecar of a mask as a dict, or None when it is missing or not a JSON object."""
    try:
        side = json.loads(sidecar_path(mask_path).read_text())
    except (OSError, ValueError):
        return None
    return side if isinstance(side, dict) else None


def is_complete(mask_path: Path, identity: dict) -> bool:
    """Whether ``mask_path`` exists and its sidecar records exactly ``identity`` (see the module docstring)."""
    if not mask_path.is_file():
        return False
    side = read_sidecar(mask_path)
    return side is not None and all(side.get(key) == value for key, value in identity.items())


def _check_output(input_path: Path, output: Path, inputs: list[Path], single: bool) -> Path:
    """The folder the masks go to (created); refuse outputs that would overwrite an input."""
    if input_path.is_dir() and is_nifti(output):
        raise InputError(
            f"{output}: input {input_path} is a folder, so the output must be a folder, not a NIfTI file"
        )
    folder = output.parent if single and is_nifti(output) else output
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    if not folder.is_dir():
        raise InputError(f"{folder}: output exists and is not a folder")
    if input_path.is_dir() and os.path.samefile(folder, input_path):
        raise InputError(f"{folder}: output folder is the input folder; masks would be taken for scans")
    for src in inputs:
        dst = output_path_for(src, output, single)
        if dst.exists() and src.exists() and os.path.samefile(dst, src):
            raise InputError(f"{dst}: the mask would overwrite its input scan; choose another output")
    return folder


def _write_case(dst: Path, sidecar: dict, pred: Prediction) -> None:
    """Old mask out, sidecar in, new mask in — in that order (a mask never lacks its own sidecar)."""
    dst.unlink(missing_ok=True)
    atomic_write_text(sidecar_path(dst), json.dumps(sidecar, indent=2))
    save_like(pred.labels, pred.reference, dst)


def segment_inputs(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    checkpoint: str | os.PathLike,
    device: str = "auto",
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    log: Callable[[str], object] = print,
    overwrite: bool = False,
) -> SegmentReport:
    """Segment every input with one checkpoint; return what was written, skipped and failed (and why).

    Stale temporary files of a killed run are removed from the output folder first; cases whose outputs
    are complete (module docstring) are skipped unless ``overwrite``.

    Raises:
        InputError: the input does not exist or holds no NIfTI file, a folder input with a file output, an
            output that cannot be created or would overwrite an input, or an unusable checkpoint —
            problems of the whole run, not of one case.
    """
    input_path, output = Path(input_path), Path(output)
    inputs = list_inputs(input_path)
    single = len(inputs) == 1 and not input_path.is_dir()
    folder = _check_output(input_path, output, inputs, single)
    predictor = Predictor(checkpoint, device=device, overlap=overlap, sw_batch_size=sw_batch_size)
    checkpoint_id = {"checkpoint_sha256": file_sha256(checkpoint), "overlap": predictor.overlap}
    report = SegmentReport(removed_temps=remove_stale_temps(folder))
    if report.removed_temps:
        log(f"removed {len(report.removed_temps)} stale temporary file(s) of an interrupted run in {folder}")
    n = len(inputs)
    for i, src in enumerate(inputs, 1):
        t0 = time.monotonic()
        dst = output_path_for(src, output, single)
        try:
            check_case_file(src)
            identity = {"source_file": source_stamp(src), **checkpoint_id}
            if not overwrite and is_complete(dst, identity):
                report.skipped.append(dst)
                if warnings := list((read_sidecar(dst) or {}).get("warnings", [])):
                    report.warnings[str(src)] = warnings
                log(f"[{i}/{n}] {src.name}: done, skipped (complete from an earlier run)")
                continue
            pred = predictor.predict(src)
            warnings = [str(w) for w in getattr(pred, "warnings", [])]
            sidecar = {
                "labels": pred.label_names,
                "source": str(src),
                "checkpoint": str(checkpoint),
                "shape": list(pred.labels.shape),
                "warnings": warnings,
                **identity,
            }
            _write_case(dst, sidecar, pred)
        except InputError as exc:
            report.failed[str(src)] = str(exc)
            log(f"[{i}/{n}] {src.name}: failed")
            continue
        except Exception as exc:  # keep the batch going; name the file and the cause
            first = str(exc).splitlines()[0] if str(exc) else ""
            report.failed[str(src)] = f"{src}: {type(exc).__name__}: {first}"
            log(f"[{i}/{n}] {src.name}: failed")
            continue
        if warnings:
            report.warnings[str(src)] = warnings
        report.written.append(dst)
        log(f"[{i}/{n}] {src.name} → {dst} ({time.monotonic() - t0:.1f} s)")
    return report
