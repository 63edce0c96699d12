"""Plan target spacing, patch size, pooling and batch size from a dataset fingerprint, as nnU-Net v2 does.

The rules of nnU-Net v2's ``ExperimentPlanner`` (``default_experiment_planner.py``) and its
``get_pool_and_conv_props`` (``network_topology.py``); Isensee et al., "nnU-Net: a self-configuring method
for deep learning-based biomedical image segmentation", Nat. Methods 2021:

* **Target spacing** (:func:`target_spacing`): the median spacing; when the coarsest axis is more than
  :data:`ANISO_THRESHOLD` (3) times coarser than the others *and* has 3× fewer voxels, that axis takes the
  10th percentile of its spacings instead (never finer than the other axes).
* **Pooling** (:func:`pool_kernels`): at each pooling step an axis is halved only when it still has at least
  ``2 × 4`` voxels (:data:`FEATURE_MAP_MIN_EDGE`) and its current spacing is less than twice the finest
  current spacing of the poolable axes; a lone poolable axis needs ``3 × 4`` voxels. medseg's network has a
  fixed depth (``len(model.filters)``): a step where no axis may be pooled pools none (``[1, 1, 1]``),
  where nnU-Net would build a shallower network.
* **Patch** (:func:`plan_patch_and_batch`): start isotropic in millimetres with the volume of a 256³ patch,
  clip to the median shape in model space, then shrink the axis that is largest relative to the median shape
  until the estimated training memory of batch 2 fits the budget. Each axis is a multiple of
  ``2^(poolings on that axis)``, rounded *down* (nnU-Net pads up, which can exceed the median shape).
* **Batch**: at least 2 (:data:`MIN_BATCH_SIZE`); increased while it fits the budget and one batch covers at
  most 5 % (:data:`MAX_DATASET_COVERED`) of the dataset's voxels (nnU-Net's overfitting cap).

**Memory estimate** (:func:`estimate_memory_gb`). nnU-Net counts the convolutions' feature maps and compares
with a reference measured on a GPU. medseg estimates training memory of its own U-Net in bytes::

    RESERVED_GB + 16 B × parameters + HEADROOM × 4 B × batch × (a·F + c·K·V + d·V)

``F = Σ_levels voxels × filters`` (the feature maps of one sample, :func:`feature_voxels`), ``V`` = patch
voxels, ``K`` = classes; 16 B per parameter (:func:`estimate_parameters`) are weights, gradients and the two
Adam moments. ``a, c, d`` (:data:`ACTIVATION_COEFFICIENTS`, per network) model the bytes of the tensors
autograd saves for the backward pass of a training-mode forward and the Dice+CE loss; :data:`HEADROOM`
scales them to the peak of a whole forward + backward + AdamW step; :data:`RESERVED_GB` is an allowance, not
a measurement, for the CUDA context, cuDNN workspaces and allocator slack. ``python -m
benchmarks.calibrate_plan_memory`` repeats the measurement the coefficients were fitted to, and
``tests/planning/test_planner.py`` checks the formula against it; how they were fitted and how well:
``docs/design.md``, section ``medseg.planning.planner``. Activations are counted in float32; under bf16 or
fp16 autocast (``train.precision``) many are stored in 2 bytes, so the estimate then errs on the safe side.
Bottleneck blocks (PAM, PSA, …) are not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: nnU-Net's ``ANISO_THRESHOLD``: spacing and voxel-count ratio that makes a dataset anisotropic.
ANISO_THRESHOLD = 3.0
#: nnU-Net's ``UNet_featuremap_min_edge_length``: smallest feature-map side a pooling may leave.
FEATURE_MAP_MIN_EDGE = 4
#: nnU-Net's ``max_dataset_covered``: one batch sees at most this fraction of the dataset's voxels.
MAX_DATASET_COVERED = 0.05
#: nnU-Net's ``UNet_min_batch_size``.
MIN_BATCH_SIZE = 2
#: Voxels of the initial patch (nnU-Net: 256³), before it is clipped and shrunk.
INITIAL_PATCH_VOXELS = 256**3
#: Memory budget without a CUDA device (GB): nnU-Net's default ``gpu_memory_target_in_gb``.
CPU_DEFAULT_MEMORY_GB = 8.0
#: Fitted bytes model of the saved activations, per network (see the module docstring): (a, c, d).
ACTIVATION_COEFFICIENTS = {"attention_unet": (11.97, 3.45, 2.71), "unet": (11.39, 3.45, 2.93)}
#: Peak memory of forward + backward + optimizer step over the saved activations (measured on the CPU;
#: ``docs/design.md``, section ``medseg.planning.planner``).
HEADROOM = 1.2
#: Allowance for the CUDA context, cuDNN workspaces and allocator slack (GB).
RESERVED_GB = 1.0


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[list, str]:
    """Target spacing (mm, per axis) and the rule that chose it (nnU-Net's
    ``determine_fullres_target_spacing``; ``shapes`` are the voxel shapes after the body crop)."""
    spacings_arr = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(spacings_arr, 50, axis=0)
    median_size = np.percentile(np.asarray(shapes, dtype=np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(target[i] for i in others)
    aniso_voxels = median_size[worst] * ANISO_THRESHOLD < min(median_size[i] for i in others)
    if not (aniso_spacing and aniso_voxels):
        return [float(v) for v in target], "median spacing"
    coarse = float(np.percentile(spacings_arr[:, worst], 10))
    finest_allowed = max(target[i] for i in others)
    if coarse < finest_allowed:
        coarse = finest_allowed + 1e-5
    target[worst] = coarse
    return [float(v) for v in target], (
        f"median spacing; axis {worst} anisotropic (> {ANISO_THRESHOLD:g}× coarser, {ANISO_THRESHOLD:g}× fewer "
        f"voxels): its 10th percentile {coarse:.4g} mm"
    )


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """Voxel shape after resampling from ``spacing`` to ``target`` (nnU-Net's ``compute_new_shape``)."""
    return [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)]


def pool_kernels(spacing: Sequence[float], patch: Sequence[int], steps: int) -> list[list[int]]:
    """Per pooling step the max-pool kernel per axis (1 or 2), nnU-Net's ``get_pool_and_conv_props`` rule
    for a network of ``steps`` poolings (module docstring)."""
    current_spacing = [float(s) for s in spacing]
    current_size = [int(n) for n in patch]
    kernels = []
    for _ in range(steps):
        valid = [i for i in range(3) if current_size[i] >= 2 * FEATURE_MAP_MIN_EDGE]
        if valid:
            finest = min(current_spacing[i] for i in valid)
            valid = [i for i in valid if current_spacing[i] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * FEATURE_MAP_MIN_EDGE:
            valid = []
        for i in valid:
            current_spacing[i] *= 2
            current_size[i] = math.ceil(current_size[i] / 2)
        kernels.append([2 if i in valid else 1 for i in range(3)])
    return kernels


def divisors(kernels: Sequence[Sequence[int]]) -> list[int]:
    """What each patch axis must be a multiple of: the product of the kernels along it (``2^poolings``)."""
    return [math.prod(int(k[axis]) for k in kernels) for axis in range(3)]


def fit_patch(
    spacing: Sequence[float], patch: Sequence[int], steps: int
) -> tuple[list[int], list[list[int]]]:
    """``patch`` rounded down to the divisors of its own pooling topology, and that topology (repeated until
    both agree: a smaller patch may pool less)."""
    patch = [max(1, int(n)) for n in patch]
    while True:
        kernels = pool_kernels(spacing, patch, steps)
        fitted = [max(d, n // d * d) for n, d in zip(patch, divisors(kernels), strict=True)]
        if fitted == patch:
            return patch, kernels
        patch = fitted


@dataclass(frozen=True)
class NetworkSize:
    """What the memory estimate needs to know about the network (from the config and the dataset)."""

    filters: tuple[int, ...]
    in_channels: int
    num_classes: int
    name: str = "attention_unet"


def feature_voxels(patch: Sequence[int], filters: Sequence[int], kernels: Sequence[Sequence[int]]) -> int:
    """``F``: Σ over levels of voxels × filters for one sample (max pooling floors each side)."""
    size, total = [int(n) for n in patch], 0
    for level, channels in enumerate(filters):
        if level:
            size = [n // k for n, k in zip(size, kernels[level - 1], strict=True)]
        total += math.prod(size) * int(channels)
    return total


def estimate_parameters(net: NetworkSize) -> int:
    """Approximate parameter count of medseg's U-Net: 3×3×3 convolutions of the encoder and decoder levels
    (within a few per cent of the real count; the 1×1×1 gates and heads are small)."""
    f = [int(c) for c in net.filters]
    encoder = sum(27 * ((net.in_channels if i == 0 else f[i - 1]) * c + c * c) for i, c in enumerate(f))
    decoder = sum(27 * ((f[i + 1] + f[i]) * f[i] + f[i] * f[i]) for i in range(len(f) - 1))
    return encoder + decoder


def estimate_memory_gb(
    patch: Sequence[int], batch: int, net: NetworkSize, kernels: Sequence[Sequence[int]]
) -> float:
    """Estimated training memory (GB) of one step with ``batch`` patches (module docstring)."""
    a, c, d = ACTIVATION_COEFFICIENTS.get(net.name, ACTIVATION_COEFFICIENTS["attention_unet"])
    voxels = math.prod(int(n) for n in patch)
    per_sample = 4.0 * (a * feature_voxels(patch, net.filters, kernels) + (c * net.num_classes + d) * voxels)
    total = RESERVED_GB * 1e9 + 16.0 * estimate_parameters(net) + HEADROOM * batch * per_sample
    return total / 1e9


def plan_patch_and_batch(
    spacing: Sequence[float],
    median_shape: Sequence[int],
    num_cases: int,
    net: NetworkSize,
    memory_gb: float,
    patch: Sequence[int] | None = None,
    batch: int | None = None,
) -> dict:
    """Patch size, pool kernels and batch size for the budget ``memory_gb`` (module docstring).

    ``patch`` / ``batch`` given (explicit config values) are kept as they are; a given patch is pooled 2×2×2
    at every step (the networks' default).

    Returns:
        ``{"patch_size", "pool_kernels", "batch_size", "estimated_memory_gb", "fits"}`` (``fits``: the
        estimate is within the budget).
    """
    steps = len(net.filters) - 1
    median = [max(1, round(float(n))) for n in median_shape]
    if patch is not None:
        patch, kernels = [int(n) for n in patch], [[2, 2, 2] for _ in range(steps)]
    else:
        inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
        start = inverse * (INITIAL_PATCH_VOXELS / np.prod(inverse)) ** (1 / 3)
        patch, kernels = fit_patch(
            spacing, [min(round(s), m) for s, m in zip(start, median, strict=True)], steps
        )
        while estimate_memory_gb(patch, MIN_BATCH_SIZE, net, kernels) > memory_gb:
            shrinkable = [i for i in range(3) if patch[i] > divisors(kernels)[i]]
            if not shrinkable:
                break
            axis = max(shrinkable, key=lambda i: patch[i] / median[i])
            smaller = list(patch)
            smaller[axis] -= divisors(kernels)[axis]
            # nnU-Net subtracts the divisor of the smaller patch's topology, so that e.g. 224 is not skipped
            smaller[axis] = patch[axis] - divisors(pool_kernels(spacing, smaller, steps))[axis]
            patch, kernels = fit_patch(spacing, smaller, steps)
    if batch is None:
        dataset_voxels = math.prod(median) * max(num_cases, 1)
        batch = MIN_BATCH_SIZE
        while (
            estimate_memory_gb(patch, batch + 1, net, kernels) <= memory_gb
            and (batch + 1) * math.prod(patch) <= MAX_DATASET_COVERED * dataset_voxels
        ):
            batch += 1
    estimate = estimate_memory_gb(patch, batch, net, kernels)
    return {
        "patch_size": [int(n) for n in patch],
        "pool_kernels": [[int(k) for k in kernel] for kernel in kernels],
        "batch_size": int(batch),
        "estimated_memory_gb": round(estimate, 2),
        "fits": estimate <= memory_gb,
    }
