"""Experiment configuration: defaults, YAML loading, ``key=value`` overrides and validation.

A config is a nested dict. :data:`DEFAULTS` holds every key with its default; a YAML file only states what it
changes, ``--set train.epochs=5`` overrides one value (the value is parsed as YAML, so ``[1, 2]`` and
``true`` work). Unknown keys are an error that suggests the closest valid key, so a typo never silently
falls back to a default. The resolved config is written into each run folder and into every checkpoint.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "data": {
        "root": None,  # MSD/nnU-Net dataset folder with dataset.json
        "val_fraction": 0.2,  # held out from the training cases for validation
        "val_cases": None,  # or an explicit list of case names
        "cache_rate": 1.0,
        "num_workers": 0,
    },
    "preprocess": {
        "orientation": "RAS",
        "spacing": "auto",  # "auto" = median spacing of the training set, or [sx, sy, sz] in mm
        "intensity": {
            "mode": "window",  # window: clip + scale to [0, 1];  zscore: clip to fg percentiles + z-score
            "window": [-175.0, 250.0],
            "percentiles": [0.5, 99.5],
        },
        "crop_foreground": True,  # crop to the body (HU > -500) before training and inference
    },
    "augment": {
        "patch_size": [96, 96, 64],
        "samples_per_volume": 2,
        "pos_neg": [2, 1],  # foreground oversampling: ratio of patches centred on foreground
        "flip_prob": 0.0,  # 0 by default: flips swap left/right organs (kidney_left vs kidney_right)
        "affine_prob": 0.2,  # random rotation + scaling
        "rotate_deg": 15.0,
        "scale": 0.1,
        "intensity_prob": 0.15,  # random intensity scale/shift and Gaussian noise
    },
    "model": {
        "name": "attention_unet",
        "filters": [16, 32, 64, 128, 256],
        "norm": "instance",
        "skip_gate": "grid",
        "bottleneck": "none",
        "decoder_fusion": "concat",
        "head": "plain",
        "scales": [1.0],
        "scale_fusion": "attention",
        "deep_supervision": True,
        "options": {},  # per-block keyword arguments, e.g. {pam: {chunk_size: 4096}}
    },
    "loss": {
        "dice_weight": 1.0,
        "ce_weight": 1.0,
        "deep_supervision_weights": [1.0, 0.5, 0.25, 0.125],
        "aux_weight": 0.4,  # auxiliary segmentation outputs (DANet branches, reverse branch, scales)
        "se_weight": 0.2,  # SE-loss (presence BCE) of the context-encoding block
    },
    "optim": {
        "name": "adamw",  # adamw | sgd
        "lr": 0.003,
        "weight_decay": 0.0001,
        "momentum": 0.99,  # sgd only (nesterov)
        "poly_power": 0.9,
    },
    "train": {
        "output": "runs/attention_unet",
        "epochs": 50,
        "iters_per_epoch": 50,
        "batch_size": 2,
        "val_every": 5,
        "seed": 0,
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "amp": True,  # used on CUDA only
        "max_minutes": None,  # stop cleanly after this wall time (checkpoint written)
        "progress": True,
    },
    "infer": {
        "roi_size": None,  # default: augment.patch_size
        "overlap": 0.5,
        "sw_batch_size": 2,
        "mode": "gaussian",
    },
}


class ConfigError(ValueError):
    """Invalid configuration key or value."""


def deep_merge(base: dict, update: dict, path: str = "") -> dict:
    """Return ``base`` updated by ``update``; keys of ``update`` must exist in ``base``."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        where = f"{path}{key}"
        if key not in out:
            close = difflib.get_close_matches(str(key), [str(k) for k in out], n=1)
            hint = f"; did you mean {path + close[0]!r}?" if close else ""
            valid = ", ".join(sorted(str(k) for k in out))
            raise ConfigError(f"unknown config key {where!r}{hint} (valid keys here: {valid})")
        if isinstance(out[key], dict) and isinstance(value, dict) and key != "options":
            out[key] = deep_merge(out[key], value, f"{where}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """``"train.epochs=5"`` → ``{"train": {"epochs": 5}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults ← YAML file ← overrides (relative paths are relative to the working directory)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        cfg = deep_merge(cfg, loaded)
    for text in overrides or []:
        cfg = deep_merge(cfg, parse_override(text))
    return cfg


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
