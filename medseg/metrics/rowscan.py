"""The inner loop of the row search (:mod:`medseg.metrics.nearest`), compiled with numba.

One query at a time: visit the rows of the disc in increasing in-plane squared distance ``cost[k]`` and stop
as soon as that is not below the best squared distance found so far, which is then exact (every row not
visited costs at least its in-plane distance). Each visit is one lookup in the row-offset array ``G`` and
one in the table of squared in-row distances.

Why compiled: the same loop vectorised in numpy (chunks of queries, a growing batch of rows each, compacting
the queries still running) needs five full passes over an index/value array per batch and stops a query only
at the end of its batch; this loop stops each query at its own last row, with identical results. Loading it
is a one-off cost per process, in time and memory, so :mod:`medseg.metrics.nearest` uses it only once that
has paid off; ``nogil`` lets the two halves of the queries run in two threads. Timings: ``docs/design.md``
(section ``medseg.metrics.rowscan``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["scan_rows"]


def _jit(fn):
    """``numba.njit`` with the compiled code cached on disk (next to this file, else numba's user-wide cache
    folder, else ``NUMBA_CACHE_DIR``); where none is writable numba refuses to cache, and the loop is compiled
    once per process instead."""
    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True)(fn)


@_jit
def scan_rows(g_flat, base, shifts, cost, row_sq, best_out, k_out, v_out) -> int:  # pragma: no cover - jit
    """Nearest row of every query; returns the number of rows visited (all queries).

    Args:
        g_flat: the padded row-offset array ``G``, flattened (stored offsets, see
            :func:`~medseg.metrics.nearest.row_offsets`; the padding keeps every row of the disc in bounds).
        base: flat index in ``G`` of each query's own position.
        shifts, cost: flat index shift and in-plane squared distance (mm²) of each row of the disc, by
            increasing ``cost``.
        row_sq: squared in-row distance (mm²) of each stored offset (``inf`` for "no corner in this row").
        best_out, k_out, v_out: per query, the best squared distance (``inf`` if no row of the disc has a
            corner), the index of its row in the disc and the stored offset found there.
    """
    visited = 0
    for i in range(base.size):
        b = base[i]
        best = np.inf
        best_k = 0
        best_v = g_flat[b + shifts[0]]
        for k in range(cost.size):
            c = cost[k]
            if c >= best:
                break
            v = g_flat[b + shifts[k]]
            d = row_sq[v] + c
            better = d < best
            best = d if better else best
            best_k = k if better else best_k
            best_v = v if better else best_v
            visited += 1
        best_out[i] = best
        k_out[i] = best_k
        v_out[i] = best_v
    return visited
