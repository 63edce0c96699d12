"""Dataset fingerprint → preprocessing and training plan (target spacing, intensity, patch, pooling, batch).

The plan is everything needed to preprocess a new scan the way the training data was preprocessed, and the
patch, pooling and batch size training used; it is stored in every checkpoint so that ``medseg segment``
needs nothing but the checkpoint, and ``medseg plan`` writes it as a small JSON file a user may edit and
hand to ``medseg train --plan`` (checked by :mod:`medseg.planning.plan_file`). As in nnU-Net (Isensee et al.,
Nat. Methods 2021), the fingerprint holds every training case's spacing and shape after the body crop and
the CT intensity statistics (percentiles, mean, std) of foreground voxels, per input channel; the rules that
turn it into a plan are nnU-Net v2's ``ExperimentPlanner`` (:mod:`medseg.planning.planner`).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from medseg.data.datasets import input_channels, label_names, read_dataset_json, split_cases, training_cases
from medseg.io.nifti import load_volume, voxel_spacing
from medseg.io.plan import Plan
from medseg.planning.planner import (
    CPU_DEFAULT_MEMORY_GB,
    NetworkSize,
    plan_patch_and_batch,
    resampled_shape,
    target_spacing,
)
from medseg.transforms.presets import BODY_HU_THRESHOLD

#: Margin (voxels) of the body crop, as ``CropForegroundd(margin=2)`` in :mod:`medseg.transforms.presets`.
CROP_MARGIN = 2
_WORLD_AXIS = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def _model_axes(affine: np.ndarray, orientation: str) -> list[int]:
    """For each axis of the model grid (``orientation``, e.g. ``RAS``) the voxel axis of the file along it."""
    ornt = nib.orientations.io_orientation(affine)
    return [int(np.argwhere(ornt[:, 0] == _WORLD_AXIS[code])[0, 0]) for code in orientation]


def _body_shape(volumes: list[np.ndarray]) -> tuple[int, ...]:
    """Shape of the body crop (any channel above :data:`BODY_HU_THRESHOLD`, plus the margin), in file axes."""
    body = np.zeros(volumes[0].shape, dtype=bool)
    for data in volumes:
        body |= data > BODY_HU_THRESHOLD
    if not body.any():
        return tuple(int(n) for n in body.shape)
    shape = []
    for axis in range(3):
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        shape.append(min(body.shape[axis], int(hit[-1] - hit[0] + 1) + 2 * CROP_MARGIN))
    return tuple(shape)


def _stats(values: np.ndarray) -> dict:
    return {
        "p00_5": float(np.percentile(values, 0.5)),
        "p99_5": float(np.percentile(values, 99.5)),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }


def fingerprint(
    cases: list[dict],
    max_voxels_per_case: int = 20_000,
    seed: int = 0,
    orientation: str = "RAS",
    crop_foreground: bool = True,
) -> dict:
    """Spacings and shapes (after the body crop, in the axis order of ``orientation``), class fractions and
    foreground HU statistics (channel 0; ``foreground_per_channel`` for every channel) of the cases."""
    rng = np.random.default_rng(seed)
    spacings, shapes, counts = [], [], np.zeros(0, dtype=np.int64)
    samples: list[list[np.ndarray]] = []
    for case in cases:
        files = case["image"] if isinstance(case["image"], list) else [case["image"]]
        images = [load_volume(f) for f in files]
        axes = _model_axes(images[0].affine, orientation)
        sp = voxel_spacing(images[0].affine)
        spacings.append([float(sp[a]) for a in axes])
        volumes = [np.asanyarray(img.dataobj) for img in images]
        shape = _body_shape(volumes) if crop_foreground else volumes[0].shape
        shapes.append([int(shape[a]) for a in axes])
        samples += [[] for _ in range(len(volumes) - len(samples))]
        if "label" in case:
            label = np.asanyarray(load_volume(case["label"]).dataobj).astype(np.int64)
            bins = np.bincount(label.ravel())
            counts = np.pad(counts, (0, max(0, len(bins) - len(counts)))) + np.pad(
                bins, (0, max(0, len(counts) - len(bins)))
            )
            foreground = label > 0
            count = int(foreground.sum())
            if count:  # the same voxels of every channel (one draw per case, as before channels existed)
                pick = rng.choice(count, size=min(count, max_voxels_per_case), replace=False)
                for channel, data in enumerate(volumes):
                    samples[channel].append(data[foreground][pick])
    per_channel = [
        _stats(np.concatenate(s).astype(np.float64) if s else np.zeros(1)) for s in samples or [[]]
    ]
    return {
        "spacings": spacings,
        "shapes": shapes,
        "median_spacing": [float(v) for v in np.median(np.asarray(spacings), axis=0)],
        "class_fractions": [float(c) for c in counts / max(counts.sum(), 1)],
        "foreground": per_channel[0],
        "foreground_per_channel": per_channel,
    }


def _intensity(pre, foreground: dict) -> dict:
    if pre.intensity.mode == "window":
        lo, hi = (float(v) for v in pre.intensity.window)
        return {"mode": "window", "a_min": lo, "a_max": hi}
    # zscore (the mode was checked when the config was loaded)
    return {
        "mode": "zscore",
        "a_min": foreground["p00_5"],
        "a_max": foreground["p99_5"],
        "mean": foreground["mean"],
        "std": foreground["std"],
    }


def make_plan(
    cfg,
    cases: list[dict],
    label_names: dict[str, int],
    channels: list[str] | None = None,
    memory_gb: float | None = None,
    memory_source: str | None = None,
) -> Plan:
    """Resolve the config (a :class:`medseg.config.Config`) against the fingerprint of ``cases``: the
    :class:`~medseg.io.plan.Plan` (its JSON form, :meth:`~medseg.io.plan.Plan.to_dict`, is what plan files
    and checkpoints hold).

    ``preprocess.spacing: auto`` takes the planner's target spacing, ``augment.patch_size: auto`` and
    ``train.batch_size: auto`` its patch (with per-axis pool kernels) and batch size for ``memory_gb``
    (default :data:`~medseg.planning.planner.CPU_DEFAULT_MEMORY_GB`); explicit values are kept as they are.
    ``channels``: the input channel names (default one ``CT`` channel).
    """
    pre = cfg.preprocess
    channels = list(channels or ["CT"])
    fp = fingerprint(cases, orientation=pre.orientation, crop_foreground=bool(pre.crop_foreground))
    if pre.spacing == "auto":
        spacing, rule = target_spacing(fp["spacings"], fp["shapes"])
    else:
        spacing, rule = [float(s) for s in pre.spacing], "preprocess.spacing of the config"
    shapes = [resampled_shape(sh, sp, spacing) for sh, sp in zip(fp["shapes"], fp["spacings"], strict=True)]
    median_shape = [round(float(v)) for v in np.median(np.asarray(shapes, dtype=np.float64), axis=0)]
    stats = fp["foreground_per_channel"]
    intensity = _intensity(pre, stats[0]) if len(channels) == 1 else [_intensity(pre, s) for s in stats]
    if memory_gb is None:
        memory_gb, memory_source = CPU_DEFAULT_MEMORY_GB, f"default ({CPU_DEFAULT_MEMORY_GB:g} GB)"
    auto_patch, auto_batch = cfg.augment.patch_size == "auto", cfg.train.batch_size == "auto"
    net = NetworkSize(tuple(cfg.model.filters), len(channels), len(label_names), cfg.model.name)
    planned = plan_patch_and_batch(
        spacing,
        median_shape,
        len(cases),
        net,
        memory_gb,
        patch=None if auto_patch else cfg.augment.patch_size,
        batch=None if auto_batch else cfg.train.batch_size,
    )
    plan = {
        "orientation": pre.orientation,
        "spacing": spacing,
        "intensity": intensity,
        "crop_foreground": bool(pre.crop_foreground),
        "patch_size": planned["patch_size"],
        "pool_kernels": planned["pool_kernels"],
        "batch_size": planned["batch_size"],
        "labels": dict(label_names),
        "in_channels": len(channels),
        "channel_names": channels,
        # model-space axes (plan orientation) the network saw mirrored in training: the only axes test-time
        # mirroring may flip without a label-swap table (RandFlipd flips all three when flip_prob > 0)
        "mirror_axes": [0, 1, 2] if cfg.augment.flip_prob > 0 else [],
        "planner": {
            "spacing_rule": rule,
            "median_shape": median_shape,
            "num_cases": len(cases),
            "patch_size": "planned" if auto_patch else "config",
            "batch_size": "planned" if auto_batch else "config",
            "memory_gb": round(float(memory_gb), 2),
            "memory_source": memory_source or "given",
            "estimated_memory_gb": planned["estimated_memory_gb"],
        },
        "fingerprint": {
            "median_spacing": fp["median_spacing"],
            "foreground": fp["foreground"],
            "class_fractions": fp["class_fractions"],
        },
    }
    return Plan.from_dict(plan, where="planned plan")


def plan_dataset(
    cfg, root, memory_gb: float | None = None, memory_source: str | None = None
) -> tuple[Plan, list[dict], list[dict]]:
    """The plan ``medseg train`` makes for the dataset in ``root`` (MSD or nnU-Net layout): the fingerprint
    of the training split of the config's split; returns ``(plan, training cases, validation cases)``."""
    meta = read_dataset_json(root)
    cases = training_cases(root)
    train, val = split_cases(cases, cfg.data.val_fraction, cfg.train.seed, list(cfg.data.val_cases or []))
    plan = make_plan(cfg, train, label_names(meta), input_channels(meta, root), memory_gb, memory_source)
    return plan, train, val
