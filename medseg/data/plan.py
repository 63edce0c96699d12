"""Dataset fingerprint → preprocessing plan (target spacing, orientation, intensity parameters).

The plan is everything needed to preprocess a new scan the way the training data was preprocessed; it is
stored in every checkpoint so that ``medseg segment`` needs nothing but the checkpoint. As in nnU-Net
(Isensee et al., Nat. Methods 2021), the target spacing is the median spacing of the training set and the
CT intensity statistics (percentiles, mean, std) come from foreground voxels of the training set.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from medseg.io.nifti import load_volume, voxel_spacing


def fingerprint(cases: list[dict], max_voxels_per_case: int = 20_000, seed: int = 0) -> dict:
    """Spacings (in RAS axis order) and foreground HU statistics of the training cases."""
    rng = np.random.default_rng(seed)
    spacings, samples, counts = [], [], np.zeros(0, dtype=np.int64)
    for case in cases:
        img = load_volume(case["image"])
        ornt = nib.orientations.io_orientation(img.affine)
        sp = voxel_spacing(img.affine)
        spacings.append([float(sp[int(np.argwhere(ornt[:, 0] == ax)[0, 0])]) for ax in range(3)])
        if "label" in case:
            data = np.asanyarray(img.dataobj)
            label = np.asanyarray(load_volume(case["label"]).dataobj).astype(np.int64)
            bins = np.bincount(label.ravel())
            counts = np.pad(counts, (0, max(0, len(bins) - len(counts)))) + np.pad(
                bins, (0, max(0, len(counts) - len(bins)))
            )
            fg = data[label > 0]
            if fg.size:
                samples.append(rng.choice(fg, size=min(fg.size, max_voxels_per_case), replace=False))
    values = np.concatenate(samples).astype(np.float64) if samples else np.zeros(1)
    return {
        "spacings": spacings,
        "median_spacing": [float(v) for v in np.median(np.asarray(spacings), axis=0)],
        "class_fractions": [float(c) for c in counts / max(counts.sum(), 1)],
        "foreground": {
            "p00_5": float(np.percentile(values, 0.5)),
            "p99_5": float(np.percentile(values, 99.5)),
            "mean": float(values.mean()),
            "std": float(values.std()),
        },
    }


def make_plan(cfg, cases: list[dict], label_names: dict[str, int], fp: dict | None = None) -> dict:
    """Resolve the config's ``preprocess`` section (a :class:`medseg.config.Config`) against the fingerprint.

    ``fp``: a fingerprint already computed (e.g. the ``"fingerprint"`` a plan records) instead of reading
    ``cases`` again.
    """
    pre = cfg.preprocess
    fp = fingerprint(cases) if fp is None else fp
    spacing = fp["median_spacing"] if pre.spacing == "auto" else [float(s) for s in pre.spacing]
    mode = pre.intensity.mode
    if mode == "window":
        lo, hi = (float(v) for v in pre.intensity.window)
        intensity = {"mode": "window", "a_min": lo, "a_max": hi}
    else:  # zscore (the mode was checked when the config was loaded)
        fg = fp["foreground"]
        intensity = {
            "mode": "zscore",
            "a_min": fg["p00_5"],
            "a_max": fg["p99_5"],
            "mean": fg["mean"],
            "std": fg["std"],
        }
    return {
        "orientation": pre.orientation,
        "spacing": spacing,
        "intensity": intensity,
        "crop_foreground": bool(pre.crop_foreground),
        "patch_size": [int(p) for p in cfg.augment.patch_size],
        "labels": dict(label_names),
        "in_channels": 1,
        # model-space axes (plan orientation) the network saw mirrored in training: the only axes test-time
        # mirroring may flip without a label-swap table (RandFlipd flips all three when flip_prob > 0)
        "mirror_axes": [0, 1, 2] if cfg.augment.flip_prob > 0 else [],
        "fingerprint": {
            "median_spacing": fp["median_spacing"],
            "foreground": fp["foreground"],
            "class_fractions": fp["class_fractions"],
        },
    }
