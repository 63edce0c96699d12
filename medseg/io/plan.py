"""The preprocessing plan as a typed, frozen object: every key, its type and its one default, here.

The plan is what ``medseg plan`` writes (``plan.json``), what training uses and what every checkpoint
carries: orientation, target spacing, CT intensity normalisation, body crop, input channels, patch and pool
kernels, batch size, labels, the axes test-time mirroring may flip, and the planner's and fingerprint's
informative records (:func:`medseg.planning.fingerprint.make_plan` makes it). Code reads ``plan.spacing``,
never ``plan.get("spacing", …)``; the JSON form lives only where a plan is written or read — a plan file, a
checkpoint — through :meth:`Plan.from_dict` and :meth:`Plan.to_dict`:

>>> plan = Plan.from_dict({"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
...                        "intensity": {"mode": "window", "a_min": -200.0, "a_max": 300.0},
...                        "patch_size": [96, 96, 64]})
>>> plan.in_channels, plan.crop_foreground, plan.mirror_axes
(1, True, ())
>>> Plan.from_dict({**plan.to_dict(), "spacing": [1.5, 0.0, 1.5]}, where="plan.json")
Traceback (most recent call last):
...
medseg.io.plan.PlanError: plan.json: spacing: expected three numbers > 0 (mm), found [1.5, 0.0, 1.5]

Why in :mod:`medseg.io`: a checkpoint's plan is checked when the checkpoint is read
(:func:`medseg.io.checkpoint.check_contents`), and this is the one checker; the transforms, the planner,
inference and training, all in higher rooms, take a :class:`Plan`. The checkpoint itself keeps the plain
dict (:meth:`Plan.to_dict`): it is loaded with ``weights_only=True``, which holds plain containers only.

Plans written before a key existed still load: ``crop_foreground`` (on), ``in_channels`` (1) and
``mirror_axes`` (none) take their defaults, and are written from then on; ``pool_kernels`` (absent: 2×2×2 at
every pooling), ``batch_size``, ``labels``, ``channel_names``, ``planner`` and ``fingerprint`` stay absent,
so such a plan is written back as it was read. Unknown keys are refused, with the closest valid one.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from medseg.io.nifti import InputError

INTENSITY_MODES = ("window", "zscore")
#: Keys every plan holds (what preprocessing and the sliding window need); the rest have defaults.
REQUIRED_PLAN_KEYS = ("orientation", "spacing", "intensity", "patch_size")
_PAIRS = ("LR", "AP", "SI")


class PlanError(InputError):
    """A plan key with a wrong type or value; one line naming where the plan came from and the key."""


def _fail(where: str, key: str, expected: str, value: object) -> PlanError:
    return PlanError(f"{where}: {key}: expected {expected}, found {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_list(value: object) -> bool:
    return isinstance(value, list | tuple)


def _orientation_ok(code: object) -> bool:
    if not isinstance(code, str) or len(code) != 3:
        return False
    used = sorted(next((i for i, pair in enumerate(_PAIRS) if c in pair), -1) for c in code)
    return used == [0, 1, 2]


def _unknown(where: str, given: Mapping, names: list[str]) -> None:
    for key in given:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; valid keys: {', '.join(names)}"
            raise PlanError(f"{where}: unknown plan key {key!r}{hint}")


def _freeze(value: Any) -> Any:
    """A JSON value made read-only: mappings become ``MappingProxyType``, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if _is_list(value):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """The inverse of :func:`_freeze`: plain dicts and lists, as JSON and ``torch.save`` write them."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Intensity:
    """CT intensity normalisation of one input channel (:func:`medseg.transforms.presets.intensity_transforms`).

    ``window``: clip to ``[a_min, a_max]`` HU and scale to [0, 1]; ``zscore`` (nnU-Net's CT scheme): clip to
    the foreground's 0.5/99.5 percentiles ``[a_min, a_max]``, then subtract ``mean`` and divide by ``std``.
    """

    mode: str
    a_min: float
    a_max: float
    mean: float | None = None
    std: float | None = None

    @classmethod
    def from_dict(cls, d: object, where: str = "plan", key: str = "intensity") -> Intensity:
        if not isinstance(d, Mapping) or d.get("mode") not in INTENSITY_MODES:
            raise _fail(where, key, "a mapping with mode window or zscore", d)
        _unknown(f"{where}: {key}", d, [f.name for f in fields(cls)])
        needed = ("a_min", "a_max", "mean", "std") if d["mode"] == "zscore" else ("a_min", "a_max")
        values = {}
        for name in ("a_min", "a_max", "mean", "std"):
            if name in needed or name in d:
                if not _is_number(d.get(name)):
                    raise _fail(where, f"{key}.{name}", f"a number (mode {d['mode']})", d.get(name))
                values[name] = float(d[name])
        return cls(mode=d["mode"], **values)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"mode": self.mode, "a_min": self.a_min, "a_max": self.a_max}
        out.update({k: v for k, v in (("mean", self.mean), ("std", self.std)) if v is not None})
        return out


@dataclass(frozen=True)
class Plan:
    """The preprocessing and training plan (see the module docstring for the JSON form and old plans).

    Attributes:
        orientation: axis codes of the model grid, e.g. ``RAS``.
        spacing: target voxel size (mm) per model axis.
        intensity: one :class:`Intensity` for every channel alike, or a tuple of one per input channel.
        patch_size: the training patch (the sliding window unless ``infer.roi_size`` is set).
        crop_foreground: crop to the body (HU above :data:`medseg.transforms.presets.BODY_HU_THRESHOLD`).
        in_channels: input channels of the network.
        mirror_axes: model axes the network saw mirrored in training (what test-time mirroring may flip).
        pool_kernels: per pooling step the kernel per axis (1 or 2); None: 2×2×2 at every pooling.
        batch_size: training batch size; None in plans that predate it.
        labels: label name → value; None when a plan was made without them.
        channel_names: one name per input channel; None in plans that predate them (see :meth:`channels`).
        planner: the planner's record (rules used, memory estimate), informative only.
        fingerprint: the dataset fingerprint's summary (median spacing, foreground HU, class fractions).
    """

    orientation: str
    spacing: tuple[float, float, float]
    intensity: Intensity | tuple[Intensity, ...]
    patch_size: tuple[int, int, int]
    crop_foreground: bool = True
    in_channels: int = 1
    mirror_axes: tuple[int, ...] = ()
    pool_kernels: tuple[tuple[int, int, int], ...] | None = None
    batch_size: int | None = None
    labels: Mapping[str, int] | None = None
    channel_names: tuple[str, ...] | None = None
    planner: Mapping[str, Any] | None = None
    fingerprint: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: object, where: str = "plan") -> Plan:
        """The plan of a JSON object (a plan file, a checkpoint's ``plan``), every key checked.

        Raises:
            PlanError: not a mapping, a required key missing, an unknown key, or a key with a wrong type or
                value — one line: ``<where>: <key>: expected …, found …``.
        """
        if isinstance(d, Plan):
            return d
        if not isinstance(d, Mapping):
            raise PlanError(f"{where}: expected a mapping, found {type(d).__name__}")
        missing = [k for k in REQUIRED_PLAN_KEYS if k not in d]
        if missing:
            raise PlanError(f"{where}: missing {', '.join(missing)} (a run's plan.json holds them)")
        _unknown(where, d, [f.name for f in fields(cls)])
        if not _orientation_ok(d["orientation"]):
            raise _fail(where, "orientation", "three axis codes like RAS or LPS", d["orientation"])
        spacing = d["spacing"]
        if not (_is_list(spacing) and len(spacing) == 3 and all(_is_number(s) and s > 0 for s in spacing)):
            raise _fail(where, "spacing", "three numbers > 0 (mm)", spacing)
        patch = d["patch_size"]
        if not (_is_list(patch) and len(patch) == 3 and all(_is_int(n, 1) for n in patch)):
            raise _fail(where, "patch_size", "three integers ≥ 1", patch)
        values: dict[str, Any] = {
            "orientation": d["orientation"],
            "spacing": tuple(float(s) for s in spacing),
            "patch_size": tuple(int(n) for n in patch),
        }
        if "crop_foreground" in d:
            if not isinstance(d["crop_foreground"], bool):
                raise _fail(where, "crop_foreground", "true or false", d["crop_foreground"])
            values["crop_foreground"] = d["crop_foreground"]
        if "in_channels" in d:
            if not _is_int(d["in_channels"], 1):
                raise _fail(where, "in_channels", "an integer ≥ 1", d["in_channels"])
            values["in_channels"] = d["in_channels"]
        channels = values.get("in_channels", cls.in_channels)
        values["intensity"] = _intensity(d["intensity"], channels, where)
        values.update(_optional(d, channels, where))
        return cls(**values)

    def to_dict(self) -> dict:
        """The JSON form, as :func:`medseg.planning.fingerprint.make_plan` writes it (same keys, same order;
        keys absent when read stay absent)."""
        intensity = self.intensity
        out: dict[str, Any] = {
            "orientation": self.orientation,
            "spacing": list(self.spacing),
            "intensity": intensity.to_dict()
            if isinstance(intensity, Intensity)
            else [it.to_dict() for it in intensity],
            "crop_foreground": self.crop_foreground,
            "patch_size": list(self.patch_size),
        }
        if self.pool_kernels is not None:
            out["pool_kernels"] = [list(k) for k in self.pool_kernels]
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        if self.labels is not None:
            out["labels"] = dict(self.labels)
        out["in_channels"] = self.in_channels
        if self.channel_names is not None:
            out["channel_names"] = list(self.channel_names)
        out["mirror_axes"] = list(self.mirror_axes)
        for key in ("planner", "fingerprint"):
            if getattr(self, key) is not None:
                out[key] = _thaw(getattr(self, key))
        return out

    def __reduce__(self):
        """Pickled as its JSON form (``MappingProxyType`` does not pickle): for ``broadcast_object_list``."""
        return (Plan.from_dict, (self.to_dict(),))

    def channel_intensities(self) -> tuple[Intensity, ...]:
        """One :class:`Intensity` per input channel (a single one applies to every channel)."""
        if isinstance(self.intensity, Intensity):
            return (self.intensity,) * self.in_channels
        return self.intensity

    def channels(self) -> tuple[str, ...]:
        """The input channel names; plans that predate them: ``CT`` for one channel, else ``0``, ``1``, …"""
        if self.channel_names is not None:
            return self.channel_names
        return ("CT",) if self.in_channels == 1 else tuple(str(c) for c in range(self.in_channels))

    def class_fractions(self) -> tuple[float, ...]:
        """Voxel fraction per label value in the training set (empty when the fingerprint lacks them)."""
        return tuple(float(f) for f in (self.fingerprint or {}).get("class_fractions", ()))


def _intensity(value: object, channels: int, where: str) -> Intensity | tuple[Intensity, ...]:
    if not _is_list(value):
        return Intensity.from_dict(value, where)
    if len(value) != channels:
        raise _fail(where, "intensity", f"one mapping per input channel ({channels})", value)
    return tuple(Intensity.from_dict(it, where, f"intensity[{c}]") for c, it in enumerate(value))


def _optional(d: Mapping, channels: int, where: str) -> dict[str, Any]:
    """The keys with defaults or None when absent, checked and frozen."""
    values: dict[str, Any] = {}
    if "mirror_axes" in d:
        axes = d["mirror_axes"]
        if not (_is_list(axes) and all(_is_int(a, 0) and a <= 2 for a in axes)):
            raise _fail(where, "mirror_axes", "a list of axes 0, 1, 2", axes)
        values["mirror_axes"] = tuple(axes)
    if d.get("pool_kernels") is not None:  # None: as absent (the checkpoint check allowed it)
        kernels = d["pool_kernels"]
        ok = _is_list(kernels) and all(
            _is_list(k) and len(k) == 3 and all(_is_int(v, 1) and v <= 2 for v in k) for k in kernels
        )
        if not ok:
            raise _fail(where, "pool_kernels", "a list of kernels of three values 1 or 2", kernels)
        values["pool_kernels"] = tuple(tuple(k) for k in kernels)
    if "batch_size" in d:
        if not _is_int(d["batch_size"], 1):
            raise _fail(where, "batch_size", "an integer ≥ 1", d["batch_size"])
        values["batch_size"] = d["batch_size"]
    if "labels" in d:
        labels = d["labels"]
        if not (
            isinstance(labels, Mapping)
            and all(isinstance(k, str) and _is_int(v, 0) for k, v in labels.items())
        ):
            raise _fail(where, "labels", "a mapping of label names to values ≥ 0", labels)
        values["labels"] = MappingProxyType(dict(labels))
    if "channel_names" in d:
        names = d["channel_names"]
        if not (_is_list(names) and len(names) == channels and all(isinstance(n, str) for n in names)):
            raise _fail(where, "channel_names", f"{channels} channel name(s)", names)
        values["channel_names"] = tuple(names)
    for key in ("planner", "fingerprint"):
        if key in d:
            if not isinstance(d[key], Mapping):
                raise _fail(where, key, "a mapping", d[key])
            values[key] = _freeze(d[key])
    return values
