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
   rows. Queries still undecided after ``_SEARCH_ROWS`` rows go to a k-d tree
   (:class:`scipy.spatial.cKDTree`), which is slow next to a dense surface (``_NS_PER_KDTREE_QUERY``).
2. **Euclidean distance transform** (surfaces far apart): the feature transform of the target border over
   the (padded union) box, ``scipy.ndimage.distance_transform_edt(~border, sampling, return_indices=True)``
   — what ``surface-distance`` computes — read at the query corners. Its cost is set by the box volume
   (``_NS_PER_EDT_VOXEL``), not by the distances: it bounds the worst case.

The estimate: ``_SAMPLE`` queries spread over the surface run through the row search, which counts the rows
they visit and the queries it leaves to the k-d tree; scaled to all queries, priced with the constants
below and divided by the threads the search would share, this is compared with the EDT's price for the box
(one thread). Cost grows with distance² for the search and not at all for the EDT, so surfaces a few voxels
apart take the search and surfaces tens of voxels apart the EDT (``python -m benchmarks.bench_metrics
--pairs`` shows both). The method only changes the time, never the values: tests compare both against
``surface-distance`` and brute force.

**Two loops for the search, one result.** A query's rows are visited either by numpy, vectorised over
chunks of queries (``_NS_PER_ROW``), or by a compiled loop (:mod:`medseg.metrics.rowscan`, numba,
``_NS_PER_ROW_COMPILED``). The compiled loop costs its process a one-off ``_NS_LOAD_COMPILED`` (importing
numba, loading the loop from numba's cache) and the resident memory of LLVM: more than it saves on a small
evaluation, or on a single large pair. So a process starts with numpy and switches for good once the time
the compiled loop would have saved on its searches (by the estimate, per wall second) adds up to that
one-off cost — "ski rental", never more than twice the better choice made in hindsight. Evaluating a few
phantom cases never loads numba; a folder of clinical CTs or bad predictions load it at the second or third
large search. ``_LOOP`` forces one loop (tests, benchmarks); both give the same rows, offsets and distances.

The measured prices, the loop timings and the alternatives tried and not kept are in ``docs/design.md``
(section ``medseg.metrics.nearest``).
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

# Prices of the cost estimate, ns (one core of the 2-core AVX-512 machine, numpy 2.4, scipy 1.17, numba 0.68;
# measured by ``python -m benchmarks.bench_metrics --pairs``: numpy row search ~6 ns a row, compiled ~2 ns,
# k-d tree 20-60 µs a far query, feature transform ~0.1 µs a voxel; loading the compiled loop 0.5-0.6 s).
_NS_PER_ROW = 6.0
_NS_PER_ROW_COMPILED = 2.0
_NS_LOAD_COMPILED = 550e6
_NS_PER_KDTREE_QUERY = 20_000.0
_NS_PER_EDT_VOXEL = 100.0
# Queries sampled for the estimate (run through the search, about 1 ms when surfaces are close).
_SAMPLE = 512
# Rows visited per query before the k-d tree takes over: a disc of radius ~19.5 mm at 0.8 × 0.8 mm.
_SEARCH_ROWS = 1500
# Queries processed together; consecutive raster-ordered corners touch nearby rows, so this keeps the
# gathers from the row-offset array in cache.
_CHUNK = 8192
METHODS = ("auto", "search", "edt")
# Which loop visits the rows: "auto" (module docstring), "numpy" or "compiled".
_LOOP = "auto"
# Process-wide: the wall time the compiled loop would have saved on the searches run in numpy so far.
_forgone_ns = 0.0
_LOOP_LOCK = threading.Lock()
# Fewer queries than this per half are searched in one thread (a thread hand-off costs ~0.1 ms).
_SPLIT_MIN_QUERIES = 10_000
# One feature transform at a time per process: it holds 12 bytes per box voxel (int32 index per axis).
_EDT_LOCK = threading.Lock()


def row_offsets(border: np.ndarray, pad_a: int, pad_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Offset along the last axis to the nearest ``border`` corner of the same row (the array ``G``).

    ``border`` is C-contiguous with the row axis last (length L). Each border corner "owns" the positions
    of its row that are closer to it than to its neighbours in the row, so ``G`` is filled row by row from
    the sorted border indices without a pass per axis. Values are stored shifted by ``2L`` so that they
    index a lookup table directly; 0 (offset ``-2L``) means "no border corner in this row". ``G`` is padded
    by ``pad_a`` and ``pad_b`` empty rows on the first two axes so that row shifts stay in bounds.

    Returns ``(G, flat_idx)`` where ``flat_idx`` are the flat indices of the border corners in ``border``.
    """
    n_a, n_b, length = border.shape
    idx = np.flatnonzero(border)
    g = np.zeros((n_a + 2 * pad_a, n_b + 2 * pad_b, length), dtype=np.uint16 if length < 8192 else np.int32)
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
    rows = row[~same_prev]
    ra, rb = np.divmod(rows, n_b)
    g.reshape(-1, length)[(ra + pad_a) * g.shape[1] + (rb + pad_b)] = owner
    return g, idx


class _RowSearch:
    """The row search of the module docstring for one target border (row axis last)."""

    def __init__(self, border: np.ndarray, spacing: np.ndarray) -> None:
        s_a, s_b, s_r = (float(s) for s in spacing)
        # Row shifts (da, db) sorted by in-plane squared distance, inside a disc of radius r_mm.
        r_mm = math.sqrt(_SEARCH_ROWS * s_a * s_b / math.pi)
        self.radius2 = r_mm**2
        pad_a, pad_b = math.ceil(r_mm / s_a), math.ceil(r_mm / s_b)
        da, db = np.meshgrid(np.arange(-pad_a, pad_a + 1), np.arange(-pad_b, pad_b + 1), indexing="ij")
        cost = ((da * s_a) ** 2 + (db * s_b) ** 2).ravel()
        keep = np.flatnonzero(cost <= self.radius2)
        keep = keep[np.argsort(cost[keep], kind="stable")]
        self.da, self.db, self.cost = da.ravel()[keep], db.ravel()[keep], cost[keep]
        self.pad = pad_a, pad_b
        self.g, self.target_idx = row_offsets(border, pad_a, pad_b)
        self.length = length = border.shape[2]
        # Lookup: stored value v -> squared in-row distance of offset v - 2L ("no corner" -> inf).
        offsets = np.arange(4 * length + 1, dtype=np.int64) - 2 * length
        self.row_sq = (offsets * s_r) ** 2
        self.row_sq[np.abs(offsets) >= length] = np.inf
        self.rows_visited = 0

    def offsets(self, q: np.ndarray, compiled: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(d², integer offsets (3, n))`` for queries ``q`` (3, n); ``d² = inf`` beyond the search radius.

        ``compiled``: visit the rows with the compiled loop instead of numpy (the same result).
        """
        n, g, length = q.shape[1], self.g, self.length
        pad_a, pad_b = self.pad
        g_flat = g.reshape(-1)
        stride_a, stride_b = g.shape[1] * length, length
        base = (q[0] + pad_a) * stride_a + (q[1] + pad_b) * stride_b + q[2]
        shifts = self.da * stride_a + self.db * stride_b
        cost, row_sq = self.cost, self.row_sq
        if compiled:
            from medseg.metrics.rowscan import scan_rows

            best = np.empty(n)
            best_k = np.empty(n, dtype=np.intp)
            best_v = np.empty(n, dtype=g.dtype)
            base = np.ascontiguousarray(base, dtype=np.int64)  # one compiled signature for every call
            self.rows_visited += scan_rows(g_flat, base, shifts, cost, row_sq, best, best_k, best_v)
            return self._result(best, best_k, best_v)
        best = np.full(n, np.inf)
        best_k = np.zeros(n, dtype=np.intp)
        best_v = np.zeros(n, dtype=g.dtype)
        # Chunks of consecutive (raster-ordered) queries keep the gathers from G in cache. The state of the
        # queries still running is kept compacted; finished queries are written back.
        for lo in range(0, n, _CHUNK):
            ids = np.arange(lo, min(lo + _CHUNK, n))
            cur_base, cur_best = base[ids], best[ids]
            cur_k, cur_v = best_k[ids], best_v[ids]
            start, step = 0, 1
            while ids.size:
                stop = min(start + step, cost.size)
                vals = g_flat.take(cur_base[:, None] + shifts[None, start:stop])
                self.rows_visited += vals.size
                d2 = row_sq.take(vals)
                d2 += cost[None, start:stop]
                k = d2.argmin(axis=1)
                rows = np.arange(ids.size)
                dmin = d2[rows, k]
                better = dmin < cur_best
                np.copyto(cur_best, dmin, where=better)
                np.copyto(cur_k, k + start, where=better)
                np.copyto(cur_v, vals[rows, k], where=better)
                next_cost = cost[stop] if stop < cost.size else np.inf
                done = cur_best <= next_cost
                if done.any():
                    fin = ids[done]
                    best[fin], best_k[fin], best_v[fin] = cur_best[done], cur_k[done], cur_v[done]
                    keep_going = ~done
                    ids, cur_base, cur_best = ids[keep_going], cur_base[keep_going], cur_best[keep_going]
                    cur_k, cur_v = cur_k[keep_going], cur_v[keep_going]
                start, step = stop, min(2 * step, 64)
        return self._result(best, best_k, best_v)

    def _result(
        self, best: np.ndarray, best_k: np.ndarray, best_v: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
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


def _search_offsets(search: _RowSearch, q: np.ndarray, pool, compiled: bool) -> tuple[np.ndarray, np.ndarray]:
    """``search.offsets(q)``, split in two halves between this thread and ``pool`` when there is one."""
    half = q.shape[1] // 2
    if pool is None or half < _SPLIT_MIN_QUERIES:
        return search.offsets(q, compiled)
    future = pool.submit(search.offsets, q[:, half:], compiled)
    d2_a, delta_a = search.offsets(q[:, :half], compiled)
    d2_b, delta_b = future.result()
    return np.concatenate([d2_a, d2_b]), np.concatenate([delta_a, delta_b], axis=1)


def _predict(search: _RowSearch, q: np.ndarray) -> tuple[float, float]:
    """``(rows, far)``: rows the search would visit for all of ``q`` and queries it would leave to the k-d
    tree, scaled from ``_SAMPLE`` queries spread over the surface (``(0, 0)`` for a few queries: cheap)."""
    n = q.shape[1]
    if n <= 4 * _SAMPLE:
        return 0.0, 0.0
    before = search.rows_visited
    d2, _ = search.offsets(q[:, np.linspace(0, n - 1, _SAMPLE).astype(np.intp)])
    rows = search.rows_visited - before
    return n / _SAMPLE * rows, n / _SAMPLE * np.count_nonzero(np.isinf(d2))


def _search_ns(rows: float, far: float, compiled: bool) -> float:
    per_row = _NS_PER_ROW_COMPILED if compiled else _NS_PER_ROW
    return rows * per_row + far * _NS_PER_KDTREE_QUERY


def _compiled_loaded() -> bool:
    """Whether searches use the compiled loop without paying for it now (loaded already, or forced)."""
    return _LOOP == "compiled" or (_LOOP == "auto" and "medseg.metrics.rowscan" in sys.modules)


def _rent_or_buy(saving_ns: float) -> bool:
    """Add what the compiled loop would save on the search about to run to the process's total; ``True``
    once that total reaches the loop's one-off cost (the search about to run then loads and uses it)."""
    global _forgone_ns
    if _LOOP != "auto":
        return _LOOP == "compiled"
    with _LOOP_LOCK:
        _forgone_ns += saving_ns
        return _forgone_ns >= _NS_LOAD_COMPILED


def choose_method(search: _RowSearch, q: np.ndarray, box_voxels: int, threads: int = 1) -> str:
    """``"search"`` or ``"edt"``, whichever the sampled cost estimate (module docstring) prices lower.

    ``threads``: how many threads the search would share (its queries are split between them; the feature
    transform runs in one).
    """
    return _cheaper(*_predict(search, q), box_voxels, threads, _compiled_loaded())


def _cheaper(rows: float, far: float, box_voxels: int, threads: int, compiled: bool) -> str:
    search_ns = _search_ns(rows, far, compiled) / threads
    return "edt" if box_voxels * _NS_PER_EDT_VOXEL < search_ns else "search"


def _searched_offsets(
    search: _RowSearch, q: np.ndarray, shape: tuple[int, ...], spacing: np.ndarray, pool, compiled: bool
) -> np.ndarray:
    """The row search's offsets, with the k-d tree for the queries it left undecided."""
    d2, delta = _search_offsets(search, q, pool, compiled)
    undecided = np.flatnonzero(np.isinf(d2))
    if undecided.size:
        delta[:, undecided] = _kdtree_offsets(search.target_idx, shape, spacing, q[:, undecided])
    return delta


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
            queries there while this thread runs the first (queries are independent; numpy and the
            compiled loop release the GIL).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not valid; valid: {', '.join(METHODS)}")
    spacing = np.asarray(spacing, dtype=np.float64)
    # Row axis = the (last) axis of smallest spacing: fewest rows to visit for a given distance in mm.
    row_axis = 2 - int(np.argmin(spacing[::-1]))
    perm = [ax for ax in range(3) if ax != row_axis] + [row_axis]
    border = target_border if perm == [0, 1, 2] else np.ascontiguousarray(target_border.transpose(perm))
    s_perm, q = spacing[perm], query[perm]
    search = None if method == "edt" else _RowSearch(border, s_perm)
    if search is not None:
        rows, far = _predict(search, q)
        compiled = _compiled_loaded()
        threads = 2 if pool is not None and q.shape[1] >= 2 * _SPLIT_MIN_QUERIES else 1  # _search_offsets
        if method == "auto":
            method = _cheaper(rows, far, border.size, threads, compiled)
    if method == "edt":
        delta = _edt_offsets(border, s_perm, q)
    else:
        if not compiled:  # what the compiled loop would save on this search, in wall time
            saving = _search_ns(rows, far, compiled=False) - _search_ns(rows, far, compiled=True)
            compiled = _rent_or_buy(saving / threads)
        delta = _searched_offsets(search, q, border.shape, s_perm, pool, compiled)
    out = np.empty_like(delta)
    out[perm] = delta
    return out, method
