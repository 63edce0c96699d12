"""Checkpoints that carry everything needed to segment a new scan: weights, config, labels, plan.

Saved with ``torch.save`` as plain containers (dicts, lists, numbers, strings, tensors) only, so they load
with ``torch.load(..., weights_only=True)`` — no untrusted pickle is ever executed. Written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medseg.io.atomic import atomic_path
from medseg.io.nifti import InputError

FORMAT = "medseg-checkpoint"
#: 2: the config has no ``model.skip_gate`` (the network name decides the gates); version-1 configs are
#: migrated by :func:`medseg.config.migrate_config` when read.
VERSION = 2
REQUIRED = ("model", "config", "plan", "labels")


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Save ``state`` (must hold :data:`REQUIRED` keys) with the format tag, atomically."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint state misses {missing}")
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a medseg checkpoint safely (``weights_only=True``) and check it is one of ours.

    Raises:
        InputError: missing/empty/corrupt file, a pickle that needs arbitrary code, or a file that is not a
            medseg checkpoint — one line naming the file and the cause.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: checkpoint file is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a loadable medseg checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path}: not a medseg checkpoint (missing format tag {FORMAT!r})")
    if int(ckpt.get("version", -1)) > VERSION:
        raise InputError(
            f"{path}: checkpoint version {ckpt['version']} is newer than this medseg ({VERSION})"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise InputError(f"{path}: medseg checkpoint misses {missing}")
    return ckpt
