"""One parser for label names, whichever way round a file writes them.

* MSD ``dataset.json``: ``{"labels": {"0": "background", "1": "liver"}}`` (index → name);
* nnU-Net v2 ``dataset.json`` and medseg sidecars / checkpoints: ``{"labels": {"background": 0, "liver": 1}}``
  (name → index).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from medseg.io.nifti import InputError


def _is_index(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.strip().isdigit()
    )


def parse_label_names(labels: Mapping, source: str = "labels") -> dict[str, int]:
    """``{name: index}`` sorted by index, from either orientation of a ``labels`` mapping.

    Raises:
        InputError: not a mapping, an entry that is neither ``index: name`` nor ``name: index``, or two
            names for one index.
    """
    if not isinstance(labels, Mapping):
        raise InputError(f"{source}: expected a 'labels' mapping, got {type(labels).__name__}")
    names: dict[str, int] = {}
    for key, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InputError(
                f"{source}: label {key!r} is a region ({value!r}: nnU-Net's region-based training), which "
                "medseg does not support; give every label one integer"
            )
        if _is_index(key) and not _is_index(value):  # MSD: "index": "name"
            name, index = str(value), int(str(key).strip())
        elif _is_index(value):  # nnU-Net v2 / sidecar: "name": index
            name, index = str(key), int(str(value).strip())
        else:
            raise InputError(
                f"{source}: label entry {key!r}: {value!r} is neither 'index: name' nor 'name: index'"
            )
        if index in names.values():
            other = next(n for n, i in names.items() if i == index)
            raise InputError(f"{source}: label index {index} is named twice ({other!r} and {name!r})")
        names[name] = index
    return dict(sorted(names.items(), key=lambda kv: kv[1]))


def read_label_names(path: str | os.PathLike) -> dict[str, int]:
    """``{name: index}`` from a JSON file with a ``labels`` mapping (sidecar, checkpoint JSON, dataset.json)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read label names ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or "labels" not in data:
        raise InputError(f"{path}: expected a JSON object with a 'labels' mapping")
    return parse_label_names(data["labels"], str(path))
