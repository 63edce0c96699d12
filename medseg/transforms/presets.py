"""MONAI ``Compose`` presets for training, validation and inference, built from a preprocessing plan
(a :class:`medseg.io.plan.Plan`).

Deterministic part (shared by all three, cached by ``CacheDataset``)::

    LoadVolumed (medseg.io.load_volume + MONAI NibabelReader, RAS affine) → EnsureChannelFirstd → Orientationd(plan orientation)
    (a case's ``image`` may be a list of channel files: MONAI stacks them as channels, refusing differing
    affines or shapes)
    → Spacingd(plan spacing; bilinear image / nearest label) → CropForegroundd(body: HU > -500)
    → CT intensity normalisation

CT intensity normalisation is either a HU window (clip to ``[a_min, a_max]``, scale to [0, 1]) or nnU-Net's
CT scheme (clip to the 0.5/99.5 foreground percentiles of the training set, z-score with the foreground mean
and std) — both from MONAI (``ScaleIntensityRanged``, ``NormalizeIntensityd``).

Random part (training only): ``SpatialPadd`` to the patch size → ``RandCropByPosNegLabeld`` (foreground
oversampling) or ``RandCropByLabelClassesd`` (per-class ratios, ``augment.class_ratios``) → ``RandAffined`` (rotation + scaling) → ``RandFlipd`` (off by default: flips swap
lateralised organs) → ``RandScaleIntensityd`` / ``RandShiftIntensityd`` / ``RandGaussianNoised``.
"""

from __future__ import annotations

import math

import numpy as np
from monai import transforms as mt

from medseg.io.plan import Intensity, Plan
from medseg.transforms.reader import LoadVolumed

#: Body voxels for the foreground crop: denser than lung and air (HU > -500).
BODY_HU_THRESHOLD = -500.0


def body_mask(x) -> np.ndarray:
    """Foreground for cropping: voxels denser than lung/air (HU > -500)."""
    return x > BODY_HU_THRESHOLD


def intensity_transforms(plan: Plan, key: str = "image") -> list:
    """CT intensity normalisation from the plan (see module docstring).

    ``plan.intensity`` is one :class:`~medseg.io.plan.Intensity` (every channel alike: all single-channel plans) or a list of one
    mapping per channel (a multi-channel nnU-Net dataset, each channel with its own foreground statistics,
    as nnU-Net's per-channel ``CTNormalization``): the channels are split (``SplitDimd``), normalised each
    with its own parameters and concatenated again (``ConcatItemsd``).
    """
    it = plan.intensity
    if isinstance(it, Intensity):
        return _intensity_steps(it, key)
    names = [f"{key}_channel{c}" for c in range(len(it))]
    steps: list = [mt.SplitDimd(key, output_postfixes=[n.removeprefix(f"{key}_") for n in names], dim=0)]
    for name, channel in zip(names, it, strict=True):
        steps += _intensity_steps(channel, name)
    return [*steps, mt.ConcatItemsd(names, key, dim=0), mt.DeleteItemsd(names)]


def _intensity_steps(it: Intensity, key: str) -> list:
    if it.mode == "window":
        return [mt.ScaleIntensityRanged(key, a_min=it.a_min, a_max=it.a_max, b_min=0.0, b_max=1.0, clip=True)]
    # zscore (the mode was checked when the plan was read)
    return [
        mt.ScaleIntensityRanged(
            key, a_min=it.a_min, a_max=it.a_max, b_min=it.a_min, b_max=it.a_max, clip=True
        ),
        mt.NormalizeIntensityd(key, subtrahend=it.mean, divisor=max(it.std, 1e-6)),
    ]


def deterministic_transforms(plan: Plan, with_label: bool, load: bool = True) -> list:
    """Load → orient → resample → crop to body → normalise; the cacheable prefix of every preset.

    With ``load=False`` the chain starts at orientation and expects channel-first MetaTensors (the
    inference path, which has already read and checked the volume).
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    steps = [LoadVolumed(keys), mt.EnsureChannelFirstd(keys)] if load else []
    steps += [
        mt.Orientationd(keys, axcodes=plan.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(keys, pixdim=list(plan.spacing), mode=modes),
    ]
    if plan.crop_foreground:
        steps.append(
            mt.CropForegroundd(keys, source_key="image", select_fn=body_mask, margin=2, allow_smaller=True)
        )
    steps += intensity_transforms(plan)
    steps.append(
        mt.EnsureTyped(keys, dtype=(np.float32, np.uint8) if with_label else np.float32, track_meta=True)
    )
    return steps


def train_transforms(plan: Plan, augment) -> mt.Compose:
    """Training preset: deterministic prefix + patch sampling and augmentation (``augment``: a
    :class:`medseg.config.AugmentConfig`)."""
    keys = ["image", "label"]
    patch = list(plan.patch_size)
    rot = math.radians(augment.rotate_deg)
    scale = augment.scale
    p_int = augment.intensity_prob
    steps = deterministic_transforms(plan, with_label=True) + [
        mt.SpatialPadd(keys, spatial_size=patch),
        _patch_sampler(keys, patch, augment),
    ]
    if augment.affine_prob > 0:
        steps.append(
            mt.RandAffined(
                keys,
                prob=augment.affine_prob,
                rotate_range=(rot, rot, rot),
                scale_range=(scale, scale, scale),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            )
        )
    if augment.flip_prob > 0:
        steps += [mt.RandFlipd(keys, prob=augment.flip_prob, spatial_axis=axis) for axis in range(3)]
    if p_int > 0:
        steps += [
            mt.RandScaleIntensityd("image", factors=0.1, prob=p_int),
            mt.RandShiftIntensityd("image", offsets=0.1, prob=p_int),
            mt.RandGaussianNoised("image", std=0.02, prob=p_int),
        ]
    steps.append(mt.EnsureTyped(keys, dtype=(np.float32, np.int64), track_meta=False))
    return mt.Compose(steps)


def _patch_sampler(keys: list[str], patch: list[int], augment):
    """Patch centres by class (``augment.class_ratios``: ``RandCropByLabelClassesd``, which favours small organs
    when their ratio is raised) or foreground vs background (``augment.pos_neg``: ``RandCropByPosNegLabeld``).
    A class absent from a case is skipped for that case (MONAI warns once)."""
    if augment.class_ratios is not None:
        return mt.RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=patch,
            ratios=list(augment.class_ratios),
            num_classes=len(augment.class_ratios),
            num_samples=augment.samples_per_volume,
            allow_smaller=False,
            warn=False,
        )
    pos, neg = augment.pos_neg
    return mt.RandCropByPosNegLabeld(
        keys,
        label_key="label",
        spatial_size=patch,
        pos=pos,
        neg=neg,
        num_samples=augment.samples_per_volume,
        image_key="image",
        allow_smaller=False,
    )


def val_transforms(plan: Plan) -> mt.Compose:
    """Validation preset: deterministic prefix with the label (whole volumes)."""
    return mt.Compose(deterministic_transforms(plan, with_label=True))


def infer_transforms(plan: Plan, load: bool = True) -> mt.Compose:
    """Inference preset: deterministic prefix, image only; the MetaTensor keeps the model-space affine."""
    return mt.Compose(deterministic_transforms(plan, with_label=False, load=load))
