"""The experiment configuration as frozen, typed dataclasses: every key, its type, its one default.

Why dataclasses (and not a dict of defaults plus ``.get(key, default)`` in the code): each key is declared
once, with its type and default, here; code reads ``cfg.train.epochs`` (a typo is an ``AttributeError``, not a
silent default); sections are frozen, so nothing changes a config after it was checked. This is what nnU-Net's
``ConfigurationManager`` gives for plans, without a class per variant.

Enumerated values (network name, bottleneck, fusion, head, norm, optimizer, intensity mode, device, …) are
checked when a section is created, with the allowed values taken from where they are implemented — the
network registry (:mod:`medseg.nets.registry`) for every network part — and the closest name suggested.
Combinations that cannot work (a patch too small for the network's poolings at its smallest scale) are
checked when the whole :class:`Config` is created. Neither needs torch or any data, so a wrong value fails
in a fraction of a second.

Sequences are stored as tuples (frozen all the way down); :func:`medseg.config.loading.config_to_dict` turns
a config back into plain YAML-able data for ``config.yaml`` and checkpoints.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from medseg.device import DEVICE_CHOICES, is_device_name
from medseg.nets.registry import (
    BOTTLENECKS,
    FUSIONS,
    HEADS,
    NETWORKS,
    NORMS,
    OPTION_BLOCKS,
    SCALE_FUSIONS,
    suggest,
)

if TYPE_CHECKING:
    from medseg.io.plan import Plan


class ConfigError(ValueError):
    """Invalid configuration key or value; the message names the key, the value and what is allowed."""


#: ``augment.patch_size`` / ``train.batch_size`` value that takes the planned value (medseg.planning.planner).
AUTO = "auto"
INTENSITY_MODES = ("window", "zscore")
OPTIMIZERS = ("adamw", "sgd")
CACHE_MODES = ("memory", "disk", "none")  # see medseg.engine.caching
#: ``train.precision``: autocast dtype of the training step (resolved per device by medseg.engine.step).
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRAIN_LAYOUTS = ("auto", "standard", "channels_last")
TRAIN_QUANTIZE = ("auto", "on", "off")
BLEND_MODES = ("gaussian", "constant")  # the sliding window's ``mode`` (medseg.inference.sliding)
ORIENTATIONS = tuple(a + b + c for a in "RL" for b in "AP" for c in "SI") + tuple(
    a + b + c for a in "AP" for b in "RL" for c in "SI"
)


def _choice(where: str, value: object, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise ConfigError(
            f"{where}: {value!r} is not valid; valid values: {', '.join(map(str, valid))}.{suggest(value, valid)}"
        )


def _numbers(where: str, value: Any, n: int | None, kind: type, positive: bool = False) -> tuple:
    """``value`` as a tuple of ``n`` numbers of ``kind`` (any length when ``n`` is None)."""
    if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n) or not value:
        raise ConfigError(f"{where}: expected {n or 'a list of'} numbers, got {value!r}")
    out = tuple(_number(where, v, kind) for v in value)
    if positive and any(v <= 0 for v in out):
        raise ConfigError(f"{where}: every value must be > 0, got {list(out)}")
    return out


def _number(where: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        number = kind(value) if kind is float else int(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: expected {'a number' if kind is float else 'an integer'}, got {value!r}"
        ) from None
    if kind is int and isinstance(value, float) and value != number:
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _range(
    where: str, value: float, lo: float | None = None, hi: float | None = None, hi_open: bool = False
) -> None:
    if (lo is not None and value < lo) or (hi is not None and (value >= hi if hi_open else value > hi)):
        bound = f"[{lo}, {hi}{')' if hi_open else ']'}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{where}: {value!r} is out of range, expected {bound}")


class _Section:
    """Coerces declared number fields (YAML ``3e-3`` is a string, ``5`` is an int) and validates."""

    _name = ""
    _ints: tuple[str, ...] = ()
    _floats: tuple[str, ...] = ()

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)

    def _where(self, key: str) -> str:
        return f"{self._name}.{key}"

    def __post_init__(self) -> None:
        for key in self._ints:
            self._set(key, _number(self._where(key), getattr(self, key), int))
        for key in self._floats:
            self._set(key, _number(self._where(key), getattr(self, key), float))
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the dataset is, how it is split and where its preprocessed cases are kept."""

    root: str | None = None  # MSD/nnU-Net dataset folder with dataset.json
    val_fraction: float = 0.2  # held out from the training cases for validation
    val_cases: tuple[str, ...] | None = None  # or an explicit list of case names
    cache: str = "memory"  # memory (CacheDataset) | disk (PersistentDataset) | none: see engine/caching.py
    cache_dir: str | None = None  # disk cache root; None: <train.output>/../.medseg_cache
    cache_rate: float = 1.0  # memory only: fraction of the cases held in RAM
    num_workers: int = 0
    folds: int = 5  # cross-validation folds of `medseg train --fold K` (nnU-Net's 5-fold CV)

    _name = "data"
    _ints = ("num_workers", "folds")
    _floats = ("val_fraction", "cache_rate")

    def validate(self) -> None:
        if self.root is not None:
            self._set("root", str(self.root))
        if self.val_cases is not None:
            if not isinstance(self.val_cases, (list, tuple)):
                raise ConfigError(f"data.val_cases: expected a list of case names, got {self.val_cases!r}")
            self._set("val_cases", tuple(str(c) for c in self.val_cases))
        _range("data.val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)
        _choice("data.cache", self.cache, CACHE_MODES)
        if self.cache_dir is not None:
            self._set("cache_dir", str(self.cache_dir))
        _range("data.cache_rate", self.cache_rate, 0.0, 1.0)
        _range("data.num_workers", self.num_workers, 0)
        _range("data.folds", self.folds, 2)


@dataclass(frozen=True)
class IntensityConfig(_Section):
    """CT intensity normalisation: a HU window scaled to [0, 1], or nnU-Net's percentile clip + z-score."""

    mode: str = "window"  # window: clip + scale to [0, 1];  zscore: clip to fg percentiles + z-score
    window: tuple[float, float] = (-175.0, 250.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    _name = "preprocess.intensity"

    def validate(self) -> None:
        _choice("preprocess.intensity.mode", self.mode, INTENSITY_MODES)
        self._set("window", _numbers("preprocess.intensity.window", self.window, 2, float))
        self._set("percentiles", _numbers("preprocess.intensity.percentiles", self.percentiles, 2, float))
        if self.window[0] >= self.window[1]:
            raise ConfigError(f"preprocess.intensity.window: low must be < high, got {list(self.window)}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(
                f"preprocess.intensity.percentiles: need 0 <= low < high <= 100, got {[lo, hi]}"
            )


@dataclass(frozen=True)
class PreprocessConfig(_Section):
    """Resampling and normalisation applied identically in training and inference (stored in the plan)."""

    orientation: str = "RAS"
    spacing: str | tuple[float, float, float] = "auto"  # "auto" = median training spacing, or [sx, sy, sz] mm
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    crop_foreground: bool = True  # crop to the body (HU > -500) before training and inference

    _name = "preprocess"

    def validate(self) -> None:
        _choice("preprocess.orientation", self.orientation, ORIENTATIONS)
        if self.spacing != "auto":
            self._set("spacing", _numbers("preprocess.spacing", self.spacing, 3, float, positive=True))
        if isinstance(self.intensity, dict):
            self._set("intensity", _make(IntensityConfig, self.intensity, "preprocess.intensity"))


@dataclass(frozen=True)
class AugmentConfig(_Section):
    """Patch sampling and augmentation (training only)."""

    patch_size: str | tuple[int, int, int] = (96, 96, 64)  # or "auto": planned (medseg.planning.planner)
    samples_per_volume: int = 2
    pos_neg: tuple[float, float] = (2.0, 1.0)  # ratio of patches centred on foreground vs background
    class_ratios: tuple[float, ...] | None = None  # per label incl. background (RandCropByLabelClassesd)
    flip_prob: float = 0.0  # 0 by default: flips swap left/right organs (kidney_left vs kidney_right)
    affine_prob: float = 0.2  # random rotation + scaling
    rotate_deg: float = 15.0
    scale: float = 0.1
    intensity_prob: float = 0.15  # random intensity scale/shift and Gaussian noise

    _name = "augment"
    _ints = ("samples_per_volume",)
    _floats = ("flip_prob", "affine_prob", "rotate_deg", "scale", "intensity_prob")

    def validate(self) -> None:
        if self.patch_size != AUTO:
            self._set("patch_size", _numbers("augment.patch_size", self.patch_size, 3, int, positive=True))
        self._set("pos_neg", _numbers("augment.pos_neg", self.pos_neg, 2, float))
        if min(self.pos_neg) < 0 or max(self.pos_neg) == 0:
            raise ConfigError(f"augment.pos_neg: need two ratios >= 0, not both 0, got {list(self.pos_neg)}")
        if self.class_ratios is not None:
            self._set("class_ratios", _numbers("augment.class_ratios", self.class_ratios, None, float))
            if min(self.class_ratios) < 0 or max(self.class_ratios) == 0:
                raise ConfigError(
                    f"augment.class_ratios: need ratios >= 0, not all 0, got {list(self.class_ratios)}"
                )
        _range("augment.samples_per_volume", self.samples_per_volume, 1)
        for key in ("flip_prob", "affine_prob", "intensity_prob"):
            _range(f"augment.{key}", getattr(self, key), 0.0, 1.0)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The network: a registered name plus pluggable blocks (names from :mod:`medseg.nets.registry`)."""

    name: str = "attention_unet"  # attention_unet (grid attention gates) | unet (none)
    filters: tuple[int, ...] = (16, 32, 64, 128, 256)
    norm: str = "instance"
    bottleneck: str = "none"
    decoder_fusion: str = "concat"
    head: str = "plain"
    scales: tuple[float, ...] = (1.0,)  # e.g. [1.0, 0.75, 0.5]: attention to scale
    scale_fusion: str = "attention"
    deep_supervision: bool = True
    options: dict = field(default_factory=dict)  # per-block keyword arguments, e.g. {pam: {chunk_size: 4096}}

    _name = "model"

    def validate(self) -> None:
        _choice("model.name", self.name, sorted(NETWORKS))
        _choice("model.norm", self.norm, NORMS)
        _choice("model.bottleneck", self.bottleneck, sorted(BOTTLENECKS))
        _choice("model.decoder_fusion", self.decoder_fusion, sorted(FUSIONS))
        _choice("model.head", self.head, sorted(HEADS))
        _choice("model.scale_fusion", self.scale_fusion, SCALE_FUSIONS)
        self._set("filters", _numbers("model.filters", self.filters, None, int, positive=True))
        if len(self.filters) < 2:
            raise ConfigError(f"model.filters: need at least 2 levels, got {list(self.filters)}")
        self._set("scales", _numbers("model.scales", self.scales, None, float, positive=True))
        if not isinstance(self.deep_supervision, bool):
            raise ConfigError(
                f"model.deep_supervision: expected true or false, got {self.deep_supervision!r}"
            )
        options = self.options or {}
        if not isinstance(options, dict):
            raise ConfigError(
                f"model.options: expected a mapping of block name → keyword arguments, got {options!r}"
            )
        for block, kwargs in options.items():
            _choice("model.options", block, OPTION_BLOCKS)
            if not isinstance(kwargs, dict):
                raise ConfigError(
                    f"model.options.{block}: expected a mapping of keyword arguments, got {kwargs!r}"
                )
        self._set("options", {str(k): dict(v) for k, v in options.items()})

    @property
    def poolings(self) -> int:
        """Number of 2×2×2 poolings between the full-resolution level and the bottleneck."""
        return len(self.filters) - 1


@dataclass(frozen=True)
class LossConfig(_Section):
    """Weights of the Dice+CE loss terms (:class:`medseg.losses.SegmentationLoss`)."""

    dice_weight: float = 1.0
    ce_weight: float = 1.0
    deep_supervision_weights: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    aux_weight: float = 0.4  # auxiliary segmentation outputs (DANet branches, reverse branch, scales)
    se_weight: float = 0.2  # SE-loss (presence BCE) of the context-encoding block

    _name = "loss"
    _floats = ("dice_weight", "ce_weight", "aux_weight", "se_weight")

    def validate(self) -> None:
        self._set(
            "deep_supervision_weights",
            _numbers("loss.deep_supervision_weights", self.deep_supervision_weights, None, float),
        )
        for key in ("dice_weight", "ce_weight", "aux_weight", "se_weight"):
            _range(f"loss.{key}", getattr(self, key), 0.0)


@dataclass(frozen=True)
class OptimConfig(_Section):
    """Optimizer and the per-iteration poly learning-rate schedule."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 0.003
    weight_decay: float = 0.0001
    momentum: float = 0.99  # sgd only (nesterov)
    poly_power: float = 0.9

    _name = "optim"
    _floats = ("lr", "weight_decay", "momentum", "poly_power")

    def validate(self) -> None:
        _choice("optim.name", self.name, OPTIMIZERS)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr!r}")
        _range("optim.weight_decay", self.weight_decay, 0.0)
        _range("optim.momentum", self.momentum, 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The training run: output folder, budget, device, seed."""

    output: str = "runs/attention_unet"
    epochs: int = 50
    iters_per_epoch: int = 50
    batch_size: int | str = 2  # or "auto": planned from the memory budget (medseg.planning.planner)
    val_every: int = 5
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32 (fp16: CUDA only)
    layout: str = "auto"  # auto (= standard) | standard | channels_last: engine/step.py
    max_minutes: float | None = None  # stop cleanly after this wall time (checkpoint written)
    progress: bool = True
    init_from: str | None = None  # fine-tune from this checkpoint (engine/finetune.py)
    quantize: str = "auto"  # int8 graph at the end (engine/int8.py): auto (where openvino is) | on | off

    _name = "train"
    _ints = ("epochs", "iters_per_epoch", "val_every", "seed")

    def validate(self) -> None:
        self._set("output", str(self.output))
        if self.batch_size != AUTO:
            self._set("batch_size", _number("train.batch_size", self.batch_size, int))
        for key in ("epochs", "iters_per_epoch", "batch_size", "val_every"):
            if getattr(self, key) != AUTO:
                _range(f"train.{key}", getattr(self, key), 1)
        if not is_device_name(self.device):
            _choice("train.device", self.device, DEVICE_CHOICES)
        _choice("train.precision", self.precision, TRAIN_PRECISIONS)
        _choice("train.layout", self.layout, TRAIN_LAYOUTS)
        if isinstance(self.quantize, bool):  # YAML reads a bare on / off as true / false
            self._set("quantize", "on" if self.quantize else "off")
        _choice("train.quantize", self.quantize, TRAIN_QUANTIZE)
        if self.max_minutes is not None:
            self._set("max_minutes", _number("train.max_minutes", self.max_minutes, float))
        if not isinstance(self.progress, bool):
            raise ConfigError(f"train.progress: expected true or false, got {self.progress!r}")
        if self.init_from is not None:
            if not isinstance(self.init_from, str | os.PathLike) or not str(self.init_from).strip():
                raise ConfigError(
                    f"train.init_from: expected a checkpoint path (best.pt), got {self.init_from!r}"
                )
            self._set("init_from", str(self.init_from))


@dataclass(frozen=True)
class InferConfig(_Section):
    """Sliding-window inference settings (validation during training and ``medseg segment``)."""

    roi_size: tuple[int, int, int] | None = None  # default: augment.patch_size
    overlap: float = 0.5
    sw_batch_size: int = 2
    mode: str = "gaussian"  # gaussian | constant window weighting

    _name = "infer"
    _ints = ("sw_batch_size",)
    _floats = ("overlap",)

    def validate(self) -> None:
        if self.roi_size is not None:
            self._set("roi_size", _numbers("infer.roi_size", self.roi_size, 3, int, positive=True))
        _range("infer.overlap", self.overlap, 0.0, 1.0, hi_open=True)
        _range("infer.sw_batch_size", self.sw_batch_size, 1)
        _choice("infer.mode", self.mode, BLEND_MODES)


@dataclass(frozen=True)
class Config:
    """A whole experiment: one frozen section per YAML top-level key."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def __post_init__(self) -> None:
        if self.augment.patch_size != AUTO:  # a planned patch is checked with the plan's poolings
            check_patch_fits_network(self.augment.patch_size, self.model, "augment.patch_size")
        if self.infer.roi_size is not None:
            check_patch_fits_network(self.infer.roi_size, self.model, "infer.roi_size")

    @property
    def roi_size(self) -> tuple[int, int, int]:
        """Sliding-window size: ``infer.roi_size`` or, when unset, the training patch (``auto``: the plan's,
        see :func:`plan_roi_size`)."""
        return self.infer.roi_size or self.augment.patch_size


#: YAML top-level key → its section class, in :class:`Config`'s order.
SECTIONS: dict[str, type[_Section]] = {f.name: f.default_factory for f in fields(Config)}


def plan_roi_size(cfg: Config, plan: Plan) -> tuple[int, int, int]:
    """The sliding window of a run: ``infer.roi_size``, else the patch the plan trained with."""
    return tuple(int(r) for r in (cfg.infer.roi_size or plan.patch_size))


def scaled_size(size: tuple[int, ...], scale: float) -> tuple[int, ...]:
    """Spatial size of an input rescaled by ``scale``: ``max(1, round(n·scale))`` per dimension (the rule of
    :class:`medseg.nets.blocks.scale_attention.ScaleAttention3D`)."""
    return tuple(max(1, math.floor(n * scale + 0.5)) for n in size)


def check_patch_fits_network(
    patch: tuple[int, ...], model: ModelConfig, where: str, pool_kernels: list | None = None
) -> None:
    """A patch must survive the network's poolings at every input scale.

    Each of the ``len(filters) - 1`` 2×2×2 max-poolings floors the size, so at the smallest scale every side
    needs at least ``2**poolings`` voxels; instance and batch norm also need more than one voxel in the
    bottleneck, so one side must reach ``2**(poolings + 1)``. With a plan's per-axis ``pool_kernels`` the
    product of the kernels along an axis replaces ``2**poolings`` for that axis.
    """
    need_all, need_one = 2**model.poolings, 2 ** (model.poolings + 1)
    per_axis = [need_all] * 3
    if pool_kernels is not None:
        per_axis = [math.prod(int(k[axis]) for k in pool_kernels) for axis in range(3)]
    for scale in sorted(set(model.scales)):
        size = scaled_size(tuple(patch), scale)
        bottleneck = [n // d for n, d in zip(size, per_axis, strict=True)]
        if all(n >= d for n, d in zip(size, per_axis, strict=True)) and math.prod(bottleneck) > 1:
            continue
        at = f" at scale {scale:g}" if scale != 1.0 else ""
        scaled = f" becomes {'×'.join(map(str, size))}{at} and" if scale != 1.0 else ""
        low = min(model.scales)
        if pool_kernels is not None and len(set(per_axis)) > 1:
            raise ConfigError(
                f"{where}: the patch {'×'.join(map(str, patch))}{scaled} does not fit the plan's pool_kernels "
                f"{[list(k) for k in pool_kernels]} (bottleneck {'×'.join(map(str, bottleneck))}): it needs sides "
                f"≥ {'×'.join(map(str, per_axis))} voxels and more than one bottleneck voxel at scale {low:g}"
            )
        raise ConfigError(
            f"{where}: the patch {'×'.join(map(str, patch))}{scaled} is too small for {len(model.filters)} "
            f"levels ({model.poolings} poolings, bottleneck {'×'.join(map(str, bottleneck))}): the network needs "
            f"every side ≥ {need_all} and one side ≥ {need_one} voxels at its smallest scale ({low:g}), i.e. a "
            f"patch with every side ≥ {math.ceil(need_all / low)} and one side ≥ {math.ceil(need_one / low)}"
        )


def _make(cls: type, values: Any, where: str):
    """Build section ``cls`` from a mapping, naming unknown keys with the closest valid one."""
    if isinstance(values, cls):
        return values
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(
                f"unknown config key {where}.{key}{_did_you_mean(where, key, names)} "
                f"(valid keys here: {', '.join(sorted(names))})"
            )
    return cls(**values)


def _did_you_mean(where: str, key: object, names: list[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.4)
    return f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
