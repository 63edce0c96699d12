"""K-fold cross-validation splits of a dataset's training cases, written once to ``splits.json`` and reused.

As in nnU-Net (Isensee et al., Nat. Methods 2021; ``nnunetv2.utilities.crossval_split.generate_crossval_split``):
the case names are sorted, shuffled with a seed and cut into ``n`` folds of consecutive positions — the first
``len(cases) % n`` folds one case larger, the rule of scikit-learn's ``KFold(shuffle=True)`` — so that every case
is validated exactly once. Fold ``k`` validates on its own cut and trains on all the others.

``splits.json`` has nnU-Net's ``splits_final.json`` format, a list with one ``{"train": [...], "val": [...]}``
per fold, so an nnU-Net split can be copied into a run folder and is used as it is. It is written the first
time a fold is trained and read by every later fold: the folds of one run are only comparable (and their
validation cases only pool into one cross-validation estimate) when they come from one split. A dataset whose
case list changed since the split was written is therefore an error naming the cases added and removed, never
a silent re-split.

>>> kfold_splits(["a", "b", "c", "d", "e"], n_folds=2, seed=0)   # doctest: +SKIP
[{'train': ['a', 'c'], 'val': ['b', 'd', 'e']}, {'train': ['b', 'd', 'e'], 'val': ['a', 'c']}]
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from medseg.io import InputError, atomic_write_text

#: File name of the split inside a cross-validation run folder.
SPLITS_NAME = "splits.json"
#: ``--fold all``: train on every case, without validation (nnU-Net's ``fold all``).
ALL_FOLDS = "all"


def parse_fold(value: int | str, n_folds: int) -> int | str:
    """A fold as given on the command line: an index ``0 .. n_folds - 1`` (int) or ``"all"``.

    Raises:
        ValueError: anything else, with the valid values.
    """
    text = str(value).strip().lower()
    if text == ALL_FOLDS:
        return ALL_FOLDS
    if text.isdigit() and int(text) < n_folds:
        return int(text)
    raise ValueError(f"fold {value!r} is not valid: expected 0..{n_folds - 1} (data.folds={n_folds}) or all")


def kfold_splits(cases: Sequence[str], n_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """``n_folds`` train/validation splits of ``cases`` (names), each case validated exactly once.

    Deterministic for a given set of names and seed (the order the names come in does not matter). Within a
    fold both lists are sorted.

    Raises:
        ValueError: fewer than 2 folds, or fewer cases than folds (a fold would validate on nothing).
    """
    names = sorted(set(cases))
    if len(names) != len(cases):
        raise ValueError("case names must be unique")
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    if len(names) < n_folds:
        raise ValueError(f"{len(names)} case(s) cannot be split into {n_folds} folds")
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    sizes = [len(names) // n_folds + (1 if k < len(names) % n_folds else 0) for k in range(n_folds)]
    splits, start = [], 0
    for size in sizes:
        val = {names[i] for i in order[start : start + size]}
        splits.append({"train": sorted(set(names) - val), "val": sorted(val)})
        start += size
    return splits


def read_splits(path: str | os.PathLike) -> list[dict[str, list[str]]]:
    """Read and check a ``splits.json`` (nnU-Net's ``splits_final.json`` format).

    Raises:
        InputError: unreadable JSON, not a list of ``{"train", "val"}`` lists of names, or a case validated in
            more than one fold — one line naming the file.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the cross-validation split ({exc})") from None
    ok = (
        isinstance(raw, list)
        and raw
        and all(
            isinstance(f, dict)
            and all(
                isinstance(f.get(k), list) and all(isinstance(c, str) for c in f[k]) for k in ("train", "val")
            )
            for f in raw
        )
    )
    if not ok:
        raise InputError(
            f'{path}: expected a list of {{"train": [case, ...], "val": [case, ...]}}, one per fold'
        )
    seen: dict[str, int] = {}
    for k, fold in enumerate(raw):
        for name in fold["val"]:
            if name in seen:
                raise InputError(f"{path}: case {name!r} is validated in fold {seen[name]} and fold {k}")
            seen[name] = k
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in raw]


def _names(items: Sequence[str], limit: int = 5) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_splits(
    splits: list[dict[str, list[str]]], cases: Sequence[str], n_folds: int, path: str | os.PathLike
) -> None:
    """A split read back must be for these cases and this number of folds.

    Raises:
        InputError: another number of folds, or cases added to / removed from the dataset since the split was
            written (named), with what to do.
    """
    if len(splits) != n_folds:
        raise InputError(
            f"{path}: holds {len(splits)} folds but data.folds is {n_folds}; use data.folds={len(splits)} or "
            "a new run folder (train.output)"
        )
    split_cases = {c for fold in splits for c in (*fold["train"], *fold["val"])}
    added, removed = set(cases) - split_cases, split_cases - set(cases)
    if added or removed:
        what = "; ".join(
            part
            for part in (
                f"{len(added)} new in the dataset ({_names(added)})" if added else "",
                f"{len(removed)} no longer in it ({_names(removed)})" if removed else "",
            )
            if part
        )
        raise InputError(
            f"{path}: the dataset's training cases changed since the split was written: {what}; folds of one run "
            "must share one split — train into a new run folder (train.output), or delete splits.json to "
            "re-split (the folds already trained then no longer match it)"
        )


def load_or_create_splits(
    run: str | os.PathLike, cases: Sequence[str], n_folds: int, seed: int
) -> list[dict[str, list[str]]]:
    """The split of ``run/splits.json``: written from :func:`kfold_splits` the first time, read and checked
    against ``cases`` (:func:`check_splits`) every later time."""
    path = Path(run) / SPLITS_NAME
    if path.exists():
        splits = read_splits(path)
        check_splits(splits, cases, n_folds, path)
        return splits
    try:
        splits = kfold_splits(cases, n_folds, seed)
    except ValueError as exc:
        raise InputError(f"{run}: cannot make {n_folds} cross-validation folds: {exc} (data.folds)") from None
    atomic_write_text(path, json.dumps(splits, indent=2))
    return splits


def fold_cases(cases: list[dict], split: dict[str, list[str]]) -> tuple[list[dict], list[dict]]:
    """``(train, val)`` case entries (``{"image", "label", "case"}``) of one fold, in dataset order."""
    train, val = set(split["train"]), set(split["val"])
    return [c for c in cases if c["case"] in train], [c for c in cases if c["case"] in val]
