"""Benchmark: the restore stage — class probabilities on the model grid → labels on a 512×512×300 input grid —
by cells (:func:`medseg.inference.restore.restore_labels_by_cells`, the default) against resampling every voxel
(the separable sampler slab by slab, ``cells=False``, the previous default), alternating, in one process.

    python -m benchmarks.restore_speed [--runs 3] [--threads 2]

**The input**: the body-filling CT of :mod:`benchmarks.openvino_speed` (the real CT at 0.8×0.8×1.5 mm,
mirror-tiled to 512×512×300), preprocessed to the model grid of that benchmark's plan (1.5 mm, after the body
crop). **The probabilities** stand in for a network's on real anatomy: seven classes from the CT's own
intensities (air and lung < -500 HU, fat -500..-30, soft tissue -30..100 split in two by a smooth field,
enhanced blood 100..250, bone > 250), one-hot, Gaussian-smoothed (σ = 1 voxel) and normalised — so the class
borders have the density and curvature of the anatomy (a random-weight network's labels would be noise, with
far more borders than any real segmentation). The two restores' label maps are compared voxel for voxel, and the
fraction of input voxels that needed interpolation is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_vs_monai import REAL_CT
from benchmarks.openvino_speed import body_filling_ct


def anatomy_probabilities(model_grid_hu: np.ndarray) -> torch.Tensor:
    """Seven smoothed one-hot classes from the HU values on the model grid (module docstring)."""
    from scipy import ndimage

    hu = model_grid_hu.astype(np.float32)
    split = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=hu.shape).astype(np.float32), 12) > 0
    soft = (hu >= -30) & (hu < 100)
    classes = np.select(
        [hu < -500, hu < -30, soft & split, soft, hu < 250],
        [0, 1, 2, 3, 4],
        default=5,
    ).astype(np.uint8)
    classes[(classes == 5) & (hu > 700)] = 6
    probs = np.stack([ndimage.gaussian_filter((classes == k).astype(np.float32), 1.0) for k in range(7)])
    probs /= probs.sum(0, keepdims=True)
    return torch.from_numpy(probs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dataclasses import replace

    import nibabel as nib

    from benchmarks.speed import random_checkpoint
    from medseg.inference import Predictor
    from medseg.inference.preprocess import preprocess
    from medseg.inference.restore import axis_zoom, restore_labels
    from medseg.io.plan import Intensity
    from medseg.transforms import infer_transforms

    with tempfile.TemporaryDirectory() as tmp:
        ct = nib.load(body_filling_ct(REAL_CT, Path(tmp) / "ct.nii.gz"))
        ct = nib.Nifti1Image(np.asarray(ct.dataobj), ct.affine)
        plan = Predictor(random_checkpoint(Path(tmp) / "model.pt", 7), device="cpu", precision="fp32").plan
    # the benchmark plan's grid and body crop, its intensity window widened to keep HU: ``hu`` below
    raw = replace(plan, intensity=Intensity(mode="window", a_min=-1024.0, a_max=3071.0))
    image = preprocess(ct, infer_transforms(raw, load=False))
    hu = image[0].numpy() * (3071.0 + 1024.0) - 1024.0
    probs = anatomy_probabilities(hu)
    affine, shape = np.asarray(image.affine), ct.shape
    print(f"input grid {shape}, model grid {tuple(probs.shape[1:])}, {probs.shape[0]} classes")
    times: dict[str, list[float]] = {"cells": [], "every voxel": []}
    for _ in range(args.runs):
        for name, cells in (("cells", True), ("every voxel", False)):
            start = time.perf_counter()
            labels = restore_labels(probs, affine, ct.affine, shape, cells=cells)
            times[name].append(time.perf_counter() - start)
            if name == "cells":
                by_cells = labels
        assert np.array_equal(by_cells, labels), int((by_cells != labels).sum())
    import medseg.inference.restore as restore

    zoom = axis_zoom(affine, ct.affine)
    corners = [restore._axis_corners(zoom[0][a], zoom[1][a], shape[a], probs.shape[1 + a]) for a in range(3)]
    mixed = float((restore._cell_labels(restore._argmax(probs), corners) == restore.MIXED).mean())
    print(f"label maps equal voxel for voxel; voxels interpolated by cells: {100 * mixed:.1f} %")
    for name, values in times.items():
        print(
            f"{name:12s} median {statistics.median(values):6.2f} s  ({', '.join(f'{v:.2f}' for v in values)})"
        )
    ratio = statistics.median(times["every voxel"]) / statistics.median(times["cells"])
    print(f"cells: {ratio:.2f}× faster")


if __name__ == "__main__":
    main()
