"""Batch segmentation: NIfTI file or folder in → label maps in each scan's exact geometry out.

Each output is written to a temporary name and renamed, so an interrupted run never leaves a half-written
mask; a bad input is reported in one line and the other cases go on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from medseg.io import InputError, atomic_write_text, case_name, is_nifti, save_like


@dataclass
class SegmentReport:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # input path → one-line reason


def list_inputs(input_path: Path) -> list[Path]:
    """The NIfTI files to segment: the file itself, or the folder's ``*.nii``/``*.nii.gz`` sorted by name."""
    if input_path.is_dir():
        files = sorted(p for p in input_path.iterdir() if p.is_file() and is_nifti(p))
        if not files:
            raise InputError(f"{input_path}: folder contains no .nii or .nii.gz files")
        return files
    if not input_path.exists():
        raise InputError(f"{input_path}: input not found")
    return [input_path]


def output_path_for(src: Path, output: Path, single: bool) -> Path:
    """``output`` itself for a single input named ``*.nii[.gz]``, else ``output/<case>.nii.gz``."""
    if single and is_nifti(output):
        return output
    return output / f"{case_name(src)}.nii.gz"


def sidecar_path(mask_path: Path) -> Path:
    return mask_path.parent / f"{case_name(mask_path)}.json"


def run_segment(
    input_path: Path,
    output: Path,
    checkpoint: Path,
    device: str = "auto",
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    log=print,
) -> SegmentReport:
    """Segment every input; return what was written and what failed (and why)."""
    from medseg.inference import Predictor

    inputs = list_inputs(Path(input_path))
    if Path(input_path).is_dir() and is_nifti(output):
        raise InputError(
            f"{output}: input {input_path} is a folder, so the output must be a folder, not a NIfTI file"
        )
    predictor = Predictor(checkpoint, device=device, overlap=overlap, sw_batch_size=sw_batch_size)
    report = SegmentReport()
    single = len(inputs) == 1 and not Path(input_path).is_dir()
    for i, src in enumerate(inputs, 1):
        t0 = time.monotonic()
        dst = output_path_for(src, Path(output), single)
        try:
            pred = predictor.predict(src)
            save_like(pred.labels, pred.reference, dst)
            sidecar = {
                "labels": pred.label_names,
                "source": str(src),
                "checkpoint": str(checkpoint),
                "shape": list(pred.labels.shape),
            }
            atomic_write_text(sidecar_path(dst), json.dumps(sidecar, indent=2))
        except InputError as exc:
            report.failed[str(src)] = str(exc)
            log(f"[{i}/{len(inputs)}] FAILED {exc}")
            continue
        except Exception as exc:  # keep the batch going; name the file and the cause
            report.failed[str(src)] = (
                f"{src}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            log(f"[{i}/{len(inputs)}] FAILED {report.failed[str(src)]}")
            continue
        report.written.append(dst)
        log(f"[{i}/{len(inputs)}] {src.name} → {dst} ({time.monotonic() - t0:.1f} s)")
    return report
