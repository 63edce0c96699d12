"""Cross-validation summary of a run folder, and postprocessing decided on all folds' validation cases pooled.

>>> summary = cv_summary("runs/cv")          # doctest: +SKIP
>>> summary["pooled"]["liver"]["dice"]      # doctest: +SKIP
0.93

Reads each fold's ``validation.json`` (:mod:`medseg.engine.final_validation`) for the folds of ``splits.json``
and reports, per fold and pooled over every validation case of all folds, the mean Dice, NSD and HD95 per label
(HD95: the worst-case mean of :func:`medseg.metrics.summarize`, a missed organ counting as the image diagonal,
so a miss never drops out of the mean). Writes ``cv_summary.json`` and ``cv_summary.csv`` into the run folder.

Postprocessing. nnU-Net (Isensee et al., Nat. Methods 2021) decides its connected-component postprocessing
on the pooled cross-validation predictions — every training case predicted once, by the fold that did not
train on it — and applies that one decision to the ensemble of the folds. The same happens here when every
fold is complete: :func:`medseg.engine.validation.decide_postprocessing` runs on the saved validation
predictions of all folds (``fold_K/validation/*.npz``), and the rules go into every ``fold_K/best.pt``
(``"postprocess"``, which ``medseg segment`` applies, the fold's own decision kept under
``"postprocess_fold"``) and into ``postprocessing.json``. One fold sees a fifth of the cases: a cleanup that
helps there can hurt elsewhere, and each fold's choice would differ while the ensemble can apply only one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from medseg.data.folds import SPLITS_NAME, read_splits
from medseg.engine.final_validation import (
    PREDICTIONS_DIR,
    VALIDATION_JSON,
    SavedPairs,
    read_validation,
    summary_by_name,
)
from medseg.engine.folds import fold_folder
from medseg.engine.validation import decide_postprocessing
from medseg.io import InputError, atomic_write_text
from medseg.io.checkpoint import load_checkpoint, save_checkpoint
from medseg.report.tables import write_json

SUMMARY_JSON = "cv_summary.json"
SUMMARY_CSV = "cv_summary.csv"
POSTPROCESSING_JSON = "postprocessing.json"
#: Columns of ``cv_summary.csv``: one row per fold (or ``pooled``) and label.
CSV_COLUMNS = ("fold", "label", "name", "cases", "dice", "nsd", "hd95", "missed")


def table(summary: dict[str, dict]) -> dict[str, dict]:
    """Per label name: ``cases``, mean ``dice``, mean ``nsd``, worst-case mean ``hd95`` and ``missed``."""
    return {
        name: {
            "cases": entry["n_cases"],
            "dice": entry["dice"]["mean"],
            "nsd": entry["nsd"]["mean"],
            "hd95": entry["hd95"].get("worst_mean", entry["hd95"]["mean"]),
            "missed": entry["n_missed"],
        }
        for name, entry in summary.items()
    }


def _missing_reason(folder: Path) -> str:
    if not folder.is_dir():
        return "not trained"
    if not (folder / "last.pt").exists():
        return "training not started or no epoch finished"
    return f"no {VALIDATION_JSON} (training not finished, or started with --fold all)"


def _fold_scores(run: Path, k: int, split: dict) -> tuple[dict | None, str | None]:
    """``(validation.json, None)`` of fold ``k``, or ``(None, why it is missing)``."""
    folder = fold_folder(run, k)
    path = folder / VALIDATION_JSON
    if not path.is_file():
        return None, _missing_reason(folder)
    data = read_validation(path)
    if sorted(data["cases"]) != sorted(split["val"]):
        raise InputError(
            f"{path}: validated on other cases than fold {k} of {run / SPLITS_NAME} ({len(data['cases'])} vs "
            f"{len(split['val'])}); retrain fold {k}"
        )
    return data, None


def _decide_pooled(run: Path, folds: dict[int, dict], log) -> dict:
    """Postprocessing from the validation predictions of all folds; recorded in every fold's ``best.pt``."""
    first = folds[min(folds)]
    labels, spacing = first["labels"], first["spacing"]
    for k, data in folds.items():
        if data["labels"] != labels or not all(
            math.isclose(a, b, rel_tol=1e-9) for a, b in zip(data["spacing"], spacing, strict=True)
        ):
            raise InputError(
                f"{fold_folder(run, k) / VALIDATION_JSON}: labels or spacing differ from fold {min(folds)}; the "
                "folds of one run share one plan (retrain the odd fold)"
            )
    paths = [
        fold_folder(run, k) / PREDICTIONS_DIR / f"{case}.npz" for k, d in folds.items() for case in d["cases"]
    ]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise InputError(
            f"{absent[0]}: saved validation prediction missing ({len(absent)} missing); retrain the fold"
        )
    rules, report = decide_postprocessing(SavedPairs(paths), labels, spacing)
    source = f"cross-validation: {len(paths)} validation cases of folds {', '.join(map(str, sorted(folds)))}"
    for k in sorted(folds):
        best = fold_folder(run, k) / "best.pt"
        ckpt = load_checkpoint(best)
        if "postprocess_fold" not in ckpt:
            ckpt["postprocess_fold"] = ckpt.get("postprocess", {})
            ckpt["postprocess_fold_report"] = ckpt.get("postprocess_report", {})
        ckpt.update({"postprocess": rules, "postprocess_report": report, "postprocess_source": source})
        save_checkpoint(ckpt, best)
    decision = {"source": source, "rules": rules, "report": report}
    write_json(run / POSTPROCESSING_JSON, decision)
    kept = [f"{name}: {r['chosen']}" for name, r in report.items() if r["chosen"] != "none"]
    log(f"postprocessing on the pooled {len(paths)} validation cases: {', '.join(kept) or 'none'}")
    return decision


def cv_summary(run: str | os.PathLike, log=print) -> dict:
    """Summarise the folds of a cross-validation run folder (module docstring) and write the files.

    Returns:
        ``{"folds": {k: table}, "pooled": table, "missing": {k: reason}, "postprocessing": decision or None}``
        where a table is ``{label name: {"cases", "dice", "nsd", "hd95", "missed"}}`` (:func:`table`).

    Raises:
        InputError: not a cross-validation run folder (no ``splits.json``), no fold has validation scores yet,
            or a fold's scores or saved predictions do not match the split.
    """
    run = Path(run)
    if not (run / SPLITS_NAME).is_file():
        raise InputError(
            f"{run}: no {SPLITS_NAME}: not a cross-validation run folder (made by medseg train CONFIG --fold K)"
        )
    splits = read_splits(run / SPLITS_NAME)
    folds: dict[int, dict] = {}
    missing: dict[int, str] = {}
    for k, split in enumerate(splits):
        data, why = _fold_scores(run, k, split)
        if data is None:
            missing[k] = why
        else:
            folds[k] = data
    if not folds:
        reasons = "; ".join(f"fold {k}: {why}" for k, why in missing.items())
        raise InputError(f"{run}: no fold has validation scores yet ({reasons})")
    labels = folds[min(folds)]["labels"]
    per_fold = {k: table(summary_by_name(d["rows"], labels)) for k, d in folds.items()}
    pooled = table(summary_by_name([row for d in folds.values() for row in d["rows"]], labels))
    decision = None if missing else _decide_pooled(run, folds, log)
    result = {
        "run": str(run),
        "n_folds": len(splits),
        "folds": per_fold,
        "pooled": pooled,
        "pooled_cases": sum(len(d["cases"]) for d in folds.values()),
        "missing": missing,
        "postprocessing": decision,
    }
    write_json(run / SUMMARY_JSON, result)
    lines = [",".join(CSV_COLUMNS)]
    for fold, rows in [*((str(k), t) for k, t in per_fold.items()), ("pooled", pooled)]:
        for name, row in rows.items():
            values = [fold, str(labels[name]), name, *(repr(row[c]) if isinstance(row[c], float) else str(row[c])
                                                       for c in CSV_COLUMNS[3:])]  # fmt: skip
            lines.append(",".join(values))
    atomic_write_text(run / SUMMARY_CSV, "\n".join(lines) + "\n")
    return result
