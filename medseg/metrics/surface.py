"""Surface elements and exact surface-to-surface distances with DeepMind ``surface-distance`` semantics.

What a "surface" is here (the convention of DeepMind's ``surface-distance`` package, used by most papers
that report HD95 / NSD, e.g. Nikolov et al. 2021):

* Surface points sit on **voxel corners**. A corner belongs to the surface of a mask when the 2×2×2 voxels
  around it are neither all inside nor all outside ("border corner").
* Each border corner carries an **area** that depends only on the 8-bit code of its 2×2×2 neighbourhood: the
  area of the marching-cubes surface patch inside that 2×2×2 cell, scaled by the voxel spacing. The table is
  derived in :func:`_code_triangle_normals` (not copied): cut edges at their midpoints, ambiguous faces
  resolved by separating the minority corners, each polygon triangulated like the classic marching-cubes
  table (for the non-planar 5-, 6- and 7-gons that is the triangulation of largest area at unit spacing).
  Tests hold it equal to the package's table to 1e-12 mm² for random anisotropic spacings.
* The table is ours, not MONAI's ``monai.metrics.utils.create_table_neighbour_code_to_surface_area``. Both
  index codes alike (same ``ENCODING_KERNEL``, so the code permutation is the identity; a test checks that
  MONAI's table equals ours to float32 rounding), but MONAI's is **float32** (its normals tensor takes torch's
  default dtype and the spacing is cast to it), which fails the 1e-12 equality above, and calling it would
  import torch and MONAI into the torch-free ``medseg evaluate`` path. Only MONAI's private
  ``_get_neighbour_code_to_normals_table`` would give float64. The measured differences and costs
  (``python -m benchmarks.bench_metrics --tables``) are in ``docs/design.md`` (section
  ``medseg.metrics.surface``).
* The distance of a border corner of one mask to the other mask is the Euclidean distance in mm to the
  nearest border corner of the other mask (``surface-distance`` runs an EDT on the border; we get the same
  numbers, usually without one, see below).

How the distances are computed fast (and exactly):

1. Everything happens in the union bounding box of the two masks plus one voxel of zero padding.
2. Border corners come from six boolean OR/AND passes; the 8-bit codes (and so the areas) are gathered only
   at border corners, not computed for the whole box.
3. For each direction, the exact nearest border corner of the other mask is found by the cheaper of two
   exact methods, chosen by a sampled estimate of their cost (:mod:`medseg.metrics.nearest`): a row search
   whose cost grows with the distance² (surfaces close together: a corner on the other surface costs one
   lookup), or scipy's Euclidean distance transform on the box — the computation ``surface-distance`` itself
   does — whose cost is set by the box volume and so bounds the worst case (surfaces far apart). The two
   directions run in two threads.
4. Final distances are recomputed from the integer offsets as ``sqrt((Δ0 s0)² + (Δ1 s1)² + (Δ2 s2)²)``,
   the same arithmetic as ``scipy.ndimage.distance_transform_edt``, so values agree to the last bits.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.metrics.nearest import nearest_offsets

__all__ = [
    "SurfaceDistances",
    "bounding_box",
    "compute_surface_distances",
    "directed_mean",
    "directed_percentile",
    "surface_overlap",
    "surfel_area_table",
]

# Masks with fewer voxels than this are measured in one thread (a thread costs ~0.1 ms).
_THREAD_MIN_CORNERS = 20_000

# --------------------------------------------------------------------------------------------------------
# Neighbourhood code -> surface area (marching cubes on the 2x2x2 cell, derived, not tabulated)
# --------------------------------------------------------------------------------------------------------

_CORNERS = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def _bit(corner: tuple[int, int, int]) -> int:
    """Bit of a cell corner in the 8-bit neighbourhood code.

    The voxel at offset (a, b, c) from the cell's lowest corner has weight 2**(7 - (4a + 2b + c)), i.e. the
    voxel (0, 0, 0) is the most significant bit — the ``ENCODE_NEIGHBOURHOOD_3D_KERNEL`` convention.
    """
    a, b, c = corner
    return 7 - (4 * a + 2 * b + c)


def _polygons(inside: set[tuple[int, int, int]]) -> list[list[np.ndarray]]:
    """Marching-cubes polygons (vertex lists at edge midpoints) separating ``inside`` corners from the rest."""
    edges = [
        (p, q)
        for p, q in itertools.combinations(_CORNERS, 2)
        if sum(abs(x - y) for x, y in zip(p, q, strict=True)) == 1
    ]
    cut = [e for e in edges if (e[0] in inside) != (e[1] in inside)]
    neighbours: dict = {e: [] for e in cut}
    for axis in range(3):
        for value in (0, 1):
            face = [p for p in _CORNERS if p[axis] == value]
            face_cut = [e for e in cut if e[0] in face and e[1] in face]
            if not face_cut:
                continue
            if len(face_cut) == 2:
                pairs = [face_cut]
            else:  # 4 cut edges: ambiguous face, the two inside corners are cut off separately
                pairs = [[e for e in face_cut if p in e] for p in face if p in inside]
            for e, f in pairs:
                neighbours[e].append(f)
                neighbours[f].append(e)
    loops, seen = [], set()
    for start in cut:
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            nxt = [n for n in neighbours[cur] if n != prev and n not in seen]
            if not nxt:
                break
            prev, cur = cur, nxt[0]
            loop.append(cur)
            seen.add(cur)
        loops.append([np.array([(x + y) / 2.0 for x, y in zip(*e, strict=True)]) for e in loop])
    return loops


def _triangulations(n: int) -> list[list[tuple[int, int, int]]]:
    """All triangulations of a polygon with ``n`` vertices (as vertex-index triples)."""

    @functools.cache
    def rec(i: int, j: int) -> tuple:
        if j - i < 2:
            return ((),)
        return tuple(
            left + right + ((i, k, j),) for k in range(i + 1, j) for left in rec(i, k) for right in rec(k, j)
        )

    return [list(t) for t in rec(0, n - 1)]


@functools.lru_cache(maxsize=1)
def _code_triangle_normals() -> tuple[np.ndarray, np.ndarray]:
    """Triangle area vectors (cross product / 2, unit spacing) of the surface patch of every code.

    Returns ``(codes, normals)``: ``normals[i]`` belongs to neighbourhood code ``codes[i]``. A code and its
    complement describe the same surface, so codes with more than four inside corners use the complement.
    """
    codes, normals = [], []
    for code in range(256):
        inside = {p for p in _CORNERS if code >> _bit(p) & 1}
        if len(inside) > 4:
            inside = set(_CORNERS) - inside
        for poly in _polygons(inside):
            best, best_area = None, -1.0
            for tri in _triangulations(len(poly)):
                vecs = [np.cross(poly[j] - poly[i], poly[k] - poly[i]) / 2.0 for i, j, k in tri]
                area = sum(float(np.linalg.norm(v)) for v in vecs)
                if area > best_area + 1e-12:
                    best, best_area = vecs, area
            for v in best or []:
                codes.append(code)
                normals.append(v)
    return np.asarray(codes, dtype=np.intp), np.asarray(normals, dtype=np.float64).reshape(-1, 3)


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Area in mm² of the surface element of each of the 256 neighbourhood codes for this voxel spacing.

    A triangle with area vector ``n`` (unit voxels) has area ``|(n0 s1 s2, n1 s0 s2, n2 s0 s1)|`` once the
    axes are scaled by the spacing ``s``. Codes 0 (all outside) and 255 (all inside) have area 0.
    """
    s0, s1, s2 = (float(s) for s in spacing)
    codes, normals = _code_triangle_normals()
    scaled = normals * np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.bincount(codes, weights=np.linalg.norm(scaled, axis=1), minlength=256)


# --------------------------------------------------------------------------------------------------------
# Bounding boxes and border corners
# --------------------------------------------------------------------------------------------------------


def _any_along_first(mask: np.ndarray) -> np.ndarray:
    """``mask.any(axis=(1, 2))`` for a C-contiguous bool volume, reading 8 bytes at a time when possible."""
    flat = mask.reshape(mask.shape[0], -1)
    if flat.shape[1] % 8 == 0 and flat.flags.c_contiguous:
        return flat.view(np.uint64).any(axis=1)
    return flat.any(axis=1)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of a boolean 3D mask as slices, or ``None`` if the mask is empty."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    rows = np.flatnonzero(_any_along_first(mask))
    if rows.size == 0:
        return None
    slab = np.logical_or.reduce(mask[rows[0] : rows[-1] + 1], axis=0)
    ys = np.flatnonzero(slab.any(axis=1))
    xs = np.flatnonzero(slab.any(axis=0))
    return (slice(rows[0], rows[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))


def union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    """Smallest box containing both boxes (``None`` stands for an empty box)."""
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def _border(padded: np.ndarray) -> np.ndarray:
    """Border corners of a zero-padded mask, as a bool array of the padded shape.

    Corner ``(i, j, k)`` of the result stands for the 2×2×2 voxels ``padded[i:i+2, j:j+2, k:k+2]``; it is a
    border corner if these voxels are mixed. The last plane of every axis is always False.
    """
    p = padded
    anyv = p[1:] | p[:-1]
    allv = p[1:] & p[:-1]
    anyv = anyv[:, 1:] | anyv[:, :-1]
    allv = allv[:, 1:] & allv[:, :-1]
    anyv = anyv[:, :, 1:] | anyv[:, :, :-1]
    allv = allv[:, :, 1:] & allv[:, :, :-1]
    out = np.zeros(p.shape, dtype=bool)
    np.greater(anyv, allv, out=out[:-1, :-1, :-1])  # any & ~all
    return out


def _codes_at(padded: np.ndarray, flat_idx: np.ndarray) -> np.ndarray:
    """8-bit neighbourhood codes of the corners ``flat_idx`` (flat indices into ``padded``)."""
    strides = (padded.shape[1] * padded.shape[2], padded.shape[2], 1)
    flat = padded.reshape(-1).view(np.uint8)
    code = np.zeros(flat_idx.shape, dtype=np.uint8)
    for a, b, c in _CORNERS:
        off = a * strides[0] + b * strides[1] + c
        code |= flat[flat_idx + off] << np.uint8(_bit((a, b, c)))
    return code


# --------------------------------------------------------------------------------------------------------
# Exact nearest-border distances
# --------------------------------------------------------------------------------------------------------


def _side(padded: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(border, corners (3, n), areas)`` of one zero-padded mask: its border-corner array, the integer
    coordinates of those corners and each corner's surface area in mm²."""
    border = _border(padded)
    idx = np.flatnonzero(border)
    return border, np.array(np.unravel_index(idx, padded.shape)), table[_codes_at(padded, idx)]


def _nearest(
    query: np.ndarray,
    target_border: np.ndarray,
    n_target: int,
    spacing: np.ndarray,
    method: str = "auto",
    pool=None,
) -> tuple[np.ndarray, str]:
    """Exact distance in mm from each query corner (3, n) to the nearest corner of ``target_border``, and the
    method used (``""`` when nothing was searched).

    The integer offsets come from :func:`medseg.metrics.nearest.nearest_offsets`; the distance is
    ``sqrt((Δ0 s0)² + (Δ1 s1)² + (Δ2 s2)²)``, the arithmetic of ``scipy.ndimage.distance_transform_edt``.
    ``inf`` when the target has no border corner (``n_target == 0``).
    """
    n = query.shape[1]
    if n == 0:
        return np.zeros(0), ""
    if n_target == 0:
        return np.full(n, np.inf), ""
    offsets, method = nearest_offsets(query, target_border, spacing, method, pool)
    out = offsets.astype(np.float64)
    for axis in range(3):
        out[axis] *= spacing[axis]
    np.multiply(out, out, out=out)
    return np.sqrt(np.add.reduce(out, axis=0)), method


@dataclass
class SurfaceDistances:
    """Border-corner distances and areas of a pair of masks (the input of every surface metric).

    ``dist_pred_to_ref[i]`` is the distance in mm from the i-th border corner of the prediction to the
    reference border; ``area_pred[i]`` its surface area in mm². Same for the reference. An empty mask has
    empty arrays; the distances *to* an empty mask are ``inf``.
    """

    dist_pred_to_ref: np.ndarray
    area_pred: np.ndarray
    dist_ref_to_pred: np.ndarray
    area_ref: np.ndarray
    #: how each direction's nearest corners were found, pred → ref and ref → pred: ``search`` or ``edt``
    #: (:mod:`medseg.metrics.nearest`; ``""`` for an empty surface). The values do not depend on it.
    methods: tuple[str, str] = ("", "")


def compute_surface_distances(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    box: tuple[slice, ...] | None = None,
    method: str = "auto",
) -> SurfaceDistances:
    """Distances between the surfaces of two boolean 3D masks (``surface-distance`` conventions).

    Args:
        pred, ref: boolean arrays of the same 3D shape.
        spacing: voxel size in mm along the three array axes.
        box: optional precomputed union bounding box of ``pred | ref`` (saves a pass over the volume).
        method: how nearest corners are found — ``auto`` (cheapest), ``search`` or ``edt``; the values are
            the same (see :mod:`medseg.metrics.nearest`), only the time differs.
    """
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and ref must be 3D arrays of the same shape, got {pred.shape} and {ref.shape}"
        )
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,):
        raise ValueError(f"spacing must have 3 values, got {spacing.tolist()}")
    if box is None:
        box = union_box(bounding_box(pred), bounding_box(ref))
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty.copy(), empty.copy())
    pp = np.pad(np.asarray(pred[box], dtype=bool), 1)
    pr = np.pad(np.asarray(ref[box], dtype=bool), 1)
    return _distances_padded(pp, pr, spacing, method)


def _distances_padded(
    pp: np.ndarray, pr: np.ndarray, spacing: np.ndarray, method: str = "auto"
) -> SurfaceDistances:
    """:func:`compute_surface_distances` on two zero-padded crops of the same shape."""
    table = surfel_area_table(spacing)
    if min(np.count_nonzero(pp), np.count_nonzero(pr)) < _THREAD_MIN_CORNERS:
        (border_p, q_p, area_p), (border_r, q_r, area_r) = _side(pp, table), _side(pr, table)
        d_pr, m_pr = _nearest(q_p, border_r, q_r.shape[1], spacing, method)
        d_rp, m_rp = _nearest(q_r, border_p, q_p.shape[1], spacing, method)
    else:  # two threads throughout: numpy and the compiled search release the GIL
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(_side, pr, table)
            border_p, q_p, area_p = _side(pp, table)
            border_r, q_r, area_r = future.result()
            # one direction after the other, each searching half of its queries in the pool's thread, so
            # that both cores stay busy until the end even when one direction costs more than the other
            d_pr, m_pr = _nearest(q_p, border_r, q_r.shape[1], spacing, method, pool)
            d_rp, m_rp = _nearest(q_r, border_p, q_p.shape[1], spacing, method, pool)
    return SurfaceDistances(d_pr, area_p, d_rp, area_r, (m_pr, m_rp))


# --------------------------------------------------------------------------------------------------------
# Metrics from distances (area-weighted)
# --------------------------------------------------------------------------------------------------------


def directed_percentile(dist: np.ndarray, area: np.ndarray, percentile: float) -> float:
    """Area-weighted nearest-rank percentile of directed distances (``compute_robust_hausdorff``).

    Surface elements are sorted by (distance, area); the result is the distance of the first element
    whose cumulative area fraction reaches ``percentile / 100`` (the last one if rounding never gets there).
    ``inf`` if there are no surface elements (empty mask).
    """
    if dist.size == 0:
        return math.inf
    order = np.lexsort((area, dist))
    cum = np.cumsum(area[order])
    cum /= np.sum(area[order])
    i = int(np.searchsorted(cum, percentile / 100.0))
    return float(dist[order][min(i, dist.size - 1)])


def directed_mean(dist: np.ndarray, area: np.ndarray) -> float:
    """Area-weighted mean of directed distances; ``inf`` for an empty surface."""
    if dist.size == 0:
        return math.inf
    return float(np.sum(dist * area) / np.sum(area))


def surface_overlap(dist: np.ndarray, area: np.ndarray, tolerance: float) -> tuple[float, float]:
    """(area within ``tolerance`` mm of the other surface, total area) of one surface."""
    return float(np.sum(area[dist <= tolerance])), float(np.sum(area))
