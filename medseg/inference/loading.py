"""Checkpoint files → the networks, plan, label names and recorded settings a :class:`~medseg.inference.Predictor`
is built from (:meth:`Predictor.__init__`; :meth:`Predictor.from_network` takes them from memory instead).

>>> loaded = load_checkpoints(["fold0/best.pt", "fold1/best.pt"], torch.device("cpu"))   # doctest: +SKIP
>>> loaded.plan.spacing, sorted(loaded.label_names)                                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.config import Config, checkpoint_config
from medseg.inference.ensemble import check_ensemble
from medseg.io import InputError
from medseg.io.checkpoint import load_checkpoint
from medseg.io.plan import Plan
from medseg.nets.registry import build_network


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ",".join(str(n) for n in tensor.shape) + "]"


def state_dict_differences(saved: dict, expected: dict) -> list[str]:
    """Where saved weights do not fit a network's ``state_dict``: one phrase per tensor, network order.

    A tensor differs when its shape differs, when the network has it and the file does not, or the file has
    it and the network does not — what makes ``load_state_dict`` fail, counted here instead of parsed from
    PyTorch's error text.
    """
    out = []
    for key, tensor in expected.items():
        if key not in saved:
            out.append(f"{key} {_shape(tensor)} missing from the file")
        elif tuple(saved[key].shape) != tuple(tensor.shape):
            out.append(f"{key} {_shape(saved[key])} vs {_shape(tensor)}")
    out += [f"{key} {_shape(saved[key])} not in the network" for key in saved if key not in expected]
    return out


def model_from_checkpoint(
    ckpt: dict, device: torch.device, path: str | os.PathLike = "checkpoint"
) -> torch.nn.Module:
    """Rebuild the network recorded in a checkpoint (config migrated if older) and load its weights (eval).

    Raises:
        ConfigError: the recorded config is incomplete or invalid (from :func:`checkpoint_config`).
        InputError: the weights do not fit the recorded network, e.g. ``best.pt: weights do not match the
            recorded network: 85 tensors differ, first encoder.0.0.0.weight [4,1,3,3,3] vs [8,1,3,3,3]``
            (shape in the file vs shape in the network).
    """
    cfg = checkpoint_config(ckpt, path)
    plan = checkpoint_plan(ckpt, path)
    try:
        model = build_network(cfg.model, plan.in_channels, len(ckpt["labels"]), plan.pool_kernels)
    except ValueError as exc:  # pool kernels that do not fit the recorded network's depth
        raise InputError(f"{path}: {exc}") from None
    differ = state_dict_differences(ckpt["model"], model.state_dict())
    if differ:
        count = f"{len(differ)} tensor{'s differ' if len(differ) > 1 else ' differs'}"
        raise InputError(f"{path}: weights do not match the recorded network: {count}, first {differ[0]}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # same names and shapes, yet refused (e.g. a dtype torch cannot copy)
        raise InputError(
            f"{path}: weights do not match the recorded network ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device).eval()


def checkpoint_plan(ckpt: dict, path: str | os.PathLike = "checkpoint") -> Plan:
    """The plan a checkpoint carries, as a :class:`~medseg.io.plan.Plan` (the file keeps its dict form).

    Raises:
        PlanError: a malformed plan (an :class:`InputError` naming the file and the key).
    """
    return Plan.from_dict(ckpt["plan"], where=f"{path}: checkpoint plan")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedCheckpoints:
    """What one or several checkpoints give a predictor: networks (eval, on the device) and their windows, the
    first one's config, plan, label names and recorded postprocessing, the mirror axes all of them allow."""

    paths: list[Path]
    sha256: list[str]
    models: list[torch.nn.Module]
    roi_sizes: list[list[int]]
    config: Config
    plan: Plan
    label_names: dict[str, int]
    postprocess: Any
    mirror_axes: list[int]


def load_checkpoints(
    paths: Sequence[str | os.PathLike], device: torch.device, roi_size: Sequence[int] | None = None
) -> LoadedCheckpoints:
    """Read, check and build every checkpoint of ``paths`` (an ensemble when several).

    Each network's window is ``roi_size``, else its own config's ``infer.roi_size``, else its plan's patch.

    Raises:
        InputError: an unusable checkpoint, or checkpoints that cannot be averaged
            (:func:`medseg.inference.ensemble.check_ensemble`, checked before building further networks).
        ConfigError: a checkpoint's recorded config is invalid.
    """
    paths = [Path(p) for p in paths]
    models, windows, hashes = [], [], []
    recorded: list[tuple[Path, dict]] = []
    config = None
    for path in paths:
        ckpt = load_checkpoint(path)
        hashes.append(file_sha256(path))
        cfg = checkpoint_config(ckpt, path)
        plan = checkpoint_plan(ckpt, path)
        summary = {"labels": ckpt["labels"], "plan": plan, "postprocess": ckpt.get("postprocess")}
        recorded.append((path, summary))
        check_ensemble(recorded)
        models.append(model_from_checkpoint(ckpt, device, path))
        window = roi_size or cfg.infer.roi_size or plan.patch_size
        windows.append([int(r) for r in window])
        config = config or cfg
        del ckpt  # the weights live in the network now
    first = recorded[0][1]
    shared = set.intersection(*(set(s["plan"].mirror_axes) for _, s in recorded))
    return LoadedCheckpoints(
        paths=paths,
        sha256=hashes,
        models=models,
        roi_sizes=windows,
        config=config,
        plan=first["plan"],
        label_names={str(k): int(v) for k, v in first["labels"].items()},
        postprocess=first["postprocess"],
        mirror_axes=sorted(shared),
    )
