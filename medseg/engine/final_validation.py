"""End of training: the best weights' validation predictions — scored, kept, and used to decide postprocessing.

One prediction pass over the validation cases (:func:`medseg.engine.validation.validation_predictions`: as
``medseg segment --postprocess none`` segments them, on each scan's own grid) serves three outputs in the run
folder:

* ``validation.json`` and ``validation.csv``: per case and label Dice, NSD (τ = 2 mm), HD95 and the other
  :data:`medseg.metrics.METRIC_KEYS` from :func:`medseg.metrics.evaluate_pair`, and per label the summary of
  :func:`medseg.metrics.summarize` (a missed organ counts in the worst-case HD95 as the image diagonal). Scores
  are of the raw predictions (argmax, before postprocessing), like nnU-Net's per-fold ``validation/summary.json``;
* ``validation/<case>.npz``: the prediction and reference label maps on the scan's grid (``prediction``,
  ``reference``) and its voxel size in mm (``spacing``), which :mod:`medseg.engine.crossval` pools over the
  folds of a cross-validation run (``validation.json`` has the plan's ``spacing`` and each scan's in
  ``case_spacing``);
* ``best.pt`` gets the per-label component cleanup decided on these cases
  (:func:`medseg.engine.validation.decide_postprocessing`).

With several training processes each rank predicts and scores its share of the cases; rank 0 gathers them
and writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from medseg.engine.validation import ValidationCases, decide_postprocessing, validation_predictions
from medseg.io import InputError, atomic_path
from medseg.io.checkpoint import load_checkpoint, save_checkpoint
from medseg.io.plan import Plan
from medseg.metrics import evaluate_pair, image_diagonal_mm, summarize
from medseg.report.tables import write_json, write_metrics_csv

VALIDATION_JSON = "validation.json"
VALIDATION_CSV = "validation.csv"
#: Folder of the saved validation label maps, inside a run (or fold) folder.
PREDICTIONS_DIR = "validation"
#: NSD tolerance in mm (the default of ``medseg evaluate``).
NSD_TOLERANCE_MM = 2.0


def score_case(
    case: str, pred: np.ndarray, ref: np.ndarray, labels: dict[str, int], spacing: Sequence[float]
) -> list[dict]:
    """One row per organ label (background skipped): ``case``, ``label``, ``name``, every metric and
    ``diagonal_mm`` (for the worst-case summary)."""
    organs = {int(idx): name for name, idx in labels.items() if int(idx) > 0}
    scores = evaluate_pair(pred, ref, spacing, labels=sorted(organs), tolerance=NSD_TOLERANCE_MM)
    diagonal = image_diagonal_mm(pred.shape, spacing)
    return [
        {"case": case, "label": idx, "name": organs[idx], **scores[idx], "diagonal_mm": diagonal}
        for idx in sorted(organs)
    ]


def summary_by_name(rows: list[dict], labels: dict[str, int]) -> dict[str, dict]:
    """:func:`medseg.metrics.summarize` of ``rows``, keyed by label name."""
    names = {int(idx): name for name, idx in labels.items()}
    return {names[idx]: entry for idx, entry in summarize(rows).items()}


def _compact(labels: np.ndarray) -> np.ndarray:
    return labels.astype(np.uint8 if int(labels.max(initial=0)) < 256 else np.uint16)


def save_pair(path: str | os.PathLike, pred: np.ndarray, ref: np.ndarray, spacing=None) -> None:
    """Write a prediction/reference pair of label maps (and their voxel size in mm) to a compressed ``.npz``,
    atomically."""
    extra = {} if spacing is None else {"spacing": np.asarray(spacing, dtype=np.float64)}
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, prediction=_compact(pred), reference=_compact(ref), **extra)


def load_pair(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, reference)`` saved by :func:`save_pair`.

    Raises:
        InputError: missing or unreadable file, naming it.
    """
    return load_saved(path)[:2]


def load_saved(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(prediction, reference, spacing)`` saved by :func:`save_pair`; the spacing None for a pair saved
    without one (validation in model space, before the scan-grid validation).

    Raises:
        InputError: missing or unreadable file, naming it.
    """
    try:
        with np.load(path) as data:
            spacing = data["spacing"] if "spacing" in data.files else None
            return data["prediction"], data["reference"], spacing
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the saved validation prediction ({exc})") from None


class SavedPairs:
    """Saved pairs read one at a time on every pass: :func:`decide_postprocessing` walks the pairs once per
    label and candidate, and this keeps one case in memory instead of all of them. Yields
    ``(prediction, reference, spacing)``, the spacing None for pairs saved without one."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        for path in self.paths:
            yield load_saved(path)


def read_validation(path: str | os.PathLike) -> dict:
    """A ``validation.json`` written by :func:`record_final_validation`.

    Raises:
        InputError: unreadable, or without ``cases``, ``labels``, ``spacing`` and ``rows``.
    """
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the validation scores ({exc})") from None
    if not isinstance(data, dict) or any(k not in data for k in ("cases", "labels", "spacing", "rows")):
        raise InputError(f"{path}: not a medseg validation.json (needs cases, labels, spacing and rows)")
    for row in data["rows"]:  # JSON holds inf as "inf" (medseg.report.tables.json_safe)
        for key, value in row.items():
            if value in ("inf", "-inf"):
                row[key] = float(value)
            elif value is None:
                row[key] = float("nan")
    return data


def record_final_validation(model, cases: ValidationCases, cfg, plan: Plan, device, best: Path, replicas,
                            log) -> None:  # fmt: skip
    """Predict the validation cases with the weights of ``best`` and write the outputs of the module docstring
    next to it (rank 0; every rank predicts its share)."""
    out = best.parent
    replicas.barrier()  # rank 0 has written best.pt
    ckpt = load_checkpoint(best)
    model.load_state_dict(ckpt["model"])
    labels = dict(plan.labels)
    indices = replicas.shard(len(cases))
    local = []
    predictions = validation_predictions(model, cases, cfg, plan, device, indices)
    for i, (pred, ref, spacing) in zip(indices, predictions, strict=True):
        name = cases.name(i)
        rows = score_case(name, pred, ref, labels, spacing)
        local.append((i, name, _compact(pred), _compact(ref), [float(s) for s in spacing], rows))
    gathered = sorted(replicas.gather_to_main(local), key=lambda item: item[0])
    if not replicas.is_main:
        return
    rules, report = decide_postprocessing([(p, r, sp) for _, _, p, r, sp, _ in gathered], labels)
    ckpt["postprocess"] = rules
    ckpt["postprocess_report"] = report
    save_checkpoint(ckpt, best)
    for _, name, pred, ref, spacing, _ in gathered:
        save_pair(out / PREDICTIONS_DIR / f"{name}.npz", pred, ref, spacing)
    rows = [row for *_, case_rows in gathered for row in case_rows]
    names = [name for _, name, *_ in gathered]
    write_metrics_csv(out / VALIDATION_CSV, rows)
    write_json(
        out / VALIDATION_JSON,
        {
            "checkpoint": best.name,
            "epoch": int(ckpt["epoch"]) + 1,
            "cases": names,
            "labels": labels,
            "spacing": list(plan.spacing),
            "case_spacing": {name: spacing for _, name, _, _, spacing, _ in gathered},
            "nsd_tolerance_mm": NSD_TOLERANCE_MM,
            "summary": summary_by_name(rows, labels),
            "rows": rows,
            "postprocess": report,
        },
    )
    kept = [f"{name}: {r['chosen']}" for name, r in report.items() if r["chosen"] != "none"]
    log(f"postprocessing kept on {len(names)} validation case(s): {', '.join(kept) or 'none'}")
    log(f"validation scores of {best.name}: {out / VALIDATION_JSON}")
