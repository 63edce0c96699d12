"""Evaluate a folder of predicted label maps against references in one call: :func:`evaluate_folder`.

>>> from medseg.evaluation import evaluate_folder
>>> summary = evaluate_folder("pred/", "labelsTs/", "eval/metrics.csv")   # doctest: +SKIP
>>> summary["labels"]["1"]["dice"]["mean"]                                 # doctest: +SKIP

Workflow:

1. Cases are matched by name (:func:`medseg.io.list_cases`: ``.nii`` / ``.nii.gz`` stripped). References
   without a prediction and predictions without a reference are listed in the summary, never skipped
   silently; a reference without a prediction makes ``summary["ok"]`` false, an extra prediction is a
   warning.
2. Spacing comes from the reference's affine (:func:`medseg.io.voxel_spacing`). A prediction whose shape or
   affine differs from its reference is an error naming both files, unless ``resample_pred`` moves it onto
   the reference grid through the two affines (nearest neighbour,
   :func:`medseg.transforms.resample.resample_to_reference`). Non-integer or negative labels are an error.
3. :func:`medseg.metrics.evaluate_pair` computes every metric (definitions in :mod:`medseg.metrics.pair`).
4. Outputs, each written atomically: ``<output>.csv`` (one row per case and label), ``<stem>_summary.json``
   (per-label mean / median / std over finite values, missed / spurious counts, worst-case distances with
   inf → image diagonal, failures) and one box plot per metric, ``<stem>_<metric>.png``.

A case that fails (unreadable file, geometry mismatch, bad labels) is reported with a one-line reason in
``summary["failed"]``; the other cases go on.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io import InputError, case_name, list_cases, load_volume, read_label_names, voxel_spacing
from medseg.metrics import check_label_map, evaluate_pair, image_diagonal_mm, summarize
from medseg.report import box_plots, write_json, write_metrics_csv


class EvaluationError(ValueError):
    """Bad input for a whole run (missing folder, no cases, bad label-name file)."""


@dataclass(frozen=True)
class EvaluationSettings:
    """What is measured, the same for every case (recorded as the summary's ``settings``).

    Attributes:
        labels: labels to evaluate (default: every non-zero label present in either map of a case).
        tolerance: NSD tolerance in mm.
        percentile: Hausdorff percentile (reported as ``hd95``).
        resample_pred: resample a prediction on another grid onto its reference (nearest neighbour)
            instead of failing the case.
    """

    labels: list[int] | None = None
    tolerance: float = 2.0
    percentile: float = 95.0
    resample_pred: bool = False

    def as_summary(self) -> dict[str, Any]:
        """The summary JSON's ``settings`` entry."""
        return {
            "tolerance_mm": self.tolerance,
            "percentile": self.percentile,
            "labels": self.labels,
            "resample_pred": self.resample_pred,
        }


def label_index_names(path: str | os.PathLike | None) -> dict[int, str]:
    """Label index → name from a sidecar, checkpoint JSON or dataset.json (empty when ``path`` is None)."""
    if path is None:
        return {}
    try:
        return {index: name for name, index in read_label_names(path).items()}
    except InputError as exc:
        raise EvaluationError(str(exc)) from None


def _load_labels(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(checked integer array, affine) of a label map; errors read ``<file>: <cause> (<what>)``."""
    try:
        img = load_volume(path)
    except InputError as exc:
        raise ValueError(f"{exc} ({what})") from None
    array = check_label_map(np.asanyarray(img.dataobj), f"{path} ({what})")
    return array, np.asarray(img.affine, dtype=np.float64)


def same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    """Two voxel grids are the same: equal shape and affines equal within 1e-4 mm / 1e-5 relative."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=1e-4, rtol=1e-5)


def onto_reference_grid(pred: np.ndarray, pred_affine, ref_affine, ref_shape) -> np.ndarray:
    """A label map moved onto another grid of the same scan (nearest neighbour, through the affines)."""
    import torch

    from medseg.transforms.resample import resample_to_reference

    moved = resample_to_reference(
        torch.from_numpy(pred.astype(np.float32))[None], pred_affine, ref_affine, ref_shape, mode="nearest"
    )
    return check_label_map(np.rint(moved[0].numpy()).astype(np.int64), "resampled prediction")


def evaluate_case(
    case: str,
    pred_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    labels: list[int] | None = None,
    tolerance: float = 2.0,
    percentile: float = 95.0,
    resample_pred: bool = False,
    names: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Metric rows (one per label) of one prediction / reference pair.

    Raises:
        ValueError: unreadable file, bad labels, or a geometry mismatch without ``resample_pred`` — the
            message names the file(s).
    """
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    ref, ref_affine = _load_labels(ref_path, "reference")
    pred, pred_affine = _load_labels(pred_path, "prediction")
    if not same_grid(pred.shape, pred_affine, ref.shape, ref_affine):
        if not resample_pred:
            raise ValueError(
                f"{pred_path}: geometry mismatch with its reference {ref_path} (shape {pred.shape} vs "
                f"{ref.shape}, or the affines differ); use --resample-pred to resample the prediction with "
                "nearest neighbour"
            )
        pred = onto_reference_grid(pred, pred_affine, ref_affine, ref.shape)
    spacing = voxel_spacing(ref_affine)
    metrics = evaluate_pair(pred, ref, spacing, labels, tolerance, percentile)
    diagonal = image_diagonal_mm(ref.shape, spacing)
    names = names or {}
    return [
        {"case": case, "label": label, "name": names.get(label, ""), **values, "diagonal_mm": diagonal}
        for label, values in metrics.items()
    ]


def _job(job: dict) -> dict:
    """One case for the process pool; never raises (the error becomes a one-line reason)."""
    case = job.pop("case")
    try:
        return {"case": case, "rows": evaluate_case(case, **job)}
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not message.startswith((job["pred_path"], job["ref_path"])):  # every reason names its file first
            message = f"{job['pred_path']}: {message}"
        return {"case": case, "error": message}


def match_cases(pred: Path, ref: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Predictions and references by case name (two explicit files are a pair whatever their names)."""
    try:
        preds, refs = list_cases(pred, "prediction"), list_cases(ref, "reference")
    except InputError as exc:
        raise EvaluationError(str(exc)) from None
    if pred.is_file() and ref.is_file():
        preds = {case_name(ref): pred}
    return preds, refs


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="evaluate", unit="case", disable=not progress, file=sys.stderr)
    results = []
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            for future in as_completed([pool.submit(_job, job) for job in jobs]):
                results.append(future.result())
                bar.update(1)
    else:
        for job in jobs:
            results.append(_job(job))
            bar.update(1)
    bar.close()
    return sorted(results, key=lambda r: r["case"])


def evaluate_folder(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    output: str | os.PathLike,
    settings: EvaluationSettings = EvaluationSettings(),
    *,
    label_names: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool = False,
) -> dict:
    """Evaluate predictions against references; write CSV, summary JSON and box plots (see module doc).

    Args:
        pred, ref: a NIfTI file each, or folders of NIfTI files matched by case name.
        output: CSV path; the summary goes to ``<stem>_summary.json`` and plots to ``<stem>_<metric>.png``.
        settings: labels, NSD tolerance, Hausdorff percentile, resampling (:class:`EvaluationSettings`).
        label_names: sidecar JSON, checkpoint JSON or dataset.json naming the labels.
        workers: cases evaluated in parallel processes.
        progress: show a progress bar on stderr.

    Returns:
        The summary dict (also written as JSON). ``summary["ok"]`` is False if any case failed or a
        reference had no prediction; ``summary["warnings"]`` lists unmatched files.

    Raises:
        EvaluationError: missing input path, nothing to evaluate, unreadable label-name file.
    """
    pred, ref, output = Path(pred), Path(ref), Path(output)
    names = label_index_names(label_names)
    preds, refs = match_cases(pred, ref)
    missing_pred = sorted(set(refs) - set(preds))
    missing_ref = sorted(set(preds) - set(refs))
    cases = sorted(set(refs) & set(preds))
    warnings = [f"reference {refs[c]} has no prediction (case {c!r})" for c in missing_pred]
    warnings += [f"prediction {preds[c]} has no reference (case {c!r})" for c in missing_ref]
    if not cases:
        raise EvaluationError(f"no case has both a prediction in {pred} and a reference in {ref}")
    jobs = [
        {
            "case": c,
            "pred_path": str(preds[c]),
            "ref_path": str(refs[c]),
            "labels": settings.labels,
            "tolerance": settings.tolerance,
            "percentile": settings.percentile,
            "resample_pred": settings.resample_pred,
            "names": names,
        }
        for c in cases
    ]
    results = _run_jobs(jobs, workers, progress)
    failed = [{"case": r["case"], "error": r["error"]} for r in results if "error" in r]
    rows = sorted((row for r in results for row in r.get("rows", [])), key=lambda x: (x["case"], x["label"]))

    stem = output.with_suffix("") if output.suffix else output
    write_metrics_csv(output, rows)
    per_label = summarize(rows)
    for label, entry in per_label.items():
        entry["name"] = names.get(label, "")
    summary = {
        "ok": not failed and not missing_pred,
        "n_cases": len(cases),
        "n_evaluated": len(cases) - len(failed),
        "failed": failed,
        "warnings": warnings,
        "missing_predictions": [str(refs[c]) for c in missing_pred],
        "missing_references": [str(preds[c]) for c in missing_ref],
        "settings": settings.as_summary(),
        "csv": str(output),
        "labels": per_label,
    }
    write_json(stem.with_name(f"{stem.name}_summary.json"), summary)
    if rows:
        summary["plots"] = [str(p) for p in box_plots(stem, rows, names)]
    return summary


def evaluate_held_out(
    pred_dir: str | os.PathLike, data_root: str | os.PathLike, output: str | os.PathLike
) -> dict:
    """Evaluate predictions of a dataset's held-out cases (``labelsTs/``) on every organ label."""
    data_root = Path(data_root)
    organs = sorted(index for index in read_label_names(data_root / "dataset.json").values() if index > 0)
    return evaluate_folder(
        pred_dir,
        data_root / "labelsTs",
        output,
        EvaluationSettings(labels=organs),
        label_names=data_root / "dataset.json",
    )


def summary_table(summary: dict) -> dict[str, dict[str, float]]:
    """Per structure name: mean Dice, NSD and HD95 (worst-case mean: a miss counts as the image diagonal)."""
    return {
        entry["name"]: {
            "dice": float(entry["dice"]["mean"]),
            "hd95": float(entry["hd95"].get("worst_mean", entry["hd95"]["mean"])),
            "nsd": float(entry["nsd"]["mean"]),
        }
        for entry in summary["labels"].values()
    }
