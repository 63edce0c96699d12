"""Loading a config: defaults ← YAML recipe ← ``key=value`` overrides, checked before anything else runs.

A YAML file only states what it changes; ``--set train.epochs=5`` overrides one value (parsed as YAML, so
``[1, 2]`` and ``true`` work). Unknown keys are an error suggesting the closest valid key, wrong enumerated
values an error listing the valid names (see :mod:`medseg.config.schema`). Shipped recipes (the demo, the
ablation variants) are YAML files in ``configs/`` found by :func:`recipe_path` and loaded the same way.

Checkpoints store the config as plain data (:func:`config_to_dict`); :func:`config_from_dict` reads it back
and migrates what older versions wrote (:data:`MIGRATIONS`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from medseg.config.schema import SECTIONS, Config, ConfigError, _did_you_mean, _make

#: Keys that no longer exist, with what to write instead.
REMOVED_KEYS = {
    ("model", "skip_gate"): (
        "model.skip_gate was removed: the network name is the one switch for attention gates — "
        "model.name: unet (no gates) or model.name: attention_unet (grid attention gates)"
    ),
    ("train", "amp"): (
        "train.amp was replaced by train.precision: auto (bf16 on CUDA and on CPUs with native bf16, "
        "else fp32), fp32, bf16 or fp16 (CUDA) — amp: false is precision: fp32"
    ),
}


def parse_override(text: str) -> dict:
    """``"train.epochs=5"`` → ``{"train": {"epochs": 5}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {text!r}: value is not valid YAML ({str(exc).splitlines()[0]})"
        ) from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(base: dict, update: dict, path: str = "") -> dict:
    """``base`` updated by ``update`` (nested dicts merged; ``model.options`` replaced as a whole)."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(out.get(key), dict) and isinstance(value, dict) and f"{path}{key}" != "model.options":
            out[key] = _merge(out[key], value, f"{path}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_keys(raw: dict, source: str) -> None:
    """Unknown top-level sections and removed keys, named with their source (file or ``--set``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown config key {section}{_did_you_mean('', section, list(SECTIONS))} "
                f"(valid sections: {', '.join(SECTIONS)})"
            )
        for key in values if isinstance(values, dict) else ():
            if (section, key) in REMOVED_KEYS:
                raise ConfigError(f"{source}: {REMOVED_KEYS[section, key]}")


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and check a :class:`Config` from nested plain data (missing keys take their defaults)."""
    _check_keys(raw, source)
    try:
        sections = {name: _make(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
        return Config(**sections)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:  # a value of the wrong shape, e.g. a list where a mapping belongs
        raise ConfigError(f"{source}: {exc}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    _check_keys(raw, str(path))
    return raw


def load_config(
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] | None = None,
) -> Config:
    """Defaults ← YAML file(s) ← overrides, checked (relative paths are relative to the working directory).

    Several files compose left to right (a later file overrides an earlier one), e.g. a variant recipe
    followed by the ablation budget.

    Raises:
        ConfigError: missing or malformed file, unknown key, invalid value or impossible combination; the
            message names the file or override, the key and the allowed values.
    """
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    raw: dict = {}
    for p in paths:
        raw = _merge(raw, _read_yaml(Path(p)))
    for text in overrides or []:
        update = parse_override(text)
        _check_keys(update, f"--set {text}")
        raw = _merge(raw, update)
    source = " + ".join(str(p) for p in paths) or "defaults"
    if overrides:
        source += " with --set " + " --set ".join(overrides)
    return config_from_dict(raw, source)


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dicts and lists (YAML, JSON and ``torch.load(weights_only=True)`` safe)."""
    return _plain(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written to ``config.yaml`` in every run folder)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _migrate_skip_gate(raw: dict) -> list[str]:
    """Version 1 wrote ``model.skip_gate`` (default ``grid``); what it *built* decides the new name.

    Version 1 built the gates from ``skip_gate`` alone: ``name: unet`` with the default ``skip_gate: grid``
    built a U-Net *with* gates, and ``name: attention_unet`` with ``skip_gate: none`` one without. The
    weights follow ``skip_gate``, so the migrated name does too.
    """
    model = raw.get("model") or {}
    if "skip_gate" not in model:
        return []
    gate = model.pop("skip_gate")
    name = model.get("name", "attention_unet")
    built = "attention_unet" if gate == "grid" else "unet"
    model["name"] = built
    return [f"model.skip_gate={gate} with model.name={name} → model.name={built}"] if built != name else []


def _migrate_removed_sections(raw: dict) -> list[str]:
    notes = []
    for section in list(raw):
        if section not in SECTIONS:
            raw.pop(section)
            notes.append(f"dropped unknown section {section}")
    return notes


def _migrate_amp(raw: dict) -> list[str]:
    """Up to 0.2, ``train.amp`` (float16 autocast, CUDA only) was the precision switch; ``train.precision``
    replaced it. ``amp: true`` → ``auto`` (the predictor still uses float16 on CUDA for such a checkpoint),
    ``amp: false`` → ``fp32``. Checkpoints of format version 2 hold either spelling, so this runs for all."""
    train = raw.get("train") or {}
    if "amp" not in train:
        return []
    amp = train.pop("amp")
    train.setdefault("precision", "auto" if amp else "fp32")
    return [f"train.amp={amp} → train.precision={train['precision']}"]


#: Checkpoint config migrations, applied in order to configs written by checkpoint format versions < 2.
MIGRATIONS = (_migrate_skip_gate, _migrate_removed_sections)


def migrate_config(raw: dict[str, Any], version: int) -> tuple[dict[str, Any], list[str]]:
    """Bring a config stored by checkpoint format ``version`` up to date; return it and what changed."""
    raw = copy.deepcopy(raw)
    notes: list[str] = []
    if version < 2:
        for step in MIGRATIONS:
            notes += step(raw)
    notes += _migrate_amp(raw)
    return raw, notes


def checkpoint_config(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> Config:
    """The checked :class:`Config` recorded in a loaded checkpoint, migrated from older format versions.

    A checkpoint records its whole resolved config (:func:`config_to_dict`, every section, since version 1),
    so a missing section is an incomplete or edited file — it is not filled with today's defaults, which
    would silently rebuild another network than the one the weights belong to.

    Raises:
        ConfigError: the recorded config is not a mapping, lacks sections or holds invalid values — one line
            naming the checkpoint file and the key, e.g. ``best.pt (recorded config): missing section model``.
    """
    source = f"{path} (recorded config)"
    raw = ckpt.get("config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: not a mapping (found {type(raw).__name__})")
    version = ckpt.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"{path}: checkpoint format version is not an integer ({version!r})")
    migrated, _ = migrate_config(raw, version)
    missing = [name for name in SECTIONS if name not in migrated]
    if missing:
        raise ConfigError(
            f"{source}: missing section{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            "(incomplete or edited checkpoint)"
        )
    return config_from_dict(migrated, source)


def recipe_path(name: str) -> Path:
    """Path of a shipped recipe, e.g. ``recipe_path("demo")`` or ``recipe_path("variants/unet")``.

    Recipes live in the repository's top-level ``configs/``; a built wheel ships the same files inside the
    package as ``medseg/configs/`` (see ``pyproject.toml``).
    """
    package = Path(__file__).resolve().parents[1]
    relative = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    folders = [f for f in (package / "configs", package.parent / "configs") if f.is_dir()]
    for folder in folders:
        if (folder / relative).is_file():
            return folder / relative
    shipped = sorted({str(p.relative_to(f).with_suffix("")) for f in folders for p in f.rglob("*.yaml")})
    raise ConfigError(
        f"no shipped recipe {name!r}{_did_you_mean('', name, shipped)} (recipes: {', '.join(shipped) or 'none found'})"
    )
