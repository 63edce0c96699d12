"""Cross-validation runs: ``medseg train CONFIG --fold K`` trains fold K of a run folder that all folds share.

Layout of a run folder (``train.output``), as nnU-Net's ``fold_K`` folders::

    RUN/splits.json     the K-fold split (:mod:`medseg.data.folds`), written by the first fold, reused after
    RUN/plan.json       the preprocessing plan, computed once from all training cases, reused by every fold
    RUN/fold_K/         one fold: config.yaml, plan.json, last.pt, best.pt, metrics.csv, curves.png,
                        validation.json/.csv and validation/ (:mod:`medseg.engine.final_validation`)
    RUN/fold_all/       ``--fold all``: every case trained, no validation (best.pt = last.pt)

Why one plan for every fold: nnU-Net fingerprints the whole training set once and plans from it (target
spacing, intensity statistics); every fold then preprocesses identically, which is what lets the folds'
probabilities be averaged voxel by voxel (:mod:`medseg.inference.ensemble` requires equal plans). A plan per
fold would differ slightly (median spacing and foreground percentiles of 80 % of the cases) and the fold
ensemble would be refused. The validation cases of a fold enter the intensity statistics this way, as in
nnU-Net; they never enter the weights. A later fold whose config would plan differently (another patch,
spacing or intensity setting: the planning settings of the config are recorded beside it in
``plan_settings.json``) is an error rather than a fold that cannot join the ensemble. The plan is made the way a
run without folds makes it (:func:`medseg.planning.run_plan.resolve_plan`: the planner, or ``--plan FILE``), on
the first fold's machine; later folds reuse it even on a device with another memory budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medseg.config import Config, ConfigError, config_to_dict
from medseg.data.folds import ALL_FOLDS, SPLITS_NAME, fold_cases, load_or_create_splits, parse_fold
from medseg.io import InputError, atomic_write_text
from medseg.io.plan import Plan
from medseg.planning.plan_file import dump_plan

PLAN_NAME = "plan.json"
PLAN_SETTINGS_NAME = "plan_settings.json"


@dataclass(frozen=True)
class FoldRun:
    """Where a fold trains and on which cases, with the run's shared plan."""

    out: Path
    train_cases: list[dict]
    val_cases: list[dict]
    plan: Plan


def refuse_cross_validation_run(out: Path) -> None:
    """A run without ``--fold`` must not write into a cross-validation run folder: its ``plan.json`` would
    replace the plan the folds share.

    Raises:
        ConfigError: ``out`` holds a ``splits.json``.
    """
    if (out / SPLITS_NAME).exists():
        raise ConfigError(
            f"{out}: a cross-validation run folder ({SPLITS_NAME}); train a fold with --fold K, or use another "
            "train.output"
        )


def fold_folder(run: str | Path, fold: int | str) -> Path:
    """``RUN/fold_K`` (``RUN/fold_all``)."""
    return Path(run) / f"fold_{fold}"


def _first_difference(a: object, b: object, key: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
            if found:
                return found
        return None
    return None if a == b else f"{key} ({a!r} for plan.json, {b!r} in this config)"


def planning_settings(cfg: Config) -> dict:
    """The config values a plan depends on (besides the cases and the memory budget)."""
    d = config_to_dict(cfg)
    return json.loads(
        json.dumps(
            {
                "preprocess": d["preprocess"],
                "augment.patch_size": d["augment"]["patch_size"],
                "augment.flip_prob": d["augment"]["flip_prob"],
                "train.batch_size": d["train"]["batch_size"],
                "model.name": d["model"]["name"],
                "model.filters": d["model"]["filters"],
            }
        )
    )


def shared_plan(cfg: Config, run: Path, make: Callable[[], Plan]) -> Plan:
    """``RUN/plan.json``: made by ``make()`` (from all training cases) the first time, read back after.

    Raises:
        ConfigError: this config's planning settings differ from those of the config that wrote ``plan.json``.
        InputError: ``plan.json`` or ``plan_settings.json`` cannot be read.
    """
    path, settings_path = run / PLAN_NAME, run / PLAN_SETTINGS_NAME
    settings = planning_settings(cfg)
    if not path.exists():
        plan = make()
        atomic_write_text(settings_path, json.dumps(settings, indent=2))
        atomic_write_text(path, dump_plan(plan))
        return plan
    try:
        plan = json.loads(path.read_bytes())
        recorded = json.loads(settings_path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the run's shared plan ({exc})") from None
    differ = _first_difference(recorded, settings)
    if differ:
        raise ConfigError(
            f"{path}: the folds of a run share one plan, and this config plans differently: {differ}; train "
            "every fold with the same preprocess/augment settings, or use a new run folder (train.output)"
        )
    return Plan.from_dict(plan, where=str(path))


def prepare_fold(
    cfg: Config, fold: int | str, cases: list[dict], make_plan: Callable[[list[dict]], Plan]
) -> FoldRun:
    """The split (``RUN/splits.json``), the shared plan (``RUN/plan.json``) and the fold's cases and folder.

    ``fold`` is an index ``0 .. data.folds - 1`` or ``"all"`` (see :func:`medseg.data.folds.parse_fold`).

    Raises:
        ConfigError: another fold, a folder holding a run without folds, or a config that plans differently
            from the run's ``plan.json``.
        InputError: a split that no longer fits the dataset, unreadable ``splits.json`` or ``plan.json``.
    """
    try:
        fold = parse_fold(fold, cfg.data.folds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    run = Path(cfg.train.output)
    if (run / "last.pt").exists():
        raise ConfigError(
            f"{run}: holds a training run without folds (last.pt); cross-validation folds need a run folder of "
            "their own (train.output)"
        )
    run.mkdir(parents=True, exist_ok=True)
    if fold == ALL_FOLDS:
        train_cases, val_cases = list(cases), []
    else:
        splits = load_or_create_splits(run, [c["case"] for c in cases], cfg.data.folds, cfg.train.seed)
        train_cases, val_cases = fold_cases(cases, splits[int(fold)])
    plan = shared_plan(cfg, run, lambda: make_plan(cases))
    return FoldRun(fold_folder(run, fold), train_cases, val_cases, plan)
