"""Exact offset from query corners to the nearest border corner of the other mask, with a bounded cost.

:func:`nearest_offsets` returns, for every query corner, the integer offset to a nearest target border corner
under the voxel spacing; :mod:`medseg.metrics.surface` turns offsets into distances with the arithmetic of
``scipy.ndimage.distance_transform_edt``, so values equal DeepMind ``surface-distance``'s (which runs that
EDT) to the last bits. Two exact methods, chosen per direction by an estimate of their cost:

1. **Row search** (surfaces close together). The "row axis" is the axis of smallest spacing. ``G`` stores,
   for every corner of the box, the signed offset along the row axis to the nearest target corner *in the
   same row* (:func:`row_offsets`). The exact squared distance of a query is::

       d² = min over rows (Δa, Δb) of (s_a Δa)² + (s_b Δb)² + (s_r G[a+Δa, b+Δb, r])²

   Rows are visited in increasing in-plane distance and a query stops as soon as that exceeds its best d²,
   so a corner on the other surface finishes after one lookup; a query at distance d visits ~π d²/(s_a s_b)
   rows. The loop over a query's rows is compiled (:mod:`medseg.metrics.rowscan`, numba): ~2 ns a row when
   surfaces are ~10 voxels apart, ~3.5 ns at ~30 voxels (the rows of a larger disc miss the cache more).
   Queries still undecided after a disc of ``_SEARCH_ROWS`` rows go to a k-d tree
   (:class:`scipy.spatial.cKDTree`), which is slow next to a dense surface (~20 µs a query).
2. **Euclidean distance transform** (surfaces far apart): the feature transform of the target border over
   the (padded union) box, ``scipy.ndimage.distance_transform_edt(~border, sampling, return_indices=True)``
   — what ``surface-distance`` computes — read at the query corners. Its cost is set by the box volume
   (~0.15 µs a voxel), not by the distances: it bounds the worst case.

The estimate: ``_SAMPLE`` queries spread over the surface run through the row search, which counts the rows
they visit and the queries it leaves to the k-d tree; scaled to all queries, priced with the constants
below and divided by the threads the search would share, this is compared with the EDT's price for the box
(one thread). Cost grows with distance² for the search and not at all for the EDT, so surfaces up to a few
tens of voxels apart take the search and surfaces farther apart the EDT (``python -m
pipelines.bench_metrics --pairs --methods`` times both). The method only changes the time, never the
values: tests compare both against ``surface-distance`` and brute force.

Tried and dropped: the same row search vectorised in numpy (chunks of queries, a doubling batch of rows,
compaction of the queries still running; 2.7× slower than the compiled loop, see
:mod:`medseg.metrics.rowscan`); in numpy, a two-level search that pruned 4×4-row tiles with a lower bound
from the tile's nearest corner along the row axis (7 % faster at 8-12 voxels, 40 % slower at 2-6); scipy's
k-d tree for all queries (2-3× slower than the numpy row search at 8-12 voxels); ``G`` stored with the row
axis first so that a disc's rows share cache lines (compiled search 5.3 → 2.4 s at 30-36 voxels plus a
0.6 s copy; at 8-12 voxels 0.19 → 0.16 s plus 0.13 s to copy and sort the queries).
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

# Prices of the cost estimate, ns (one core of the 2-core AVX-512 machine, numba 0.68, scipy 1.17; measured by
# ``python -m pipelines.bench_metrics --pairs --methods``: compiled row search 2-3.5 ns a row, k-d tree
# 20-60 µs a far query, feature transform ~0.15 µs a voxel).
_NS_PER_ROW = 3.0
_NS_PER_KDTREE_QUERY = 20_000.0
_NS_PER_EDT_VOXEL = 150.0
# Queries sampled for the estimate (run through the search, about 1 ms when surfaces are close).
_SAMPLE = 512
# Rows visited per query before the k-d tree takes over: a disc of radius ~49 mm at 0.8 × 0.8 mm. Rows
# outside the box are skipped, so the disc costs no memory; only far queries ever reach its edge.
_SEARCH_ROWS = 12_000
METHODS = ("auto", "search", "edt")
# Fewer queries than this per half are searched in one thread (a thread hand-off costs ~0.1 ms).
_SPLIT_MIN_QUERIES = 10_000
# One feature transform at a time per process: it holds 12 bytes per box voxel (int32 index per axis).
_EDT_LOCK = threading.Lock()


def row_offsets(border: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offset along the last axis to the nearest ``border`` corner of the same row (the array ``G``).

    ``border`` is C-contiguous with the row axis last (length L). Each border corner "owns" the positions
    of its row that are closer to it than to its neighbours in the row, so ``G`` is filled row by row from
    the sorted border indices without a pass per axis. Values are stored shifted by ``2L`` so that they
    index a lookup table directly; 0 (offset ``-2L``) means "no border corner in this row".

    Returns ``(G, flat_idx)`` where ``flat_idx`` are the flat indices of the border corners in ``border``.
    """
    n_a, n_b, length = border.shape
    idx = np.flatnonzero(border)
    g = np.zeros((n_a, n_b, length), dtype=np.uint16 if length < 8192 else np.int32)
    if idx.size == 0:
        return g, idx
    row, x = np.divmod(idx, length)
    same_prev = np.empty(idx.size, dtype=bool)
    same_prev[0] = False
    np.equal(row[1:], row[:-1], out=same_prev[1:])
    same_next = np.append(same_prev[1:], False)
    start = np.zeros(idx.size, dtype=np.int64)
    start[1:] = (x[1:] + x[:-1]) // 2 + 1
    start[~same_prev] = 0
    stop = np.full(idx.size, length, dtype=np.int64)
    stop[:-1] = start[1:]
    stop[~same_next] = length
    owner = np.repeat((x + 2 * length).astype(g.dtype), stop - start).reshape(-1, length)
    owner -= np.arange(length, dtype=g.dtype)
    g.reshape(-1, length)[row[~same_prev]] = owner
    return g, idx


@functools.lru_cache(maxsize=16)
def _disc(s_a: float, s_b: float, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(da, db, cost, radius²)``: the row shifts of a disc of ``rows`` rows, by increasing in-plane
    squared distance ``cost`` (mm²); made once per spacing (a 20-label evaluation asks 40 times)."""
    r_mm = math.sqrt(rows * s_a * s_b / math.pi)
    reach_a, reach_b = math.ceil(r_mm / s_a), math.ceil(r_mm / s_b)
    da, db = np.meshgrid(np.arange(-reach_a, reach_a + 1), np.arange(-reach_b, reach_b + 1), indexing="ij")
    cost = ((da * s_a) ** 2 + (db * s_b) ** 2).ravel()
    keep = np.flatnonzero(cost <= r_mm**2)
    keep = keep[np.argsort(cost[keep], kind="stable")]
    out = da.ravel()[keep], db.ravel()[keep], cost[keep]
    for array in out:
        array.flags.writeable = False
    return (*out, r_mm**2)


class _RowSearch:
    """The row search of the module docstring for one target border (row axis last)."""

    def __init__(self, border: np.ndarray, spacing: np.ndarray) -> None:
        s_a, s_b, s_r = (float(s) for s in spacing)
        self.da, self.db, self.cost, self.radius2 = _disc(s_a, s_b, _SEARCH_ROWS)
        self.g, self.target_idx = row_offsets(border)
        self.length = length = border.shape[2]
        # Lookup: stored value v -> squared in-row distance of offset v - 2L ("no corner" -> inf).
        offsets = np.arange(4 * length + 1, dtype=np.int64) - 2 * length
        self.row_sq = (offsets * s_r) ** 2
        self.row_sq[np.abs(offsets) >= length] = np.inf
        self.rows_visited = 0

    def offsets(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(d², integer offsets (3, n))`` for queries ``q`` (3, n); ``d² = inf`` beyond the search radius."""
        from medseg.metrics.rowscan import scan_rows  # numba: loaded on the first search, not on import

        n = q.shape[1]
        best = np.empty(n)
        best_k = np.empty(n, dtype=np.intp)
        best_v = np.empty(n, dtype=self.g.dtype)
        self.rows_visited += scan_rows(
            self.g, q[0], q[1], q[2], self.da, self.db, self.cost, self.row_sq, best, best_k, best_v
        )
        delta = np.stack([self.da[best_k], self.db[best_k], best_v.astype(np.int64) - 2 * self.length])
        best[best > self.radius2] = np.inf  # not certified: a nearer corner may lie outside the disc
        return best, delta


def _edt_offsets(border: np.ndarray, spacing: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Offsets from the feature transform of ``border`` (exact; what ``surface-distance`` computes)."""
    from scipy import ndimage

    with _EDT_LOCK:
        features = ndimage.distance_transform_edt(
            ~border, sampling=spacing, return_distances=False, return_indices=True
        )
        flat = np.ravel_multi_index(tuple(q), border.shape)
        return np.stack([features[ax].reshape(-1)[flat] - q[ax] for ax in range(3)]).astype(np.int64)


def _kdtree_offsets(target_idx: np.ndarray, shape, spacing: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Offsets to the nearest target corner by a k-d tree in mm (for the few queries beyond the search)."""
    from scipy.spatial import cKDTree

    target = np.array(np.unravel_index(target_idx, shape))
    _, nn = cKDTree(target.T * spacing).query(q.T * spacing)
    return target[:, nn] - q


def _search_offsets(search: _RowSearch, q: np.ndarray, pool) -> tuple[np.ndarray, np.ndarray]:
    """``search.offsets(q)``, split in two halves between this thread and ``pool`` when there is one."""
    half = q.shape[1] // 2
    if pool is None or half < _SPLIT_MIN_QUERIES:
        return search.offsets(q)
    future = pool.submit(search.offsets, q[:, half:])
    d2_a, delta_a = search.offsets(q[:, :half])
    d2_b, delta_b = future.result()
    return np.concatenate([d2_a, d2_b]), np.concatenate([delta_a, delta_b], axis=1)


def choose_method(search: _RowSearch, q: np.ndarray, box_voxels: int, threads: int = 1) -> str:
    """``"search"`` or ``"edt"``, whichever the sampled cost estimate (module docstring) prices lower.

    ``threads``: how many threads the search would share (its queries are split between them; the feature
    transform runs in one).
    """
    n = q.shape[1]
    if n <= 4 * _SAMPLE:
        return "search"
    before = search.rows_visited
    d2, _ = search.offsets(q[:, np.linspace(0, n - 1, _SAMPLE).astype(np.intp)])
    rows = search.rows_visited - before
    far = np.count_nonzero(np.isinf(d2))
    search_ns = n / _SAMPLE * (rows * _NS_PER_ROW + far * _NS_PER_KDTREE_QUERY) / threads
    return "edt" if box_voxels * _NS_PER_EDT_VOXEL < search_ns else "search"


def nearest_offsets(
    query: np.ndarray, target_border: np.ndarray, spacing, method: str = "auto", pool=None
) -> tuple[np.ndarray, str]:
    """Integer offsets (3, n) from each query corner to a nearest ``target_border`` corner, and the method
    that found them (``search`` or ``edt``).

    Args:
        query: integer corner coordinates (3, n) in the frame of ``target_border``.
        target_border: boolean border-corner array (the padded box shared by both masks), not empty.
        spacing: voxel size in mm per axis.
        method: ``auto`` (the cheaper by the estimate), ``search`` or ``edt`` (see the module docstring).
        pool: an idle ``concurrent.futures`` executor: the row search then runs the second half of the
            queries there while this thread runs the first (queries are independent; the compiled loop
            releases the GIL).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not valid; valid: {', '.join(METHODS)}")
    spacing = np.asarray(spacing, dtype=np.float64)
    # Row axis = the (last) axis of smallest spacing: fewest rows to visit for a given distance in mm.
    row_axis = 2 - int(np.argmin(spacing[::-1]))
    perm = [ax for ax in range(3) if ax != row_axis] + [row_axis]
    border = target_border if perm == [0, 1, 2] else np.ascontiguousarray(target_border.transpose(perm))
    s_perm, q = spacing[perm], query[perm]
    search = _RowSearch(border, s_perm) if method != "edt" else None
    if method == "auto":
        threads = 2 if pool is not None and q.shape[1] >= 2 * _SPLIT_MIN_QUERIES else 1
        method = choose_method(search, q, border.size, threads)
    if method == "edt":
        delta = _edt_offsets(border, s_perm, q)
    else:
        d2, delta = _search_offsets(search, q, pool)
        undecided = np.flatnonzero(np.isinf(d2))
        if undecided.size:
            delta[:, undecided] = _kdtree_offsets(search.target_idx, border.shape, s_perm, q[:, undecided])
    out = np.empty_like(delta)
    out[perm] = delta
    return out, method
