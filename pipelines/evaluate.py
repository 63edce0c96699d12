"""``medseg evaluate``: score predicted label maps against references, case by case and label by label.

Workflow (:func:`run_evaluation`):

1. Cases are matched by file name (``.nii`` / ``.nii.gz`` stripped). References without a prediction and
   predictions without a reference are reported (summary JSON and stderr), never skipped silently; a
   reference without a prediction makes the run fail (non-zero exit), an extra prediction only warns.
2. Spacing comes from the reference header. A prediction whose shape or affine differs from its reference is
   an error naming both files, unless ``--resample-pred`` resamples it onto the reference grid (nearest
   neighbour). Non-integer or negative label values are an error naming the file.
3. :func:`medseg.metrics.evaluate_pair` computes every metric (definitions in :mod:`medseg.metrics`).
4. Outputs, each written atomically (temporary file in the same folder, then ``os.replace``):
   ``<output>.csv`` with one row per case and label, ``<stem>_summary.json`` (per-label mean / median /
   std over finite values, missed / spurious counts, worst-case distances with inf → image diagonal,
   failures) and one box plot per metric, ``<stem>_<metric>.png``.

A case that fails (unreadable file, geometry mismatch, bad labels) is reported with a one-line reason; the
other cases go on and the command exits non-zero at the end. In JSON, ``inf`` is written as the string
``"inf"`` and NaN as ``null``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from medseg.io import atomic_write_text, case_name, is_nifti
from medseg.metrics import METRIC_KEYS

__all__ = [
    "CSV_COLUMNS",
    "evaluate_command",
    "evaluate_held_out",
    "load_label_names",
    "run_evaluation",
    "summary_table",
]

CSV_COLUMNS = (
    "case",
    "label",
    "name",
    *(k for k in METRIC_KEYS if k not in ("vol_diff_ml", "asd_pred_to_ref", "asd_ref_to_pred")),
)
PLOT_METRICS = ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd")


class EvaluationError(ValueError):
    """Bad input for a whole run (missing folder, no cases, bad label-name file)."""


def _collect(path: Path, what: str) -> dict[str, Path]:
    """Case name → file for a NIfTI file or a folder of them."""
    if not path.exists():
        raise EvaluationError(f"{what} path does not exist: {path}")
    if path.is_file():
        return {case_name(path): path}
    files = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
    found: dict[str, Path] = {}
    for p in files:
        name = case_name(p)
        if name in found:
            raise EvaluationError(
                f"{what} folder has two files for case {name!r}: {found[name].name}, {p.name}"
            )
        found[name] = p
    return found


def load_label_names(path: Path | None) -> dict[int, str]:
    """Label index → name from a checkpoint sidecar (``{"labels": {"liver": 1}}``) or an MSD dataset.json
    (``{"labels": {"0": "background", "1": "liver"}}``)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read label names from {path}: {exc}") from exc
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict):
        raise EvaluationError(f"{path}: expected a JSON object with a 'labels' mapping")
    names: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).strip().isdigit():  # MSD: "index": "name"
            names[int(key)] = str(value)
        elif isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            names[int(value)] = str(key)  # sidecar: "name": index
    return names


def _load(path: Path, what: str):
    """(array, affine) of a NIfTI label map, read and checked by :func:`medseg.io.load_volume`."""
    import numpy as np

    from medseg.io import InputError, load_volume

    try:
        img = load_volume(path)
    except InputError as exc:
        raise ValueError(f"{what} {exc}") from None
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64), img.header.get_zooms()[:3]


def _resample_nearest(data, affine_from, affine_to, shape_to):
    """Resample ``data`` (grid ``affine_from``) onto the grid ``affine_to`` / ``shape_to``, nearest neighbour."""
    import numpy as np
    from scipy import ndimage

    mapping = np.linalg.inv(affine_from) @ affine_to  # reference voxel -> prediction voxel
    return ndimage.affine_transform(
        np.asarray(data), mapping[:3, :3], offset=mapping[:3, 3], output_shape=shape_to, order=0, cval=0
    )


def _evaluate_case(job: dict) -> dict:
    """Evaluate one case; returns ``{"case", "rows"}`` or ``{"case", "error"}`` (never raises)."""
    import numpy as np

    from medseg.metrics import check_label_map, evaluate_pair, image_diagonal_mm

    case, pred_path, ref_path = job["case"], Path(job["pred"]), Path(job["ref"])
    try:
        ref, ref_affine, spacing = _load(ref_path, "reference")
        pred, pred_affine, _ = _load(pred_path, "prediction")
        try:
            ref = check_label_map(ref, f"reference {ref_path}")
            pred = check_label_map(pred, f"prediction {pred_path}")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        same_grid = pred.shape == ref.shape and np.allclose(pred_affine, ref_affine, atol=1e-4, rtol=1e-5)
        if not same_grid:
            if not job["resample_pred"]:
                raise ValueError(
                    f"geometry mismatch: prediction {pred_path} (shape {pred.shape}) vs reference {ref_path} "
                    f"(shape {ref.shape}): shapes or affines differ; use --resample-pred to resample the "
                    "prediction with nearest neighbour"
                )
            pred = _resample_nearest(pred, pred_affine, ref_affine, ref.shape)
        metrics = evaluate_pair(pred, ref, spacing, job["labels"], job["tolerance"], job["percentile"])
        diagonal = image_diagonal_mm(ref.shape, spacing)
        names = job["names"]
        rows = [
            {"case": case, "label": label, "name": names.get(label, ""), **values, "diagonal_mm": diagonal}
            for label, values in metrics.items()
        ]
        return {"case": case, "rows": rows}
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        return {"case": case, "error": message}


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([repr(row[c]) if isinstance(row[c], float) else row[c] for c in CSV_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def _box_plots(stem: Path, rows: list[dict], names: dict[int, str]) -> list[Path]:
    """One box plot per metric (one box per label, finite values; inf counts noted under the label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from medseg.io.atomic import atomic_path

    labels = sorted({r["label"] for r in rows})
    written = []
    for metric in PLOT_METRICS:
        data, ticks = [], []
        for label in labels:
            values = np.array([r[metric] for r in rows if r["label"] == label], dtype=float)
            finite = values[np.isfinite(values)]
            data.append(finite if finite.size else np.array([np.nan]))
            tick = names.get(label) or str(label)
            n_inf = int(np.sum(np.isinf(values)))
            ticks.append(f"{tick}\n({n_inf} inf)" if n_inf else tick)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 2), 4))
        ax.boxplot(data)
        ax.set_xticks(range(1, len(labels) + 1), ticks, rotation=45 if len(labels) > 8 else 0)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per label ({len({r['case'] for r in rows})} cases)")
        fig.tight_layout()
        target = stem.with_name(f"{stem.name}_{metric}.png")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def run_evaluation(
    pred: Path,
    ref: Path,
    output: Path,
    labels: list[int] | None = None,
    tolerance: float = 2.0,
    percentile: float = 95.0,
    workers: int = 1,
    resample_pred: bool = False,
    label_names: Path | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate predictions against references and write CSV, summary JSON and box plots.

    Args:
        pred, ref: a NIfTI file each, or folders of NIfTI files matched by case name.
        output: CSV path; the summary goes to ``<stem>_summary.json`` and plots to ``<stem>_<metric>.png``.
        labels: labels to evaluate (default: every non-zero label present in either map of a case).
        tolerance: NSD tolerance in mm. percentile: Hausdorff percentile (reported as ``hd95``).
        workers: cases evaluated in parallel processes.
        resample_pred: resample a prediction on another grid onto its reference (nearest neighbour)
            instead of failing.
        label_names: sidecar JSON or MSD ``dataset.json`` naming the labels.

    Returns:
        The summary dict (also written as JSON). ``summary["ok"]`` is False if any case failed or a
        reference had no prediction.

    Raises:
        EvaluationError: missing input path, nothing to evaluate, unreadable label-name file.
    """
    from tqdm import tqdm

    from medseg.metrics import summarize

    pred, ref, output = Path(pred), Path(ref), Path(output)
    names = load_label_names(label_names)
    preds, refs = _collect(pred, "prediction"), _collect(ref, "reference")
    if pred.is_file() and ref.is_file():
        preds = {case_name(ref): pred}  # two explicit files are a pair whatever their names
    missing_pred = sorted(set(refs) - set(preds))
    missing_ref = sorted(set(preds) - set(refs))
    cases = sorted(set(refs) & set(preds))
    for case in missing_pred:
        print(f"warning: reference {refs[case]} has no prediction (case {case!r})", file=sys.stderr)
    for case in missing_ref:
        print(f"warning: prediction {preds[case]} has no reference (case {case!r})", file=sys.stderr)
    if not cases:
        raise EvaluationError(f"no case has both a prediction in {pred} and a reference in {ref}")

    jobs = [
        {
            "case": c,
            "pred": str(preds[c]),
            "ref": str(refs[c]),
            "labels": labels,
            "tolerance": tolerance,
            "percentile": percentile,
            "resample_pred": resample_pred,
            "names": names,
        }
        for c in cases
    ]
    bar = tqdm(total=len(jobs), desc="evaluate", unit="case", disable=not progress, file=sys.stderr)
    results = []
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            futures = [pool.submit(_evaluate_case, job) for job in jobs]
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(1)
    else:
        for job in jobs:
            results.append(_evaluate_case(job))
            bar.update(1)
    bar.close()

    results.sort(key=lambda r: r["case"])
    failed = [{"case": r["case"], "error": r["error"]} for r in results if "error" in r]
    for f in failed:
        print(f"error: case {f['case']}: {f['error']}", file=sys.stderr)
    rows = sorted((row for r in results for row in r.get("rows", [])), key=lambda x: (x["case"], x["label"]))

    output.parent.mkdir(parents=True, exist_ok=True)
    stem = output.with_suffix("") if output.suffix else output
    _write_csv(output, rows)
    per_label = summarize(rows)
    for label, entry in per_label.items():
        entry["name"] = names.get(label, "")
    summary = {
        "ok": not failed and not missing_pred,
        "n_cases": len(cases),
        "n_evaluated": len(cases) - len(failed),
        "failed": failed,
        "missing_predictions": [str(refs[c]) for c in missing_pred],
        "missing_references": [str(preds[c]) for c in missing_ref],
        "settings": {
            "tolerance_mm": tolerance,
            "percentile": percentile,
            "labels": labels,
            "resample_pred": resample_pred,
        },
        "csv": str(output),
        "labels": per_label,
    }
    atomic_write_text(
        stem.with_name(f"{stem.name}_summary.json"),
        json.dumps(_json_safe(summary), indent=2, allow_nan=False),
    )
    if rows:
        summary["plots"] = [str(p) for p in _box_plots(stem, rows, names)]
    return summary


def evaluate_held_out(pred_dir: Path, data_root: Path, output: Path) -> dict:
    """Evaluate predictions of an MSD dataset's held-out cases (``labelsTs/``) on every organ label."""
    from medseg.data.datasets import label_names, read_dataset_json

    organs = sorted(v for v in label_names(read_dataset_json(data_root)).values() if v > 0)
    return run_evaluation(
        pred_dir,
        data_root / "labelsTs",
        output,
        labels=organs,
        label_names=data_root / "dataset.json",
        progress=False,
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


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        labels = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 1,2,5, got {text!r}") from None
    if any(lab <= 0 for lab in labels):
        raise typer.BadParameter(f"labels must be positive integers, got {text!r}")
    return labels


def evaluate_command(
    pred: Annotated[Path, typer.Option("--pred", help="Predicted label map (NIfTI) or folder of them.")],
    ref: Annotated[
        Path, typer.Option("--ref", help="Reference label map (NIfTI) or folder; cases matched by name.")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Per-case CSV; summary JSON and PNGs next to it.")
    ],
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Comma-separated labels, e.g. 1,2,5 (default: all present)."),
    ] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="NSD tolerance in mm.")] = 2.0,
    percentile: Annotated[
        float, typer.Option("--percentile", help="Hausdorff percentile (HD95 = 95).")
    ] = 95.0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Cases evaluated in parallel.")] = 1,
    resample_pred: Annotated[
        bool,
        typer.Option("--resample-pred", help="Resample predictions on another grid (nearest neighbour)."),
    ] = False,
    label_names: Annotated[
        Path | None,
        typer.Option("--label-names", help="Sidecar JSON {'labels': {name: index}} or MSD dataset.json."),
    ] = None,
) -> None:
    """Score predicted segmentations against references: Dice, IoU, HD95, ASSD, NSD, volumes."""
    label_list = _parse_labels(labels)
    try:
        summary = run_evaluation(
            pred,
            ref,
            output,
            labels=label_list,
            tolerance=tolerance,
            percentile=percentile,
            workers=workers,
            resample_pred=resample_pred,
            label_names=label_names,
        )
    except (EvaluationError, OSError) as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(code=2) from None
    n_bad = len(summary["failed"]) + len(summary["missing_predictions"])
    typer.echo(
        f"evaluated {summary['n_evaluated']}/{summary['n_cases']} cases -> {output} "
        f"(+ {Path(output).with_suffix('').name}_summary.json)"
    )
    if n_bad:
        typer.echo(
            f"error: {len(summary['failed'])} case(s) failed, {len(summary['missing_predictions'])} reference(s) "
            "without prediction (see the summary JSON)",
            err=True,
        )
        raise typer.Exit(code=1)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("MPLBACKEND", "Agg")
    typer.run(evaluate_command)
