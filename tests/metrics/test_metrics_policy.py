"""Hand-computed metric values, the empty-mask policy, summaries, label maps and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.metrics import METRIC_KEYS, dice_per_label, evaluate_pair, image_diagonal_mm, summarize


def _cube(shape=(32, 32, 32), lo=(10, 10, 10), size=10) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return m


def _sphere(shape=(40, 40, 40), radius=12.0) -> np.ndarray:
    grid = np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2
    return (grid**2).sum(0) <= radius**2


# ---------------------------------------------------------------------------------------------- hand cases


def test_two_cubes_offset_by_one_voxel():
    """10^3 cubes shifted by one voxel along axis 0: TP = 900, every surface point within 1 voxel."""
    a, b = _cube(), _cube(lo=(11, 10, 10))
    m = evaluate_pair(a, b, (1.0, 1.0, 1.0), percentile=95)[1]
    assert m["dice"] == pytest.approx(2 * 900 / 2000)
    assert m["iou"] == pytest.approx(900 / 1100)
    assert m["precision"] == pytest.approx(0.9) and m["recall"] == pytest.approx(0.9)
    assert m["vol_pred_ml"] == pytest.approx(1.0) and m["vol_ref_ml"] == pytest.approx(1.0)
    assert m["vol_diff_ml"] == pytest.approx(0.0)
    # Side walls coincide (distance 0); the two caps of each cube are 1 voxel from the other surface.
    assert m["hd95"] == pytest.approx(1.0)
    assert evaluate_pair(a, b, (1.0, 1.0, 1.0), percentile=100)[1]["hd95"] == pytest.approx(1.0)
    assert m["nsd"] == pytest.approx(1.0)  # tolerance 2 mm > 1 mm
    assert 0.0 < m["assd"] < 1.0
    assert m["asd_pred_to_ref"] == pytest.approx(m["asd_ref_to_pred"])
    assert evaluate_pair(a, b, (1.0, 1.0, 1.0), tolerance=0.5)[1]["nsd"] < 1.0


def test_two_cubes_anisotropic_spacing():
    """Same cubes with 2 mm along the shift axis: distances double, volumes follow the voxel size."""
    a, b = _cube(), _cube(lo=(11, 10, 10))
    m = evaluate_pair(a, b, (2.0, 0.5, 0.5))[1]
    assert m["hd95"] == pytest.approx(2.0)
    assert m["vol_pred_ml"] == pytest.approx(1000 * 2.0 * 0.5 * 0.5 / 1000)
    assert evaluate_pair(a, b, (2.0, 0.5, 0.5), tolerance=1.9)[1]["nsd"] < 1.0
    assert evaluate_pair(a, b, (2.0, 0.5, 0.5), tolerance=2.0)[1]["nsd"] == pytest.approx(1.0)
    # Shift along an axis with 0.5 mm spacing instead: 0.5 mm.
    c = _cube(lo=(10, 10, 11))
    assert evaluate_pair(a, c, (2.0, 0.5, 0.5))[1]["hd95"] == pytest.approx(0.5)


def test_sphere_against_itself():
    s = _sphere()
    m = evaluate_pair(s, s, (0.8, 0.8, 1.5))[1]
    assert m["dice"] == 1.0 and m["iou"] == 1.0
    assert m["hd95"] == 0.0 and m["assd"] == 0.0 and m["nsd"] == 1.0


def test_one_voxel_structures():
    """Single voxels 3 voxels apart along axis 2 (0.5 mm): corner distances 2 and 3 voxels."""
    a = np.zeros((8, 8, 12), bool)
    b = np.zeros((8, 8, 12), bool)
    a[4, 4, 3] = True
    b[4, 4, 6] = True
    m = evaluate_pair(a, b, (1.0, 1.0, 0.5), tolerance=1.0)[1]
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    # 8 corners of equal area: 4 at 2 x 0.5 mm, 4 at 3 x 0.5 mm, in both directions.
    assert m["hd95"] == pytest.approx(1.5)
    assert m["assd"] == pytest.approx(1.25)
    assert m["nsd"] == pytest.approx(0.5)
    same = evaluate_pair(a, a, (1.0, 1.0, 0.5))[1]
    assert same["dice"] == 1.0 and same["hd95"] == 0.0 and same["vol_ref_ml"] == pytest.approx(0.0005)


def test_thin_plate():
    """A one-voxel plate against the same plate shifted by one voxel across its thickness."""
    a = np.zeros((20, 20, 20), bool)
    a[4:16, 9, 4:16] = True
    b = np.roll(a, 1, axis=1)
    m = evaluate_pair(a, b, (1.0, 1.0, 1.0))[1]
    assert m["dice"] == 0.0  # no common voxel
    assert m["hd95"] == pytest.approx(1.0)  # faces are 0 or 1 voxel apart
    assert m["nsd"] == pytest.approx(1.0)
    assert evaluate_pair(a, a, (1.0, 1.0, 1.0))[1]["hd95"] == 0.0


# ---------------------------------------------------------------------------------------------- empty masks


def test_both_empty():
    z = np.zeros((10, 10, 10), np.uint8)
    m = evaluate_pair(z, z, (1.0, 1.0, 1.0), labels=[1])[1]
    assert (m["dice"], m["iou"], m["nsd"], m["hd95"], m["assd"]) == (1.0, 1.0, 1.0, 0.0, 0.0)
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["vol_pred_ml"] == 0.0
    assert evaluate_pair(z, z, (1.0, 1.0, 1.0)) == {}  # no label present and none asked for


@pytest.mark.parametrize("missing", ["pred", "ref"])
def test_exactly_one_empty(missing):
    full = _cube((16, 16, 16), (4, 4, 4), 6)
    empty = np.zeros_like(full)
    pred, ref = (empty, full) if missing == "pred" else (full, empty)
    m = evaluate_pair(pred, ref, (1.0, 1.0, 1.0))[1]
    assert (m["dice"], m["iou"], m["nsd"], m["precision"], m["recall"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert math.isinf(m["hd95"]) and math.isinf(m["assd"])
    assert math.isinf(m["asd_pred_to_ref"]) and math.isinf(m["asd_ref_to_pred"])


def test_dice_per_label_policy_and_agreement():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (12, 12, 12))
    ref = rng.integers(0, 4, (12, 12, 12))
    ref[ref == 3] = 0  # label 3 only in the prediction
    fast = dice_per_label(pred, ref, [1, 2, 3, 7])
    full = evaluate_pair(pred, ref, (1.0, 1.0, 1.0), labels=[1, 2, 3, 7])
    for label in (1, 2, 3, 7):
        assert fast[label] == pytest.approx(full[label]["dice"])
    assert fast[3] == 0.0 and fast[7] == 1.0
    with pytest.raises(ValueError):
        dice_per_label(pred - 1, ref, [1])


# ---------------------------------------------------------------------------------------------- summaries


def test_summary_counts_missed_and_worst_case():
    spacing, shape = (1.0, 1.0, 1.0), (16, 16, 16)
    diag = image_diagonal_mm(shape, spacing)
    full = _cube(shape, (4, 4, 4), 6)
    shifted = _cube(shape, (5, 4, 4), 6)
    empty = np.zeros(shape, bool)
    rows = []
    for case, (p, r) in enumerate([(full, shifted), (empty, full), (full, empty), (empty, empty)]):
        for label, values in evaluate_pair(p, r, spacing, labels=[1]).items():
            rows.append({"case": case, "label": label, **values, "diagonal_mm": diag})
    s = summarize(rows)[1]
    assert s["n_cases"] == 4 and s["n_missed"] == 1 and s["n_spurious"] == 1
    hd = s["hd95"]
    assert hd["n_finite"] == 2  # the good case and the both-empty case (0)
    assert hd["mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert hd["worst_mean"] == pytest.approx((1.0 + diag + diag + 0.0) / 4)
    assert hd["worst_median"] == pytest.approx((1.0 + diag) / 2)
    assert s["dice"]["mean"] == pytest.approx((360 / 432 + 0 + 0 + 1) / 4)
    assert s["dice"]["n_finite"] == 4
    # Without diagonals the worst case stays inf instead of silently dropping the missed structure.
    no_diag = summarize([{k: v for k, v in r.items() if k != "diagonal_mm"} for r in rows])[1]
    assert math.isinf(no_diag["hd95"]["worst_mean"])


# ---------------------------------------------------------------------------------------------- label maps


def test_multilabel_map_equals_per_label_masks():
    rng = np.random.default_rng(1)
    pred = np.zeros((30, 30, 30), np.uint16)
    ref = np.zeros((30, 30, 30), np.uint16)
    for label, lo in ((1, 2), (2, 12), (5, 20)):
        ref[lo : lo + 7, 3:20, 5:25] = label
        pred[lo + rng.integers(0, 2) : lo + 7, 4:21, 5:24] = label
    spacing = (1.2, 0.7, 0.9)
    result = evaluate_pair(pred, ref, spacing, tolerance={2: 0.5, 0: 1.0})
    assert sorted(result) == [1, 2, 5]
    for label in (1, 2, 5):
        alone = evaluate_pair(pred == label, ref == label, spacing, tolerance=0.5 if label == 2 else 1.0)[1]
        assert result[label] == pytest.approx(alone)
        assert set(result[label]) == set(METRIC_KEYS)


def test_many_labels_each_on_its_own_box():
    shape = (40, 60, 60)
    ref = np.zeros(shape, np.uint8)
    k = 0
    for z in range(0, 40, 8):
        for y in range(0, 60, 12):
            for x in range(0, 60, 12):
                k += 1
                ref[z : z + 5, y : y + 8, x : x + 8] = k
    pred = np.roll(ref, 1, axis=2)
    result = evaluate_pair(pred, ref, (1.0, 1.0, 1.0))
    assert len(result) == k == 125
    for m in result.values():
        assert m["hd95"] == pytest.approx(1.0) and m["dice"] == pytest.approx(2 * 7 / 16)


def test_label_inputs_and_validation():
    ref = _cube((12, 12, 12), (3, 3, 3), 5).astype(np.float32) * 2  # integral floats are fine
    pred = ref.copy()
    assert evaluate_pair(pred, ref, (1.0, 1.0, 1.0))[2]["dice"] == 1.0
    with pytest.raises(ValueError, match="non-integer"):
        evaluate_pair(pred + 0.5, ref, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="negative"):
        evaluate_pair(pred.astype(np.int16) - 1, ref, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        evaluate_pair(pred[:-1], ref, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        evaluate_pair(pred, ref, (1.0, 0.0, 1.0))
    # A boolean mask against a label map is label 1.
    mask = ref > 0
    assert evaluate_pair(mask, (ref > 0).astype(np.uint8), (1.0, 1.0, 1.0))[1]["dice"] == 1.0
