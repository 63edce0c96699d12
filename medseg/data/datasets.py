"""Case lists from a dataset folder — MSD or nnU-Net v2 layout, told apart by ``dataset.json`` — and splits.

The nnU-Net v2 layout (no ``training`` list; cases found in ``labelsTr``, channels ``_0000``, ``_0001``, …)
is :mod:`medseg.data.nnunet`; :func:`training_cases` and :func:`input_channels` serve both.

MSD layout: ``dataset.json`` with ``"labels": {"0": "background", "1": "liver", ...}`` and ``"training":
[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]``. A ``dataset.json`` is untrusted
input: every path it names is resolved with :func:`medseg.io.resolve_inside`, so an absolute path, a ``..``
that climbs out or a symlink leading out of the dataset folder is refused, never read. The whole dataset is
checked (every problem at once) by :func:`medseg.data.check.check_dataset`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from medseg.data.nnunet import channel_names, detect_layout, nnunet_training_cases
from medseg.io import InputError, UnsafePathError, case_name, resolve_inside
from medseg.io.jsonfile import read_json
from medseg.io.labels import parse_label_names

#: The two keys of a training entry, in the order they are checked.
ENTRY_KEYS = ("image", "label")


class EntryError(InputError):
    """A training entry of ``dataset.json`` that cannot be used: names the file, the entry and the cause.

    ``file``, ``entry`` (``training[3] image``) and ``cause`` are kept apart for the dataset check's report.
    """

    def __init__(self, file: str | os.PathLike, entry: str, cause: str) -> None:
        self.file, self.entry, self.cause = str(file), entry, cause
        super().__init__(f"{file}: {entry}: {cause}")


def read_dataset_json(root: str | os.PathLike) -> dict:
    """Read ``<root>/dataset.json``: an existing, valid JSON object with ``labels`` and either ``training``
    (MSD) or ``channel_names`` / ``file_ending`` (nnU-Net v2, :func:`medseg.data.nnunet.detect_layout`).

    Raises:
        InputError: naming dataset.json and the cause (for invalid JSON, with line and column).
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise InputError(f"{path}: dataset.json {what} (expected an MSD dataset folder)")
    meta = read_json(path, "dataset.json")
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object at the top level, found {type(meta).__name__}")
    missing = [key for key in ("labels",) if key not in meta]
    if detect_layout(meta) is None:
        missing.append("training")
    if missing:
        raise InputError(
            f"{path}: needs 'labels' and 'training' entries (missing {', '.join(missing)}); an nnU-Net v2 "
            "dataset.json has 'channel_names' and 'file_ending' instead of 'training'"
        )
    return meta


def input_channels(meta: dict, root: str | os.PathLike) -> list[str]:
    """Names of the network's input channels: nnU-Net ``channel_names`` (one file per channel); an MSD
    dataset's images are single 3D volumes, so one channel (named from ``modality`` when it has one)."""
    if detect_layout(meta) == "nnunet":
        return channel_names(meta, Path(root) / "dataset.json")
    modality = meta.get("modality")
    return [str(modality.get("0", "CT"))] if isinstance(modality, dict) else ["CT"]


def label_names(meta: dict, source: str = "dataset.json") -> dict[str, int]:
    """``{"background": 0, "liver": 1, ...}`` from a dataset.json ``labels`` mapping (either orientation)."""
    return parse_label_names(meta["labels"], source)


def training_entries(meta: dict, root: str | os.PathLike) -> list:
    """The ``training`` list of a dataset.json (checked to be a non-empty list)."""
    source = Path(root) / "dataset.json"
    entries = meta["training"]
    if not isinstance(entries, list):
        raise InputError(f"{source}: 'training' must be a list of entries, found {type(entries).__name__}")
    if not entries:
        raise InputError(f"{source}: no training cases listed")
    return entries


def entry_path(root: str | os.PathLike, index: int, entry: object, key: str) -> Path:
    """The ``key`` (``"image"`` or ``"label"``) file of training entry ``index``, resolved inside ``root``.

    Raises:
        EntryError: the entry is not an object, lacks ``key``, or its path is absolute, climbs out with
            ``..`` or leads out through a symlink.
    """
    source = Path(root) / "dataset.json"
    if not isinstance(entry, dict):
        raise EntryError(
            source, f"training[{index}]", f"expected an object with 'image' and 'label', found {entry!r}"
        )
    if key not in entry:
        raise EntryError(source, f"training[{index}]", f"has no {key!r}")
    try:
        return resolve_inside(root, entry[key])
    except UnsafePathError as exc:
        raise EntryError(source, f"training[{index}] {key}", exc.cause) from None


def training_cases(root: str | os.PathLike) -> list[dict]:
    """``[{"image": path, "label": path, "case": name}, ...]``, paths safely inside ``root``, checked to exist.

    For an nnU-Net dataset with several channels ``"image"`` is the list of channel files
    (:func:`medseg.data.nnunet.nnunet_training_cases`).
    """
    root = Path(root)
    meta = read_dataset_json(root)
    if detect_layout(meta) == "nnunet":
        return nnunet_training_cases(root, meta)
    cases = []
    for index, entry in enumerate(training_entries(meta, root)):
        image, label = (entry_path(root, index, entry, key) for key in ENTRY_KEYS)
        for p in (image, label):
            if not p.exists():
                raise InputError(f"{p}: listed in {root / 'dataset.json'} but missing")
        cases.append({"image": str(image), "label": str(label), "case": case_name(image)})
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
