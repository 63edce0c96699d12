"""Refit the planner's activation-memory coefficients: ``python -m benchmarks.calibrate_plan_memory``.

Counts the bytes autograd saves for backward (:func:`medseg.engine.cost.training_activation_bytes`) for
``unet`` and ``attention_unet``, filters 4…64, 8…128 and 16…256, K = 2 and 7, and patches with isotropic and
anisotropic pooling, then fits ``saved/4 − parameters = a·F + c·K·V + d·V`` by least squares (see
:mod:`medseg.planning.planner`) and prints the coefficients and the largest relative error next to the ones
``ACTIVATION_COEFFICIENTS`` holds (run time: ``docs/speed.md``, section
``benchmarks.calibrate_plan_memory``).
"""

from __future__ import annotations

import math

import numpy as np

PATCHES = [
    ((32, 32, 32), None),
    ((48, 48, 32), None),
    ((64, 64, 32), None),
    ((40, 40, 40), None),
    ((64, 48, 16), [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]),
    ((96, 64, 32), [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]),
]


def main() -> None:
    import torch

    from medseg.config import load_config
    from medseg.engine.cost import training_activation_bytes
    from medseg.nets.registry import build_network
    from medseg.planning.planner import ACTIVATION_COEFFICIENTS, feature_voxels

    torch.set_num_threads(2)
    for name in ("attention_unet", "unet"):
        rows, values = [], []
        for width in (4, 8, 16):
            filters = [width * 2**i for i in range(5)]
            model = load_config(None, [f"model.name={name}", f"model.filters={filters}"]).model
            for classes in (2, 7):
                params = sum(p.numel() for p in build_network(model, 1, classes).parameters())
                for patch, kernels in PATCHES:
                    saved = training_activation_bytes(model, patch, classes, pool_kernels=kernels)
                    voxels = math.prod(patch)
                    feats = feature_voxels(patch, filters, kernels or [[2, 2, 2]] * 4)
                    rows.append([feats, classes * voxels, voxels])
                    values.append(saved / 4 - params)
        a, y = np.asarray(rows, dtype=float), np.asarray(values)
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        error = float(np.max(np.abs(a @ coef - y) / y))
        print(
            f"{name}: a, c, d = {np.round(coef, 2).tolist()} (largest error {error:.1%}); "
            f"in use {ACTIVATION_COEFFICIENTS[name]}"
        )


if __name__ == "__main__":
    main()
