"""medseg.metrics against DeepMind's ``surface-distance`` package (test-only dependency).

HD95 (and other percentiles), NSD and the two directed mean surface distances must equal the reference
within 1e-6 on random shapes, thin structures and anisotropic spacing.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medseg.metrics import compute_surface_distances, evaluate_pair, nearest, surface
from medseg.metrics.surface import directed_mean, directed_percentile, surface_overlap, surfel_area_table

sd = pytest.importorskip("surface_distance")
from surface_distance import lookup_tables  # noqa: E402

# surface-distance 0.1 predates numpy 2 (np.Inf / np.NaN); shim them here, never in site-packages.
for _name, _value in (("Inf", np.inf), ("NaN", np.nan)):
    if not hasattr(np, _name):
        setattr(np, _name, _value)

TOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy.ndimage.filters in the package


def _reference(
    pred: np.ndarray, ref: np.ndarray, spacing, tolerance: float, percentile: float, d=None
) -> dict:
    if d is None:
        d = sd.compute_surface_distances(ref.astype(bool), pred.astype(bool), list(spacing))
    gt_to_pred, pred_to_gt = sd.compute_average_surface_distance(d)
    return {
        "hd": sd.compute_robust_hausdorff(d, percentile),
        "nsd": sd.compute_surface_dice_at_tolerance(d, tolerance),
        "asd_ref_to_pred": gt_to_pred,
        "asd_pred_to_ref": pred_to_gt,
        "n_ref": len(d["distances_gt_to_pred"]),
        "n_pred": len(d["distances_pred_to_gt"]),
    }


def _ours(tolerance: float, percentile: float, d) -> dict:
    in_p, tot_p = surface_overlap(d.dist_pred_to_ref, d.area_pred, tolerance)
    in_r, tot_r = surface_overlap(d.dist_ref_to_pred, d.area_ref, tolerance)
    return {
        "hd": max(
            directed_percentile(d.dist_pred_to_ref, d.area_pred, percentile),
            directed_percentile(d.dist_ref_to_pred, d.area_ref, percentile),
        ),
        "nsd": (in_p + in_r) / (tot_p + tot_r),
        "asd_ref_to_pred": directed_mean(d.dist_ref_to_pred, d.area_ref),
        "asd_pred_to_ref": directed_mean(d.dist_pred_to_ref, d.area_pred),
        "n_ref": d.area_ref.size,
        "n_pred": d.area_pred.size,
    }


def _assert_same(
    pred, ref, spacing, tolerances=(0.5, 1.0, 2.0, 3.7), percentiles=(95, 100, 50, 99), method="auto"
) -> None:
    theirs = sd.compute_surface_distances(ref.astype(bool), pred.astype(bool), list(spacing))
    mine = compute_surface_distances(pred.astype(bool), ref.astype(bool), spacing, method=method)
    for tolerance in tolerances:
        for percentile in percentiles:
            want = _reference(pred, ref, spacing, tolerance, percentile, theirs)
            got = _ours(tolerance, percentile, mine)
            assert got["n_ref"] == want["n_ref"] and got["n_pred"] == want["n_pred"]
            for key in ("hd", "nsd", "asd_ref_to_pred", "asd_pred_to_ref"):
                assert abs(got[key] - want[key]) <= TOL, (key, tolerance, percentile, got[key], want[key])


def _blob(rng: np.random.Generator, shape, fill: float, sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.random(shape), sigma)
    return noise > np.quantile(noise, 1.0 - fill)


_RANDOM_SPACINGS = [
    tuple(float(s) for s in np.random.default_rng(seed).uniform(0.2, 6.0, 3)) for seed in range(8)
]


@pytest.mark.parametrize(
    "spacing", [(1.0, 1.0, 1.0), (1.3, 0.7, 2.1), (0.5, 3.1, 0.9), (2.5, 0.8, 0.8), *_RANDOM_SPACINGS]
)
def test_area_table_matches_reference(spacing):
    want = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    got = surfel_area_table(spacing)
    assert got.shape == (256,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # _distances_padded passes the spacing as a float64 array.
    np.testing.assert_allclose(surfel_area_table(np.asarray(spacing)), want, rtol=0, atol=1e-12)


def test_neighbourhood_code_bit_order_matches_reference():
    """Voxel (a, b, c) of the 2x2x2 cell has the weight of ENCODE_NEIGHBOURHOOD_3D_KERNEL[a, b, c]."""
    weights = np.zeros((2, 2, 2), dtype=np.int64)
    for corner in surface._CORNERS:
        weights[corner] = 1 << surface._bit(corner)
    np.testing.assert_array_equal(weights, lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL)


@pytest.mark.parametrize("spacing", [(0.9, 1.7, 0.6), (2.5, 0.8, 0.8), (0.5, 1.0, 2.0)])
def test_surfel_areas_in_use_match_reference(spacing):
    """The areas compute_surface_distances gives each border corner (the table as used, indexed by our
    codes) equal the package's surfel by surfel, on noise that hits every neighbourhood code."""
    rng = np.random.default_rng(100)
    pred = rng.random((16, 18, 20)) < 0.4
    ref = rng.random((16, 18, 20)) < 0.3
    theirs = sd.compute_surface_distances(ref, pred, list(spacing))
    mine = compute_surface_distances(pred, ref, spacing)
    for dist, area, key in (
        (mine.dist_pred_to_ref, mine.area_pred, "pred_to_gt"),
        (mine.dist_ref_to_pred, mine.area_ref, "gt_to_pred"),
    ):
        order = np.lexsort((area, dist))  # the package returns surfels sorted by (distance, area)
        np.testing.assert_array_equal(dist[order], theirs[f"distances_{key}"])
        surfel_key = "surfel_areas_pred" if key == "pred_to_gt" else "surfel_areas_gt"
        np.testing.assert_allclose(area[order], theirs[surfel_key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing", [(1.3, 0.7, 2.1), *_RANDOM_SPACINGS[:4]])
def test_monai_table_same_codes_float32_only(spacing):
    """MONAI's table uses our bit order (no code permutation) and equals ours only to float32 rounding,
    which is why medseg keeps its own float64 table (see the medseg.metrics.surface docstring)."""
    mu = pytest.importorskip("monai.metrics.utils")
    table, kernel = mu.create_table_neighbour_code_to_surface_area(spacing)
    np.testing.assert_array_equal(kernel.numpy()[0, 0], lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL)
    np.testing.assert_allclose(table.numpy(), surfel_area_table(spacing), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", range(8))
def test_random_shapes_anisotropic(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(12, 40, 3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, 3))
    pred = _blob(rng, shape, rng.uniform(0.1, 0.5), rng.uniform(1.0, 3.0))
    ref = _blob(rng, shape, rng.uniform(0.1, 0.5), rng.uniform(1.0, 3.0))
    _assert_same(pred, ref, spacing)


@pytest.mark.parametrize("seed", range(3))
def test_random_noise_all_neighbourhood_codes(seed):
    """Salt-and-pepper masks exercise every 2x2x2 code, including the ambiguous ones."""
    rng = np.random.default_rng(100 + seed)
    pred = rng.random((16, 18, 20)) < 0.4
    ref = rng.random((16, 18, 20)) < 0.3
    _assert_same(pred, ref, (0.9, 1.7, 0.6), percentiles=(95, 100))


def test_thin_structures():
    shape = (30, 30, 30)
    plate = np.zeros(shape, bool)
    plate[5:25, 10, 5:25] = True  # one voxel thick
    line = np.zeros(shape, bool)
    line[3:27, 12, 15] = True  # one voxel wide
    tube = np.zeros(shape, bool)
    tube[15, 4:26, 4:26] = True
    tube[16, 4:26, 4:26] = True
    for spacing in [(1.0, 1.0, 1.0), (3.0, 0.7, 0.7)]:
        _assert_same(plate, line, spacing)
        _assert_same(plate, tube, spacing)
        _assert_same(np.roll(plate, 1, axis=1), plate, spacing)


def test_structures_far_apart_use_the_kdtree_fallback(monkeypatch):
    """Corners beyond the row-search radius are answered by the k-d tree, with the same values."""
    rng = np.random.default_rng(7)
    pred = np.zeros((40, 40, 40), bool)
    ref = np.zeros((40, 40, 40), bool)
    pred[2:10, 2:12, 3:9] = True
    ref[28:38, 25:37, 30:39] = rng.random((10, 12, 9)) < 0.7
    _assert_same(pred, ref, (1.2, 0.9, 0.8))
    monkeypatch.setattr(nearest, "_SEARCH_ROWS", 3)  # almost everything goes to the k-d tree
    _assert_same(pred, ref, (1.2, 0.9, 0.8))
    _assert_same(_blob(rng, (20, 22, 24), 0.3, 1.5), _blob(rng, (20, 22, 24), 0.3, 1.5), (0.7, 1.1, 2.0))


def test_row_axis_not_last():
    """The smallest spacing on axis 0 makes the search run along axis 0 (transposed internally)."""
    rng = np.random.default_rng(11)
    pred = _blob(rng, (25, 20, 15), 0.3, 2.0)
    ref = _blob(rng, (25, 20, 15), 0.3, 2.0)
    _assert_same(pred, ref, (0.5, 1.0, 2.0))
    _assert_same(pred, ref, (1.0, 0.5, 2.0))


def test_evaluate_pair_matches_reference_on_label_map():
    rng = np.random.default_rng(3)
    shape, spacing = (32, 28, 24), (1.5, 0.8, 0.8)
    pred = np.zeros(shape, np.uint8)
    ref = np.zeros(shape, np.uint8)
    for label in (1, 2, 3):
        pred[_blob(rng, shape, 0.15, 2.0)] = label
        ref[_blob(rng, shape, 0.15, 2.0)] = label
    result = evaluate_pair(pred, ref, spacing, tolerance=1.5)
    for label in (1, 2, 3):
        want = _reference(pred == label, ref == label, spacing, 1.5, 95)
        got = result[label]
        assert abs(got["hd95"] - want["hd"]) <= TOL
        assert abs(got["nsd"] - want["nsd"]) <= TOL
        assert abs(got["asd_ref_to_pred"] - want["asd_ref_to_pred"]) <= TOL
        assert abs(got["asd_pred_to_ref"] - want["asd_pred_to_ref"]) <= TOL
        dice = sd.compute_dice_coefficient(ref == label, pred == label)
        assert abs(got["dice"] - dice) <= 1e-12
