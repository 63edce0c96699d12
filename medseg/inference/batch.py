"""Batch segmentation: a NIfTI file or a folder of them in → label maps in each scan's exact geometry out.

>>> from medseg.inference.batch import segment_inputs
>>> report = segment_inputs("imagesTs/", "pred/", "runs/demo/best.pt")    # doctest: +SKIP
>>> report.written, report.failed                                          # doctest: +SKIP

Inputs are listed by :func:`medseg.io.list_cases` (the same rule as ``medseg evaluate``). Each mask is
written to a temporary name and renamed (:mod:`medseg.io.atomic`), with a JSON sidecar naming the labels;
a bad input is reported in one line and the other cases go on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medseg.inference.predictor import Predictor
from medseg.io import InputError, atomic_write_text, case_name, is_nifti, list_cases, save_like


@dataclass
class SegmentReport:
    """What a batch wrote and what failed (input path → one-line reason naming the file)."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


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


def segment_inputs(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    checkpoint: str | os.PathLike,
    device: str = "auto",
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    log: Callable[[str], object] = print,
) -> SegmentReport:
    """Segment every input with one checkpoint; return what was written and what failed (and why).

    Raises:
        InputError: the input does not exist or holds no NIfTI file, a folder input with a file output, or
            an unusable checkpoint — problems of the whole run, not of one case.
    """
    input_path, output = Path(input_path), Path(output)
    inputs = list_inputs(input_path)
    if input_path.is_dir() and is_nifti(output):
        raise InputError(
            f"{output}: input {input_path} is a folder, so the output must be a folder, not a NIfTI file"
        )
    predictor = Predictor(checkpoint, device=device, overlap=overlap, sw_batch_size=sw_batch_size)
    report = SegmentReport()
    single = len(inputs) == 1 and not input_path.is_dir()
    for i, src in enumerate(inputs, 1):
        t0 = time.monotonic()
        dst = output_path_for(src, output, single)
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
            first = str(exc).splitlines()[0] if str(exc) else ""
            report.failed[str(src)] = f"{src}: {type(exc).__name__}: {first}"
            log(f"[{i}/{len(inputs)}] FAILED {report.failed[str(src)]}")
            continue
        report.written.append(dst)
        log(f"[{i}/{len(inputs)}] {src.name} → {dst} ({time.monotonic() - t0:.1f} s)")
    return report
