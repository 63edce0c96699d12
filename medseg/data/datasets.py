"""Case lists from a Medical Segmentation Decathlon (MSD) dataset folder, and deterministic splits.

MSD layout: ``dataset.json`` with ``"labels": {"0": "background", "1": "liver", ...}`` and ``"training":
[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]``. Paths are resolved against the
dataset folder.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from medseg.io import InputError, case_name
from medseg.io.labels import parse_label_names


def read_dataset_json(root: str | os.PathLike) -> dict:
    """Read ``<root>/dataset.json`` with a clear error when missing or malformed."""
    path = Path(root) / "dataset.json"
    if not path.exists():
        raise InputError(f"{path}: dataset.json not found (expected an MSD dataset folder)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc})") from None
    if "labels" not in meta or "training" not in meta:
        raise InputError(f"{path}: needs 'labels' and 'training' entries")
    return meta


def label_names(meta: dict, source: str = "dataset.json") -> dict[str, int]:
    """``{"background": 0, "liver": 1, ...}`` from a dataset.json ``labels`` mapping (either orientation)."""
    return parse_label_names(meta["labels"], source)


def training_cases(root: str | os.PathLike) -> list[dict]:
    """``[{"image": path, "label": path, "case": name}, ...]`` with absolute paths, checked to exist."""
    root = Path(root)
    meta = read_dataset_json(root)
    cases = []
    for entry in meta["training"]:
        image, label = root / entry["image"], root / entry["label"]
        for p in (image, label):
            if not p.exists():
                raise InputError(f"{p}: listed in {root / 'dataset.json'} but missing")
        cases.append({"image": str(image), "label": str(label), "case": case_name(image)})
    if not cases:
        raise InputError(f"{root / 'dataset.json'}: no training cases listed")
    return cases


def split_cases(
    cases: list[dict], val_fraction: float, seed: int, val_cases: list[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split (by explicit names, or a seeded shuffle)."""
    if val_cases:
        names = set(val_cases)
        unknown = names - {c["case"] for c in cases}
        if unknown:
            raise InputError(f"validation cases not in the dataset: {sorted(unknown)}")
        return [c for c in cases if c["case"] not in names], [c for c in cases if c["case"] in names]
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(cases) * val_fraction)) if val_fraction > 0 and len(cases) > 1 else 0
    val_idx = set(order[:n_val])
    return [c for i, c in enumerate(cases) if i not in val_idx], [
        c for i, c in enumerate(cases) if i in val_idx
    ]
