"""α focus near organs and α entropy: exact values for a box-shaped and a uniform α, margins clipped at the
border, a coarse α resized like the gates' own upsampling, an absent organ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg.evaluation.attention_focus import alpha_focus, normalized_entropy, resize_alpha
from medseg.inference.attention import upsample_alpha

SHAPE = (20, 16, 12)
N = 20 * 16 * 12


def _label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[5:9, 4:7, 3:5] = 1  # organ 1: box 4×3×2
    label[15, 12, 9] = 2  # organ 2: one voxel
    return label


def test_alpha_on_the_dilated_box_only():
    """α = 1 on organ 1's box grown by 2 voxels (8×7×6 = 336 voxels), 0 elsewhere: all the mass is in the box,
    and α / Σα is uniform on 336 voxels, so H = log 336 exactly."""
    alpha = np.zeros(SHAPE)
    alpha[3:11, 2:9, 1:7] = 1.0
    focus = alpha_focus(alpha, _label(), {"liver": 1}, margin_vox=2)
    liver = focus["organs"]["liver"]
    assert liver["mass_fraction"] == 1.0
    assert liver["volume_fraction"] == 336 / N
    assert liver["concentration"] == pytest.approx(N / 336, rel=1e-12)
    assert focus["entropy"] == pytest.approx(math.log(336) / math.log(N), rel=1e-12)
    assert focus["mass"] == 336.0
    # Without the margin only the organ's own box (4·3·2 = 24 voxels) of the 336 carries mass.
    bare = alpha_focus(alpha, _label(), {"liver": 1}, margin_vox=0)["organs"]["liver"]
    assert bare["mass_fraction"] == pytest.approx(24 / 336) and bare["volume_fraction"] == 24 / N


def test_uniform_alpha_matches_the_volume_fraction():
    focus = alpha_focus(np.full(SHAPE, 0.3), _label(), [1, 2], margin_vox=1)
    for organ, box_voxels in ((1, 6 * 5 * 4), (2, 3 * 3 * 3)):
        stats = focus["organs"][organ]
        assert stats["volume_fraction"] == box_voxels / N
        assert stats["mass_fraction"] == pytest.approx(box_voxels / N, rel=1e-12)
        assert stats["concentration"] == pytest.approx(1.0, rel=1e-12)
    assert focus["entropy"] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(
    ("organ", "margin", "box_voxels"),
    [
        (2, 4, (20 - 11) * (16 - 8) * (12 - 5)),  # organ 2 at (15, 12, 9): 17 → 16 and 14 → 12 at the top
        (1, 5, (14 - 0) * (12 - 0) * (10 - 0)),  # organ 1 at [5:9, 4:7, 3:5]: -1 → 0 and -2 → 0 at the bottom
        (2, (0, 1, 2), 1 * 3 * 5),  # per axis; 9 + 2 = 11 < 12 is not clipped
        (2, (0, 5, 0), 1 * (16 - 7) * 1),
    ],
)
def test_margins_per_axis_and_clipped_at_the_border(organ, margin, box_voxels):
    stats = alpha_focus(np.ones(SHAPE), _label(), [organ], margin_vox=margin)["organs"][organ]
    assert stats["volume_fraction"] == box_voxels / N


def test_entropy_reference_values():
    one_voxel = np.zeros((4, 4, 4))
    one_voxel[1, 2, 3] = 0.7
    assert normalized_entropy(one_voxel) == 0.0
    two_levels = np.zeros((2, 2, 2))
    two_levels[0] = 1.0
    two_levels[1, 0, 0] = 1.0  # p: 1/5 on five voxels → H = log 5
    assert normalized_entropy(two_levels) == pytest.approx(math.log(5) / math.log(8), rel=1e-12)
    assert math.isnan(normalized_entropy(np.zeros((3, 3, 3))))


def test_absent_organ_and_zero_alpha_give_nan_without_error():
    focus = alpha_focus(np.full(SHAPE, 0.5), _label(), {"liver": 1, "pancreas": 7})
    assert all(math.isnan(v) for v in focus["organs"]["pancreas"].values())
    assert focus["organs"]["liver"]["concentration"] == pytest.approx(1.0)
    silent = alpha_focus(np.zeros(SHAPE), _label(), {"liver": 1})
    liver = silent["organs"]["liver"]
    assert math.isnan(liver["mass_fraction"]) and math.isnan(liver["concentration"])
    assert liver["volume_fraction"] > 0 and math.isnan(silent["entropy"]) and silent["mass"] == 0.0


def test_coarse_alpha_is_resized_to_the_label_grid():
    """A uniform α on a grid 2× coarser is still uniform on the label grid; a coarse box of ones whose
    interpolated edges stay inside the dilated box keeps all its mass there."""
    coarse = np.full((10, 8, 6), 0.25)
    focus = alpha_focus(coarse, _label(), {"liver": 1}, margin_vox=1)
    assert focus["organs"]["liver"]["concentration"] == pytest.approx(1.0, rel=1e-12)
    assert focus["entropy"] == pytest.approx(1.0, rel=1e-12)

    box = np.zeros((10, 8, 6))
    box[3, 2:4, 2] = 1.0  # fine voxels 6..7, 4..7, 4..5, blurred by one fine voxel each way by the upsampling
    label = np.zeros(SHAPE, np.uint8)
    label[6:8, 4:8, 4:6] = 1
    focus = alpha_focus(box, label, {"organ": 1}, margin_vox=1)
    assert focus["organs"]["organ"]["mass_fraction"] == pytest.approx(1.0, rel=1e-12)
    assert alpha_focus(box, label, {"organ": 1}, margin_vox=0)["organs"]["organ"]["mass_fraction"] < 1.0


@pytest.mark.parametrize(("coarse", "level"), [((10, 8, 6), 2), ((5, 4, 3), 3)])
def test_resize_matches_the_gates_upsampling(coarse, level):
    """For whole-number factors the resize is the trilinear ``align_corners=False`` upsampling with which the
    networks bring α to the fine grid (an independent implementation: PyTorch)."""
    alpha = np.random.default_rng(0).random(coarse)
    ours = resize_alpha(alpha, SHAPE)
    theirs = upsample_alpha(torch.from_numpy(alpha)[None, None], level, SHAPE)[0, 0].double().numpy()
    assert ours.shape == SHAPE
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_resize_any_shape_and_errors():
    assert resize_alpha(np.random.default_rng(1).random((7, 5, 3)), (15, 11, 4)).shape == (15, 11, 4)
    same = np.full((2, 2, 2), 0.5)
    np.testing.assert_array_equal(resize_alpha(same, (2, 2, 2)), same)
    with pytest.raises(ValueError, match="3 axes"):
        resize_alpha(np.ones((4, 4, 4)), (4, 4))
    with pytest.raises(ValueError, match="integer label map"):
        alpha_focus(np.ones(SHAPE), _label().astype(np.float32), [1])
    with pytest.raises(ValueError, match="integers ≥ 1"):
        alpha_focus(np.ones(SHAPE), _label(), {"background": 0})
    with pytest.raises(ValueError, match="margin_vox"):
        alpha_focus(np.ones(SHAPE), _label(), [1], margin_vox=(1, 2))
    with pytest.raises(ValueError, match="non-negative"):
        alpha_focus(-np.ones(SHAPE), _label(), [1])
