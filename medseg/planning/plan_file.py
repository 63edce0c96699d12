"""The plan as a file: written by ``medseg plan``, edited by a user, read back by ``medseg train --plan``.

Like nnU-Net's ``nnUNetPlans.json``, the plan is plain JSON a user may change before training (a smaller
patch, another batch size, a fixed spacing). :func:`read_plan` checks every value before any data is read
and reports every problem at once in one line naming the file, e.g. ``plan.json: patch_size: 100 is not a
multiple of 16 (the product of pool_kernels along axis 0); batch_size: expected an integer ≥ 1, found 0``.
:func:`format_plan` is the readable summary ``medseg plan`` and ``medseg train`` print.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from medseg.io import InputError
from medseg.io.jsonfile import read_json
from medseg.io.plan import Intensity, Plan
from medseg.planning.planner import divisors

#: Keys a plan must hold to train with it (``planner`` and ``fingerprint`` are informative only).
REQUIRED_KEYS = (
    "orientation",
    "spacing",
    "intensity",
    "crop_foreground",
    "patch_size",
    "pool_kernels",
    "batch_size",
    "labels",
    "in_channels",
    "mirror_axes",
)
_PAIRS = ("LR", "AP", "SI")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _orientation_ok(code: object) -> bool:
    if not isinstance(code, str) or len(code) != 3:
        return False
    used = sorted(next((i for i, pair in enumerate(_PAIRS) if c in pair), -1) for c in code)
    return used == [0, 1, 2]


def _intensity_problems(value: object, channels: int) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) != channels:
        return [f"intensity: expected one mapping per input channel ({channels}), found {len(value)}"]
    problems = []
    for item in items:
        if not isinstance(item, dict) or item.get("mode") not in ("window", "zscore"):
            problems.append(f"intensity: expected a mapping with mode window or zscore, found {item!r}")
            continue
        keys = ("a_min", "a_max", "mean", "std") if item["mode"] == "zscore" else ("a_min", "a_max")
        bad = [k for k in keys if not _is_number(item.get(k))]
        if bad:
            problems.append(f"intensity: {', '.join(bad)} must be numbers for mode {item['mode']}")
        elif item["a_min"] >= item["a_max"]:
            problems.append(f"intensity: a_min must be < a_max, found {item['a_min']} and {item['a_max']}")
        elif item["mode"] == "zscore" and item["std"] <= 0:
            problems.append(f"intensity: std must be > 0, found {item['std']}")
    return problems


def plan_problems(plan: object, steps: int, labels: dict[str, int], channels: int) -> list[str]:
    """What keeps ``plan`` from training a network of ``steps`` poolings on a dataset with ``labels`` and
    ``channels`` input channels (empty: usable)."""
    if not isinstance(plan, dict):
        return [f"expected a JSON object, found {type(plan).__name__}"]
    missing = [k for k in REQUIRED_KEYS if k not in plan]
    if missing:
        return [f"missing {', '.join(missing)} (write a plan with medseg plan DATASET -o plan.json)"]
    problems = []
    if not _orientation_ok(plan["orientation"]):
        problems.append(
            f"orientation: expected three axis codes like RAS or LPS, found {plan['orientation']!r}"
        )
    spacing = plan["spacing"]
    if not (
        isinstance(spacing, list) and len(spacing) == 3 and all(_is_number(s) and s > 0 for s in spacing)
    ):
        problems.append(f"spacing: expected three numbers > 0 (mm), found {spacing!r}")
    if not isinstance(plan["crop_foreground"], bool):
        problems.append(f"crop_foreground: expected true or false, found {plan['crop_foreground']!r}")
    if plan["in_channels"] != channels:
        problems.append(
            f"in_channels: the dataset has {channels} input channel(s), the plan {plan['in_channels']!r}"
        )
    problems += _intensity_problems(plan["intensity"], channels)
    kernels = plan["pool_kernels"]
    kernels_ok = (
        isinstance(kernels, list)
        and len(kernels) == steps
        and all(isinstance(k, list) and len(k) == 3 and all(v in (1, 2) for v in k) for k in kernels)
    )
    if not kernels_ok:
        problems.append(
            f"pool_kernels: expected {steps} kernels (one per pooling of model.filters) of three values 1 or 2, "
            f"found {kernels!r}"
        )
    patch = plan["patch_size"]
    if not (isinstance(patch, list) and len(patch) == 3 and all(_is_int(n, 1) for n in patch)):
        problems.append(f"patch_size: expected three integers ≥ 1, found {patch!r}")
    elif kernels_ok:
        for axis, (n, d) in enumerate(zip(patch, divisors(kernels), strict=True)):
            if n % d:
                problems.append(
                    f"patch_size: {n} is not a multiple of {d} (the product of pool_kernels along axis {axis})"
                )
    if not _is_int(plan["batch_size"], 1):
        problems.append(f"batch_size: expected an integer ≥ 1, found {plan['batch_size']!r}")
    if plan["labels"] != labels:
        problems.append(f"labels: {plan['labels']!r} differ from the dataset's {labels!r}")
    axes = plan["mirror_axes"]
    if not (isinstance(axes, list) and all(a in (0, 1, 2) for a in axes)):
        problems.append(f"mirror_axes: expected a list of axes 0, 1, 2, found {axes!r}")
    return problems


def read_plan(path: str | os.PathLike, steps: int, labels: dict[str, int], channels: int) -> Plan:
    """The plan in ``path``, checked against the network's poolings and the dataset (see module docstring),
    then read as a :class:`~medseg.io.plan.Plan` (which refuses unknown keys).

    Raises:
        InputError: unreadable or invalid JSON, or a plan with problems — every problem in one line.
    """
    path = Path(path)
    plan = read_json(path, "plan file")
    problems = plan_problems(plan, steps, labels, channels)
    if problems:
        raise InputError(f"{path}: {'; '.join(problems)}")
    return Plan.from_dict(plan, where=str(path))


def dump_plan(plan: Plan) -> str:
    """The plan as JSON for people (:meth:`~medseg.io.plan.Plan.to_dict`): one key per line, lists of numbers
    (spacing, patch, kernels) on one line."""

    def encode(value: object, depth: int) -> str:
        pad = "  " * depth
        if isinstance(value, dict) and value:
            items = [f"{pad}  {json.dumps(str(k))}: {encode(v, depth + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            items = [f"{pad}  {encode(v, depth + 1)}" for v in value]
            return "[\n" + ",\n".join(items) + f"\n{pad}]"
        return json.dumps(value)

    return encode(plan.to_dict(), 0) + "\n"


def _x(values) -> str:
    return " × ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)


def _intensity_line(it: Intensity) -> str:
    if it.mode == "window":
        return f"window [{it.a_min:g}, {it.a_max:g}] HU → [0, 1]"
    return (
        f"zscore: clip to foreground 0.5/99.5 % [{it.a_min:.1f}, {it.a_max:.1f}] HU, "
        f"mean {it.mean:.1f}, std {it.std:.1f}"
    )


def format_plan(plan: Plan) -> str:
    """A readable multi-line summary of a plan (what ``medseg plan`` prints)."""
    info = plan.planner or {}
    intensity = plan.intensity if isinstance(plan.intensity, tuple) else (plan.intensity,)
    names = plan.channels()
    kernels = plan.pool_kernels or [[2, 2, 2]]
    lines = [
        f"target spacing  {_x(plan.spacing)} mm ({info.get('spacing_rule', 'recorded')})",
        f"median shape    {_x(info['median_shape'])} voxels at that spacing, {info.get('num_cases', '?')} case(s)"
        if "median_shape" in info
        else None,
        *(
            f"intensity       {'channel ' + str(c) + ' (' + n + '): ' if len(intensity) > 1 else ''}"
            f"{_intensity_line(it)}"
            for c, (n, it) in enumerate(zip(names, intensity, strict=False))
        ),
        f"patch size      {_x(plan.patch_size)} ({info.get('patch_size', 'recorded')})",
        f"pool kernels    {', '.join('×'.join(map(str, k)) for k in kernels)} → patch a multiple of "
        f"{_x(divisors(kernels))}",
        f"batch size      {plan.batch_size or '?'} ({info.get('batch_size', 'recorded')})",
        f"memory          estimated {info['estimated_memory_gb']:g} GB of {info['memory_gb']:g} GB "
        f"({info.get('memory_source', '')})"
        if "estimated_memory_gb" in info
        else None,
        f"input           {plan.in_channels} channel(s): {', '.join(names)}; orientation "
        f"{plan.orientation}; body crop {'on' if plan.crop_foreground else 'off'}",
    ]
    return "\n".join(line for line in lines if line)
