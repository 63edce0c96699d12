"""medseg.metrics.nearest: every method (row search, k-d tree fallback, distance transform) gives the exact
nearest-corner distance — against brute force and against DeepMind ``surface-distance`` — and the cost
estimate sends close surfaces to the search and far ones to the distance transform."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from scipy import ndimage

from medseg.metrics import compute_surface_distances, nearest, surface
from tests.metrics.test_metrics_reference import _assert_same, _blob

METHODS = ("search", "edt", "auto")
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning"
)  # scipy.ndimage.morphology in the package


def _brute_force(query: np.ndarray, target: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """min over every target corner of sqrt(sum((Δ s)²)), in blocks of queries."""
    corners = np.array(np.nonzero(target))
    out = np.empty(query.shape[1])
    for lo in range(0, query.shape[1], 256):
        d = (query[:, lo : lo + 256, None] - corners[:, None, :]) * spacing[:, None, None]
        out[lo : lo + 256] = np.sqrt((d * d).sum(axis=0)).min(axis=1)
    return out


def _pair(seed: int):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(10, 30, 3))
    spacing = rng.uniform(0.3, 3.0, 3)

    def blob():
        noise = ndimage.gaussian_filter(rng.random(shape), rng.uniform(1.0, 3.0))
        return noise > np.quantile(noise, 1.0 - rng.uniform(0.05, 0.4))

    a, b = blob(), blob()
    if seed % 2:  # surfaces further apart
        b = np.roll(b, int(rng.integers(3, 9)), axis=int(rng.integers(0, 3)))
    return np.pad(a, 1), np.pad(b, 1), spacing


@pytest.mark.parametrize("seed", range(6))
def test_every_method_equals_brute_force(seed, monkeypatch):
    pa, pb, spacing = _pair(seed)
    query, target = np.array(np.nonzero(surface._border(pa))), surface._border(pb)
    want = _brute_force(query, target, spacing)
    for method in METHODS:
        for loop in ("numpy", "compiled"):
            monkeypatch.setattr(nearest, "_LOOP", loop)
            got, _ = surface._nearest(query, target, int(target.sum()), spacing, method)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"{method}, {loop} loop")
    monkeypatch.setattr(nearest, "_SPLIT_MIN_QUERIES", 1)  # halves searched in two threads, concatenated
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        got, _ = surface._nearest(query, target, int(target.sum()), spacing, "search", pool)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg="search in two halves")
    monkeypatch.setattr(nearest, "_SEARCH_ROWS", 4)  # nearly every query goes to the k-d tree
    got, _ = surface._nearest(query, target, int(target.sum()), spacing, "search")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg="k-d tree")


@pytest.mark.parametrize("method", ["search", "edt"])
@pytest.mark.parametrize("seed", range(3))
def test_every_method_equals_surface_distance(method, seed):
    pytest.importorskip("surface_distance")
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(12, 36, 3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, 3))
    pred = _blob(rng, shape, rng.uniform(0.1, 0.4), rng.uniform(1.0, 3.0))
    ref = _blob(rng, shape, rng.uniform(0.1, 0.4), rng.uniform(1.0, 3.0))
    _assert_same(pred, ref, spacing, method=method)
    far = np.zeros((40, 30, 44), bool)  # two structures ~25 voxels apart, row axis not last
    far[2:9, 3:10, 2:12] = True
    other = np.zeros_like(far)
    other[28:37, 18:27, 30:41] = rng.random((9, 9, 11)) < 0.7
    _assert_same(far, other, (0.6, 1.4, 0.9), percentiles=(95, 100), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_empty_mask_gives_infinite_distances(method):
    full = np.zeros((8, 9, 10), bool)
    full[2:6, 3:7, 2:8] = True
    d = compute_surface_distances(full, np.zeros_like(full), (1.0, 2.0, 0.5), method=method)
    assert d.dist_pred_to_ref.size and np.isinf(d.dist_pred_to_ref).all() and d.dist_ref_to_pred.size == 0
    assert d.methods == ("", "")  # nothing to search


def test_cost_estimate_sends_far_surfaces_to_the_distance_transform(monkeypatch):
    """Concentric spheres 1 voxel apart → row search; 30 voxels apart → EDT (the search would visit its
    whole 1500-row disc and hand every query to the k-d tree)."""
    monkeypatch.setattr(nearest, "_SAMPLE", 64)
    grid = np.indices((72, 72, 72)) - 35.5
    radius = np.sqrt((grid**2).sum(axis=0))
    inner = surface._border(np.pad(radius < 6, 1))
    spacing = np.ones(3)
    for outer_radius, expected in ((7, "search"), (36, "edt")):
        outer = surface._border(np.pad(radius < outer_radius, 1))
        query = np.array(np.nonzero(outer))
        search = nearest._RowSearch(inner, spacing)
        assert nearest.choose_method(search, query, inner.size) == expected
    far = compute_surface_distances(radius < 36, radius < 6, spacing)
    assert far.methods == ("edt", "search")  # the small sphere's ~600 corners: searching them is cheaper
    np.testing.assert_array_equal(
        far.dist_pred_to_ref,
        compute_surface_distances(radius < 36, radius < 6, spacing, method="search").dist_pred_to_ref,
    )
    with pytest.raises(ValueError, match="search, edt"):
        nearest.nearest_offsets(query, inner, spacing, method="tree")


def test_two_threads_give_the_one_thread_distances(monkeypatch):
    """Masks above the threading threshold: sides and half-searches in two threads, the same values."""
    pa, pb, spacing = _pair(1)
    one = compute_surface_distances(pa, pb, spacing)
    monkeypatch.setattr(surface, "_THREAD_MIN_CORNERS", 0)
    monkeypatch.setattr(nearest, "_SPLIT_MIN_QUERIES", 1)
    two = compute_surface_distances(pa, pb, spacing)
    for field in ("dist_pred_to_ref", "area_pred", "dist_ref_to_pred", "area_ref"):
        np.testing.assert_array_equal(getattr(one, field), getattr(two, field), err_msg=field)


@pytest.mark.parametrize("seed", range(4))
def test_compiled_loop_returns_the_numpy_loops_rows(seed):
    """The compiled row loop and the numpy one pick the same row and offset for every query, not only the
    same distance (the k-d tree fallback and the distance arithmetic then see identical inputs)."""
    pa, pb, spacing = _pair(seed)
    query, target = np.array(np.nonzero(surface._border(pa))), surface._border(pb)
    search = nearest._RowSearch(target, spacing)
    d2_numpy, delta_numpy = search.offsets(query, compiled=False)
    d2_compiled, delta_compiled = search.offsets(query, compiled=True)
    np.testing.assert_array_equal(d2_compiled, d2_numpy)
    np.testing.assert_array_equal(delta_compiled, delta_numpy)


_RENT_OR_BUY = """
import sys
import numpy as np
from medseg.metrics import evaluate_pair, nearest

grid = np.sqrt(((np.indices((64, 64, 64)) - 31.5) ** 2).sum(axis=0))
inner, small = grid < 20, grid < 3
loaded = lambda: "medseg.metrics.rowscan" in sys.modules
for _ in range(3):  # ~100 queries: nothing to sample, nothing to price, never worth loading
    evaluate_pair(grid < 4, small, (1.0, 1.0, 1.0))
assert not loaded() and nearest._forgone_ns == 0.0, nearest._forgone_ns
nearest._LOOP = "numpy"
want = evaluate_pair(grid < 26, inner, (1.0, 1.0, 1.0))
nearest._LOOP, nearest._forgone_ns = "auto", 0.0
nearest._NS_LOAD_COMPILED = float(sys.argv[1])
runs = []
for _ in range(4):
    got = evaluate_pair(grid < 26, inner, (1.0, 1.0, 1.0))
    assert got == want, (got, want)
    runs.append(loaded())
print(runs, nearest._forgone_ns)
"""


def test_process_switches_to_the_compiled_loop_once_numpy_searches_would_have_paid_for_it():
    """Ski rental (module docstring): searches run in numpy until what the compiled loop would have saved on
    them reaches its one-off cost; the search that crosses it loads the loop, and every later one uses it. Fresh
    processes, because a loaded loop stays loaded."""
    import subprocess
    import sys

    def runs(load_ns: float) -> tuple[list[bool], float]:
        out = subprocess.run(
            [sys.executable, "-c", _RENT_OR_BUY, str(load_ns)], capture_output=True, text=True, check=True
        ).stdout.split("[")[-1]
        flags, spent = out.split("]")
        return [f.strip() == "True" for f in flags.split(",")], float(spent)

    never, per_pair = runs(float("inf"))
    assert never == [False] * 4 and per_pair > 0
    per_pair /= 4  # what the compiled loop would save on one evaluation (two directions)
    assert runs(2.5 * per_pair)[0] == [False, False, True, True]
    assert runs(0.0)[0] == [True] * 4


_NO_CACHE = """
import numpy as np
from numba.core.caching import FunctionCache

FunctionCache._impl_class._locator_classes = []  # no writable cache folder anywhere (read-only install)
from medseg.metrics import nearest, rowscan, surface

assert type(rowscan.scan_rows._cache).__name__ == "NullCache"
grid = np.sqrt(((np.indices((30, 30, 30)) - 14.5) ** 2).sum(axis=0))
query = np.array(np.nonzero(surface._border(np.pad(grid < 12, 1))))
search = nearest._RowSearch(surface._border(np.pad(grid < 8, 1)), np.ones(3))
d2, _ = search.offsets(query, compiled=True)
np.testing.assert_array_equal(d2, search.offsets(query, compiled=False)[0])
print("ok")
"""


def test_compiled_loop_without_a_writable_cache_folder_compiles_per_process():
    """numba refuses ``cache=True`` when no cache folder is writable; the loop is then compiled in memory."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _NO_CACHE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
