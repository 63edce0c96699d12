"""Component postprocessing and organ statistics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.inference.postprocess import ComponentRule, apply_component_rules
from medseg.report.statistics import STAT_COLUMNS, organ_statistics, write_statistics_csv


def _blobs() -> np.ndarray:
    a = np.zeros((20, 20, 10), np.uint8)
    a[2:5, 2:5, 2:5] = 1  # 27 voxels
    a[5, 5, 5] = 1  # touches the cube only at a corner: same 26-connected component
    a[10:12, 10:12, 2] = 1  # 4 voxels, separate
    a[15, 15, 8] = 1  # 1 voxel, separate
    a[0:2, 18:20, 0:3] = 2  # 12 voxels at the border, label 2
    return a


def test_largest_component_keeps_corner_connected_voxels():
    out, removed = apply_component_rules(_blobs(), {1: ComponentRule(largest_only=True)}, (1.0, 1.0, 1.0))
    assert removed == {1: 5}
    assert out[5, 5, 5] == 1 and out[10, 10, 2] == 0 and out[15, 15, 8] == 0
    assert (out == 2).sum() == 12  # other labels untouched


def test_small_components_removed_by_volume_with_spacing():
    # voxel = 2 × 2 × 2.5 mm = 0.01 mL: the 4-voxel blob is 0.04 mL, the single voxel 0.01 mL
    out, removed = apply_component_rules(_blobs(), {1: ComponentRule(min_ml=0.03)}, (2.0, 2.0, 2.5))
    assert removed == {1: 1} and out[10, 10, 2] == 1 and out[15, 15, 8] == 0
    out, removed = apply_component_rules(_blobs(), {1: ComponentRule(min_ml=0.05)}, (2.0, 2.0, 2.5))
    assert removed == {1: 5}


def test_inactive_and_absent_rules_change_nothing():
    labels = _blobs()
    out, removed = apply_component_rules(labels, {1: ComponentRule(), 3: ComponentRule(True)}, (1, 1, 1))
    assert np.array_equal(out, labels) and removed == {3: 0}
    with pytest.raises(ValueError):
        ComponentRule(min_ml=-1)


def test_organ_statistics_by_hand(tmp_path):
    labels = _blobs()
    image = np.full(labels.shape, -1000.0)
    image[labels == 1] = np.arange(33)  # 33 voxels of label 1 with HU 0..32
    image[labels == 2] = 50.0
    affine = np.array([[-0.5, 0, 0, 10.0], [0, 0.5, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    rows = organ_statistics(labels, image, affine, {"background": 0, "liver": 1, "spleen": 2, "pancreas": 3})
    liver, spleen, pancreas = rows
    assert liver["voxels"] == 33 and liver["volume_ml"] == pytest.approx(33 * 0.5 * 0.5 * 2.0 / 1000)
    assert liver["hu_mean"] == pytest.approx(16.0) and liver["hu_median"] == 16.0
    assert liver["hu_min"] == 0 and liver["hu_max"] == 32
    assert liver["hu_std"] == pytest.approx(np.std(np.arange(33)))
    assert liver["components"] == 3 and not liver["touches_border"]
    idx = np.argwhere(labels == 1).mean(axis=0)
    ras = affine[:3, :3] @ idx + affine[:3, 3]
    assert liver["centroid_ras_mm"] == pytest.approx(ras, abs=1e-3)
    assert liver["centroid_lps_mm"] == pytest.approx([-ras[0], -ras[1], ras[2]], abs=1e-3)
    assert liver["bbox_min"] == [2, 2, 2] and liver["bbox_max"] == [15, 15, 8]
    assert spleen["touches_border"] and spleen["components"] == 1 and spleen["hu_std"] == 0.0
    assert pancreas["voxels"] == 0 and pancreas["hu_mean"] is None and pancreas["components"] == 0
    path = write_statistics_csv(tmp_path / "stats.csv", rows)
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(STAT_COLUMNS) and len(lines) == 4


def test_postprocessing_is_kept_only_where_it_does_not_lower_dice():
    """Label 1: a spurious far blob in the prediction → largest component helps and is kept. Label 2: the
    reference itself has two parts → largest component would lower Dice, so nothing is kept."""
    from medseg.engine.validation import decide_postprocessing

    ref = np.zeros((24, 24, 12), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    ref[14:18, 2:6, 2:6] = 2
    ref[14:18, 16:20, 6:10] = 2
    pred = ref.copy()
    pred[20:22, 20:22, 1:3] = 1  # false positive, away from the liver
    rules, report = decide_postprocessing(
        [(pred, ref)], {"background": 0, "liver": 1, "spleen": 2}, (1, 1, 1)
    )
    assert rules["1"] == {"largest_only": True, "min_ml": 0.0}
    assert report["liver"]["dice"]["largest_only"] > report["liver"]["dice"]["none"]
    # spleen: the small-blob rule removes nothing (a tie with none: kept, nnU-Net's "does not lower"),
    # the largest-component rule would delete half of it
    assert report["spleen"]["chosen"] == "min_ml" and not rules["2"]["largest_only"]
    assert report["spleen"]["dice"]["min_ml"] == report["spleen"]["dice"]["none"] == 1.0
    assert report["spleen"]["dice"]["largest_only"] < report["spleen"]["dice"]["none"]


def test_training_records_postprocessing_in_best_checkpoint(tiny_run):
    from medseg.io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_run / "best.pt")
    assert isinstance(ckpt["postprocess"], dict) and set(ckpt["postprocess_report"]) == {
        name for name, index in ckpt["labels"].items() if index > 0
    }
