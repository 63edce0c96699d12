"""Plans from the fingerprint (nnU-Net v2's ExperimentPlanner rules) for three generated datasets — isotropic
1.5 mm, anisotropic 0.8×0.8×5 mm, small 64³ — the memory estimate against the real network, the plan file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medseg.config import ConfigError, load_config
from medseg.data.phantoms import write_msd_dataset, write_nnunet_dataset
from medseg.io import InputError, voxel_spacing
from medseg.planning.plan_file import read_plan
from medseg.planning.planner import (
    ANISO_THRESHOLD,
    NetworkSize,
    divisors,
    estimate_memory_gb,
    plan_patch_and_batch,
    pool_kernels,
)
from pipelines.cli import app
from tests.conftest import TINY_TRAIN

runner = CliRunner()
#: z sizes of the anisotropic cases over a 60 mm field of view: z spacing 7.5, 6, 5, 4.3, 3.75 mm.
ANISO_Z = (8, 10, 12, 14, 16)
NET = NetworkSize((16, 32, 64, 128, 256), 1, 7, "attention_unet")


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, dict]:
    """``medseg plan`` (8 GB budget, every case planned) of three generated datasets; also their roots."""
    base = tmp_path_factory.mktemp("planning")
    write_msd_dataset(base / "iso", 3, 0, shape=(48, 48, 48), fov_mm=(72.0, 72.0, 72.0), seed=31)
    aniso_shapes = [(96, 96, z) for z in ANISO_Z]
    write_nnunet_dataset(base / "aniso", 5, 0, shape=aniso_shapes, fov_mm=(76.8, 76.8, 60.0), seed=32)
    write_nnunet_dataset(base / "small", 2, 0, shape=(64, 64, 64), fov_mm=(128.0, 128.0, 128.0), seed=33)
    out = {}
    for name in ("iso", "aniso", "small"):
        path = base / f"{name}_plan.json"
        args = [
            "plan",
            str(base / name),
            "--gpu-memory-gb",
            "8",
            "-o",
            str(path),
            "--set",
            "data.val_fraction=0",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "patch size" in result.output and "pool kernels" in result.output
        out[name] = json.loads(path.read_text())
        out[f"{name}_root"] = base / name
    return out


def _spacings(root: Path) -> np.ndarray:
    """Voxel sizes of every training image, read from the NIfTI headers (the independent reference)."""
    files = sorted((root / "imagesTr").glob("*.nii.gz"))
    return np.array([voxel_spacing(nib.load(f).affine) for f in files if not f.name.endswith("_0001.nii.gz")])


def test_isotropic_and_small_take_the_median_spacing(plans):
    for name in ("iso", "small"):
        expected = np.median(_spacings(plans[f"{name}_root"]), axis=0)
        assert np.allclose(plans[name]["spacing"], expected, rtol=1e-6), name
        assert plans[name]["planner"]["spacing_rule"] == "median spacing"
    assert np.allclose(plans["iso"]["spacing"], 1.5, rtol=0.05)


def test_anisotropic_axis_takes_the_10th_percentile(plans):
    spacings = _spacings(plans["aniso_root"])
    median = np.median(spacings, axis=0)
    assert median[2] > ANISO_THRESHOLD * median[0]  # the rule applies to this dataset
    assert np.allclose(plans["aniso"]["spacing"][:2], median[:2], rtol=1e-6)
    assert plans["aniso"]["spacing"][2] == pytest.approx(np.percentile(spacings[:, 2], 10), rel=1e-6)
    assert plans["aniso"]["spacing"][2] < median[2] - 0.5
    assert "10th percentile" in plans["aniso"]["planner"]["spacing_rule"]


def test_pooling_per_axis_follows_spacing(plans):
    """An axis is pooled while its spacing is < 2× the finest of the poolable axes and it keeps ≥ 8 voxels."""
    for name in ("iso", "aniso", "small"):
        plan = plans[name]
        spacing, size = list(plan["spacing"]), list(plan["patch_size"])
        for kernel in plan["pool_kernels"]:
            poolable = [i for i in range(3) if size[i] >= 8]
            finest = min(spacing[i] for i in poolable) if poolable else 0
            for axis in range(3):
                expected = 2 if axis in poolable and spacing[axis] / finest < 2 else 1
                assert kernel[axis] == expected, (name, plan["pool_kernels"])
                if expected == 2:
                    spacing[axis], size[axis] = spacing[axis] * 2, math.ceil(size[axis] / 2)
    assert plans["aniso"]["pool_kernels"][:2] == [[2, 2, 1], [2, 2, 1]]  # thick slices kept at first
    assert plans["iso"]["pool_kernels"][0] == [2, 2, 2]


def test_patch_divisible_within_median_batch_at_least_two(plans):
    for name in ("iso", "aniso", "small"):
        plan = plans[name]
        patch, median = plan["patch_size"], plan["planner"]["median_shape"]
        assert all(p % d == 0 for p, d in zip(patch, divisors(plan["pool_kernels"]), strict=True)), name
        assert all(p <= m for p, m in zip(patch, median, strict=True)), name
        assert plan["batch_size"] >= 2 and plan["planner"]["estimated_memory_gb"] <= 8
        assert plan["planner"]["memory_source"] == "--gpu-memory-gb"
    assert plans["small"]["in_channels"] == 1 and plans["small"]["patch_size"] == [64, 64, 64]


def test_memory_estimate_is_monotone():
    kernels = [[2, 2, 2]] * 4
    base = estimate_memory_gb((96, 96, 64), 2, NET, kernels)
    for axis in range(3):
        bigger = [96, 96, 64]
        bigger[axis] += 16
        assert estimate_memory_gb(bigger, 2, NET, kernels) > base
    assert estimate_memory_gb((96, 96, 64), 3, NET, kernels) > base
    wider = NetworkSize((32, 64, 128, 256, 512), 1, 7, "attention_unet")
    assert estimate_memory_gb((96, 96, 64), 2, wider, kernels) > base


def test_budget_decides_patch_and_batch():
    """A large CT (0.8×0.8×2.5 mm, 420×420×180): more memory, a larger patch; always within the budget, up to
    the median shape; then the batch grows until the 5 % cap."""
    voxels = []
    for budget in (3, 6, 12, 24, 48):
        planned = plan_patch_and_batch((0.8, 0.8, 2.5), (420, 420, 180), 100, NET, budget)
        assert planned["fits"] and planned["estimated_memory_gb"] <= budget
        assert all(p <= m for p, m in zip(planned["patch_size"], (420, 420, 180), strict=True))
        voxels.append(math.prod(planned["patch_size"]) * planned["batch_size"])
        assert planned["pool_kernels"][0] == [2, 2, 1]  # 2.5 / 0.8 > 2: the slice axis waits
    assert voxels == sorted(voxels) and voxels[-1] > 4 * voxels[0]
    small = plan_patch_and_batch((1.0, 1.0, 1.0), (64, 64, 64), 200, NET, 80)
    assert small["patch_size"] == [64, 64, 64] and small["batch_size"] == round(0.05 * 200)


def test_pool_kernels_of_a_small_patch_stop_at_the_minimum_feature_map():
    kernels = pool_kernels((1.0, 1.0, 1.0), (48, 48, 24), 4)
    assert kernels == [[2, 2, 2], [2, 2, 2], [2, 2, 1], [1, 1, 1]]


@pytest.mark.parametrize(
    ("patch", "kernels"), [((48, 48, 32), None), ((64, 48, 16), [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]])]
)
def test_memory_formula_matches_the_network(patch, kernels):
    """The fitted activation term against the bytes autograd really keeps for backward (within 15 %)."""
    from medseg.engine.cost import training_activation_bytes
    from medseg.planning.planner import HEADROOM, RESERVED_GB, estimate_parameters

    net = NetworkSize((4, 8, 16, 32, 64), 1, 7, "attention_unet")
    model = load_config(None, ["model.filters=[4, 8, 16, 32, 64]"]).model
    measured = training_activation_bytes(model, patch, 7, pool_kernels=kernels)
    total = estimate_memory_gb(patch, 1, net, kernels or [[2, 2, 2]] * 4) * 1e9
    estimated = (total - RESERVED_GB * 1e9 - 16 * estimate_parameters(net)) / HEADROOM
    weights = 4 * estimate_parameters(net)  # the convolutions save their weights too
    assert estimated + weights == pytest.approx(measured, rel=0.15)


def test_config_accepts_auto_and_checks_values():
    cfg = load_config(None, ["augment.patch_size=auto", "train.batch_size=auto"])
    assert cfg.augment.patch_size == "auto" and cfg.train.batch_size == "auto"
    assert load_config(None, []).augment.patch_size == (96, 96, 64)  # explicit defaults unchanged
    for bad in ("augment.patch_size=autox", "train.batch_size=0", "train.batch_size=big"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_edited_plan_trains_and_a_bad_plan_is_refused(plans, tmp_path):
    root = plans["small_root"]
    edited = dict(plans["small"], patch_size=[32, 32, 32], batch_size=1)
    good = tmp_path / "plan.json"
    good.write_text(json.dumps(edited))
    config = Path(__file__).resolve().parents[2] / "configs" / "phantoms.yaml"
    sets = [
        *TINY_TRAIN,
        f"data.root={root}",
        f"train.output={tmp_path / 'run'}",
        "train.epochs=1",
        "data.val_fraction=0",
    ]
    result = runner.invoke(
        app, ["train", str(config), "--plan", str(good), *(a for s in sets for a in ("--set", s))]
    )
    assert result.exit_code == 0, result.output
    assert "the plan" in result.output  # the config's explicit patch and batch were overruled, and said so
    used = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert used["patch_size"] == [32, 32, 32] and used["batch_size"] == 1

    bad = dict(edited, patch_size=[30, 32, 32], batch_size=0, labels={"background": 0, "liver": 1})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputError) as info:
        read_plan(tmp_path / "bad.json", 4, edited["labels"], 1)
    message = str(info.value)
    for cause in ("30 is not a multiple of 16", "batch_size: expected an integer ≥ 1", "labels:"):
        assert cause in message, message
    run = tmp_path / "run2"
    sets[2] = f"train.output={run}"
    result = runner.invoke(
        app,
        [
            "train",
            str(config),
            "--plan",
            str(tmp_path / "bad.json"),
            *(a for s in sets for a in ("--set", s)),
        ],
    )
    assert result.exit_code == 2 and not run.exists(), result.output
    assert result.output.count("error:") == 1 and "bad.json" in result.output
