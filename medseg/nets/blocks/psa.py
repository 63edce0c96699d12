"""Point-wise spatial attention (PSA) of PSANet, in 3D, with an exact and a bounded-window form.

Zhao H., Zhang Y., Liu S., Shi J., Loy C. C., Lin D., Jia J., "PSANet: Point-wise Spatial Attention
Network for Scene Parsing", ECCV 2018.

PSANet aggregates, for every position ``i``, the features of all positions ``j`` with weights that
depend on ``i``'s (or ``j``'s) own feature and on the relative position ``j − i`` (Eq. 1 of the paper,
simplified to ``F(x_i, x_j, Δ_ij) ≈ F_Δij(x_i)``), in two directions (bi-direction form, Sec. 3.2):

    z_i = Σ_j a^c_ij x_j  ⊕  Σ_j a^d_ij x_j
    collect:     a^c_ij = h^c_i[j − i]   (i gathers from j; weight read in i's own map)
    distribute:  a^d_ij = h^d_j[i − j]   (j gives to i;     weight read in j's map)

where ``h_i`` is an *over-complete* map predicted at ``i`` by a small conv net: in 3D it has
``(2D−1)(2H−1)(2W−1)`` entries, one per relative offset, with offset 0 at its centre, so that cropping
it around ``i`` covers the whole ``D×H×W`` grid. As matrices, ``A^d(h) = A^c(h)ᵀ``. Each branch reduces
the input with a 1×1×1 ConvNormAct, predicts ``h`` from the reduced features (1×1×1 ConvNormAct, then a
bias-free 1×1×1 conv), aggregates the reduced features; the two results are concatenated, projected back
to ``channels`` (1×1×1 ConvNormAct), concatenated with the input (as the paper's head does) and fused by a
final 1×1×1 ConvNormAct to ``channels``.

Normalisation: Eq. (1) of the paper divides by N; the authors' PyTorch code (``psa_softmax=True``)
instead applies a softmax over the *sources* of each receiving position (over ``j`` for fixed ``i``,
restricted to ``j`` inside the grid) — for collect that is a softmax over the valid part of ``h_i``; for
distribute it mixes entries of different positions' maps. We follow the code (each output is a convex
combination of features, whatever the grid size). The functional cores below take raw weights and
apply this softmax only when ``normalize=True``.

3D deviations from the paper, and why:

* Exact form (``mode="exact"``): the predictor's output width depends on the grid, so the block is
  built for a largest grid ``max_grid_size`` (default 8³, a typical bottleneck) and, on smaller grids,
  uses the central ``(2D−1)(2H−1)(2W−1)`` offsets of its predictor — the same thing the authors'
  ``PSAMask`` does when its mask is larger than ``2H−1``. It forms B·N×N matrices (N = D·H·W), so it
  is guarded: inputs whose estimate exceeds ``max_exact_bytes`` raise ``ValueError`` naming the memory.
* Window form (``mode="window"``): each position only attends within a ``(2r+1)³`` neighbourhood with
  ``(2r+1)³`` predicted weights per position, collect/distribute defined as above restricted to the
  window; memory is linear in N (loop over offsets, never an N×N matrix). This loses the paper's
  global context beyond ``r`` voxels but scales to large grids. When ``r ≥ max(D, H, W) − 1`` the window
  covers the grid and both forms coincide (see :func:`overcomplete_to_window`). Offsets that can never
  land inside the grid (radius above ``dim − 1`` on an axis) are skipped, which changes nothing.
  An exact block with ``max_grid_size=g`` and a window block with ``radius=g−1`` have the same
  parameters (state dicts are interchangeable) and give the same output on grids up to ``g³``.
* No ``shrink_factor`` down-sampling inside the branches (a U-Net bottleneck is already coarse).

Example:
    >>> psa = PointwiseSpatialAttention3D(32)                     # exact, grids up to 8×8×8
    >>> psa(torch.randn(1, 32, 5, 7, 3)).shape
    torch.Size([1, 32, 5, 7, 3])
    >>> PointwiseSpatialAttention3D(32, mode="window", radius=2)(torch.randn(1, 32, 24, 24, 24)).shape
    torch.Size([1, 32, 24, 24, 24])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nets.blocks.common import ConvNormAct

Radius = tuple[int, int, int]
MODES = ("exact", "window")


def as_radius(radius: int | Sequence[int]) -> Radius:
    """Per-axis radius ``(r_d, r_h, r_w)`` from an int or a 3-sequence."""
    r = (radius,) * 3 if isinstance(radius, int) else tuple(int(v) for v in radius)
    if len(r) != 3 or min(r) < 0:
        raise ValueError(f"radius must be a non-negative int or 3 ints, got {radius!r}")
    return r  # type: ignore[return-value]


def window_size(radius: int | Sequence[int]) -> int:
    """Number of offsets ``Π (2 r_a + 1)`` of a (per-axis) radius."""
    return math.prod(2 * r + 1 for r in as_radius(radius))


def overcomplete_radius(grid: Sequence[int]) -> Radius:
    """Radius of the over-complete map of a ``(D, H, W)`` grid: ``(D−1, H−1, W−1)``."""
    return as_radius(tuple(s - 1 for s in grid))


def offsets(radius: int | Sequence[int]) -> list[Radius]:
    """All offsets of a radius in the channel order used by every offset map (depth-major)."""
    rd, rh, rw = as_radius(radius)
    return list(itertools.product(range(-rd, rd + 1), range(-rh, rh + 1), range(-rw, rw + 1)))


def crop_offsets(
    t: torch.Tensor, radius_from: int | Sequence[int], radius_to: int | Sequence[int], axis: int = 1
) -> torch.Tensor:
    """Re-index an offset dimension from one radius to another, keeping offset 0 at the centre.

    ``t`` holds ``window_size(radius_from)`` offsets flattened along ``axis``; per spatial axis the result
    keeps the central offsets where ``radius_to`` is smaller and zero-pads where it is larger.
    """
    rf, rt = as_radius(radius_from), as_radius(radius_to)
    if rf == rt:
        return t
    head, tail = t.shape[:axis], t.shape[axis + 1 :]
    t = t.reshape(*head, *(2 * r + 1 for r in rf), *tail)
    src, dst = [slice(None)] * len(head), [slice(None)] * len(head)
    for a, b in zip(rf, rt, strict=True):
        c = min(a, b)
        src.append(slice(a - c, a + c + 1))
        dst.append(slice(b - c, b + c + 1))
    if all(b <= a for a, b in zip(rf, rt, strict=True)):
        out = t[tuple(src)]
    else:
        out = t.new_zeros(*head, *(2 * r + 1 for r in rt), *tail)
        out[tuple(dst)] = t[tuple(src)]
    return out.reshape(*head, -1, *tail)


def overcomplete_to_window(weights: torch.Tensor, radius: int | Sequence[int]) -> torch.Tensor:
    """Crop (or zero-pad) over-complete maps ``(B, (2D−1)(2H−1)(2W−1), D, H, W)`` to window maps.

    With ``radius ≥ (D−1, H−1, W−1)`` per axis, the window form applied to the result equals the exact
    form applied to ``weights`` (padded offsets always point outside the grid).
    """
    return crop_offsets(weights, overcomplete_radius(weights.shape[2:]), radius)


# ---------------------------------------------------------------------------------------- exact form
def _relative_index(grid: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(N, N)`` long tensor: entry ``[i, j]`` is the over-complete channel of offset ``j − i``."""
    _, h, w = grid
    rd, rh, rw = overcomplete_radius(grid)
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(s, device=device) for s in grid), indexing="ij")
    ).reshape(3, -1)
    rel = [coords[a][None, :] - coords[a][:, None] for a in range(3)]  # rel[a][i, j] = c_j − c_i
    return ((rel[0] + rd) * (2 * h - 1) + rel[1] + rh) * (2 * w - 1) + rel[2] + rw


def psa_attention_matrix(weights: torch.Tensor, mode: str = "collect") -> torch.Tensor:
    """Dense ``(B, N, N)`` matrix ``A[b, i, j]`` = weight with which receiver ``i`` takes source ``j``.

    ``collect``: ``A[i, j] = h_i[j − i]``; ``distribute``: ``A[i, j] = h_j[i − j]`` — the transpose of
    the collect matrix of the same maps. ``weights`` is ``(B, (2D−1)(2H−1)(2W−1), D, H, W)``.
    """
    b, m, *grid = weights.shape
    if m != window_size(overcomplete_radius(grid)):
        raise ValueError(f"expected {window_size(overcomplete_radius(grid))} over-complete channels, got {m}")
    n = math.prod(grid)
    index = _relative_index(grid, weights.device).T.expand(b, n, n)  # [b, j, i] = offset j − i
    gathered = weights.reshape(b, m, n).gather(1, index)  # [b, x, y] = h_y[x − y]
    if mode == "collect":
        return gathered.transpose(1, 2)  # [b, i, j] = h_i[j − i]
    if mode == "distribute":
        return gathered  # [b, i, j] = h_j[i − j]
    raise ValueError(f"mode must be 'collect' or 'distribute', got {mode!r}")


def _apply_matrix(x: torch.Tensor, matrix: torch.Tensor, normalize: bool) -> torch.Tensor:
    if normalize:
        matrix = torch.softmax(matrix, dim=-1)  # over the sources j of each receiver i
    return torch.bmm(x.flatten(2), matrix.transpose(1, 2)).view_as(x)


def psa_collect_exact(x: torch.Tensor, weights: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Collect: ``out_i = Σ_j h_i[j − i] x_j`` over the whole grid; O(B·N²) memory.

    Args:
        x: features ``(B, C, D, H, W)``.
        weights: over-complete maps ``(B, (2D−1)(2H−1)(2W−1), D, H, W)``.
        normalize: softmax the weights over the sources of each receiver first (authors' code).
    """
    return _apply_matrix(x, psa_attention_matrix(weights, "collect"), normalize)


def psa_distribute_exact(x: torch.Tensor, weights: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Distribute: ``out_i = Σ_j h_j[i − j] x_j`` over the whole grid; same arguments as collect."""
    return _apply_matrix(x, psa_attention_matrix(weights, "distribute"), normalize)


# --------------------------------------------------------------------------------------- window form
def _shifted(padded: torch.Tensor, radius: Radius, shift: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """View ``t[..., i + shift]`` (zero outside) of ``t`` given ``padded = pad(t, radius)``."""
    return padded[
        (..., *(slice(r + s, r + s + g) for r, s, g in zip(radius, shift, grid, strict=True)))  # type: ignore[misc]
    ]


def _pad(t: torch.Tensor, radius: Radius) -> torch.Tensor:
    rd, rh, rw = radius
    return F.pad(t, (rw, rw, rh, rh, rd, rd))


def window_valid_mask(
    grid: Sequence[int], radius: int | Sequence[int], sign: int, device=None
) -> torch.Tensor:
    """Bool ``(K, D, H, W)``: ``True`` where ``i + sign·δ_k`` lies inside the grid."""
    masks = []
    for g, r in zip(grid, as_radius(radius), strict=True):
        pos = torch.arange(g, device=device)[None, :] + sign * torch.arange(-r, r + 1, device=device)[:, None]
        masks.append((pos >= 0) & (pos < g))  # (2r+1, g)
    vd, vh, vw = masks
    valid = (
        vd[:, None, None, :, None, None] & vh[None, :, None, None, :, None] & vw[None, None, :, None, None, :]
    )
    return valid.reshape(-1, *grid)


def _masked_softmax(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.softmax(weights.masked_fill(~valid, float("-inf")), dim=1)


def _window_gather(x: torch.Tensor, weights: torch.Tensor, radius: Radius, sign: int) -> torch.Tensor:
    """``out_i = Σ_k weights[:, k, i] · x_{i + sign·δ_k}`` (zero outside); memory linear in N."""
    grid = x.shape[2:]
    if weights.shape[1] != window_size(radius) or weights.shape[2:] != grid:
        raise ValueError(
            f"window weights must be (B, {window_size(radius)}, {', '.join(map(str, grid))}) for radius "
            f"{radius}, got {tuple(weights.shape)}"
        )
    padded = _pad(x, radius)
    out = x.new_zeros(x.shape)
    # unbind (one autograd node) instead of K slices: slicing backward would zero-fill a full-size
    # gradient per offset
    for w_k, delta in zip(weights.unbind(1), offsets(radius), strict=True):
        shift = [sign * o for o in delta]
        out = torch.addcmul(out, w_k.unsqueeze(1), _shifted(padded, radius, shift, grid))
    return out


def window_transpose(weights: torch.Tensor, radius: int | Sequence[int]) -> torch.Tensor:
    """Receiver-indexed distribute weights: ``S[:, k, i] = w[:, k, i − δ_k]`` (0 if outside the grid)."""
    r = as_radius(radius)
    grid = weights.shape[2:]
    maps = _pad(weights, r).unbind(1)
    return torch.stack(
        [_shifted(m, r, [-o for o in delta], grid) for m, delta in zip(maps, offsets(r), strict=True)], dim=1
    )


def psa_collect_window(
    x: torch.Tensor, weights: torch.Tensor, radius: int | Sequence[int], normalize: bool = False
) -> torch.Tensor:
    """Windowed collect: ``out_i = Σ_{δ, i+δ in grid} w_i[δ] x_{i+δ}``.

    Args:
        x: features ``(B, C, D, H, W)``.
        weights: window maps ``(B, window_size(radius), D, H, W)``, offset 0 at the centre.
        radius: window radius (int or per axis).
        normalize: softmax over the valid offsets of each receiver first (authors' code).
    """
    r = as_radius(radius)
    if normalize:
        weights = _masked_softmax(weights, window_valid_mask(x.shape[2:], r, +1, x.device))
    return _window_gather(x, weights, r, +1)


def psa_distribute_window(
    x: torch.Tensor, weights: torch.Tensor, radius: int | Sequence[int], normalize: bool = False
) -> torch.Tensor:
    """Windowed distribute: ``out_i = Σ_{δ, i−δ in grid} w_{i−δ}[δ] x_{i−δ}``; arguments as collect."""
    r = as_radius(radius)
    received = window_transpose(weights, r)
    if normalize:
        received = _masked_softmax(received, window_valid_mask(x.shape[2:], r, -1, x.device))
    return _window_gather(x, received, r, -1)


# ------------------------------------------------------------------------------------------- module
def psa_exact_memory_bytes(batch: int, grid: Sequence[int], itemsize: int = 4) -> int:
    """Estimated peak bytes of the exact form: per branch the over-complete maps (B·M·N), the gathered
    and the softmaxed N×N matrices (2·B·N²), plus the int64 relative index (≈ 2·8·N²)."""
    n = math.prod(grid)
    m = window_size(overcomplete_radius(grid))
    return 2 * itemsize * batch * (m * n + 2 * n * n) + 16 * n * n


def format_bytes(num: float) -> str:
    """Human-readable size with binary units (1 MB = 2**20 bytes)."""
    return f"{num / 2**30:.1f} GB" if num >= 2**30 else f"{num / 2**20:.1f} MB"


class _PSABranch(nn.Module):
    """One PSA direction: reduce, then predict an offset map with radius up to ``extent``."""

    def __init__(self, channels: int, inner: int, extent: Radius, norm: str) -> None:
        super().__init__()
        self.extent = extent
        self.reduce = ConvNormAct(channels, inner, 1, norm=norm)
        self.adapt = ConvNormAct(inner, inner, 1, norm=norm)
        self.offset_map = nn.Conv3d(inner, window_size(extent), kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, radius: Radius) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced features ``(B, inner, D, H, W)`` and offset maps ``(B, window_size(radius), D, H, W)``."""
        feat = self.reduce(x)
        weight = crop_offsets(self.offset_map.weight, self.extent, radius, axis=0)
        return feat, F.conv3d(self.adapt(feat), weight)


class PointwiseSpatialAttention3D(nn.Module):
    """Bi-directional point-wise spatial attention (Zhao et al. 2018) for ``(B, C, D, H, W)`` tensors.

    Collect and distribute branches, fused with the input (see the module docstring).

    Args:
        channels: input/output channels.
        inner_channels: reduced width of each branch; default ``max(channels // 4, 1)`` (paper: 2048→512).
        mode: ``"exact"`` (over-complete maps, dense N×N, small grids only) or ``"window"``.
        radius: window radius ``r`` for ``mode="window"`` (``(2r+1)³`` weights per position).
        norm: normalisation name, see :func:`medseg.nets.blocks.common.get_norm`.
        max_exact_bytes: the exact form raises ``ValueError`` when its memory estimate
            (:func:`psa_exact_memory_bytes`) for the input exceeds this.
        max_grid_size: exact mode only — the largest ``(D, H, W)`` (int or 3 ints) the predictor's
            over-complete map is built for; smaller grids use its central offsets.

    Returns ``(B, channels, D, H, W)``. See the module docstring for the equations and deviations.
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        mode: str = "exact",
        radius: int = 2,
        norm: str = "instance",
        max_exact_bytes: int = 512 * 2**20,
        max_grid_size: int | Sequence[int] = 8,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.radius = radius
        self.max_exact_bytes = max_exact_bytes
        self.max_grid_size = as_radius(max_grid_size)
        if mode == "exact":
            if min(self.max_grid_size) < 1:
                raise ValueError(f"max_grid_size must be >= 1, got {max_grid_size!r}")
            self._check_exact_memory(1, self.max_grid_size, 4)
            extent = overcomplete_radius(self.max_grid_size)
        else:
            extent = as_radius(radius)
        inner = inner_channels if inner_channels is not None else max(channels // 4, 1)
        self.collect = _PSABranch(channels, inner, extent, norm)
        self.distribute = _PSABranch(channels, inner, extent, norm)
        self.project = ConvNormAct(2 * inner, channels, 1, norm=norm)
        self.fuse = ConvNormAct(2 * channels, channels, 1, norm=norm)

    def _check_exact_memory(self, batch: int, grid: Sequence[int], itemsize: int) -> None:
        need = psa_exact_memory_bytes(batch, grid, itemsize)
        if need > self.max_exact_bytes:
            n = math.prod(grid)
            raise ValueError(
                f"PointwiseSpatialAttention3D(mode='exact') on a batch of {batch} × {'×'.join(map(str, grid))} "
                f"grid (N = {n} positions, {window_size(overcomplete_radius(grid))} over-complete weights per "
                f"position) would need about {format_bytes(need)}, more than max_exact_bytes = "
                f"{format_bytes(self.max_exact_bytes)}; use mode='window' (memory linear in N) or a "
                f"coarser grid."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``fuse(cat(x, project(cat(collect(x), distribute(x)))))``, same shape as ``x``."""
        grid = tuple(x.shape[2:])
        if self.mode == "exact":
            self._check_exact_memory(x.shape[0], grid, x.element_size())
            if any(g > m for g, m in zip(grid, self.max_grid_size, strict=True)):
                raise ValueError(
                    f"PointwiseSpatialAttention3D(mode='exact') was built for grids up to "
                    f"{'×'.join(map(str, self.max_grid_size))} (max_grid_size) but got "
                    f"{'×'.join(map(str, grid))}; use a larger max_grid_size or mode='window'."
                )
            radius = overcomplete_radius(grid)
        else:
            radius = as_radius(
                tuple(min(r, g - 1) for r, g in zip(as_radius(self.radius), grid, strict=True))
            )
        feat_c, w_c = self.collect(x, radius)
        feat_d, w_d = self.distribute(x, radius)
        if self.mode == "exact":
            y_c = psa_collect_exact(feat_c, w_c, normalize=True)
            y_d = psa_distribute_exact(feat_d, w_d, normalize=True)
        else:
            y_c = psa_collect_window(feat_c, w_c, radius, normalize=True)
            y_d = psa_distribute_window(feat_d, w_d, radius, normalize=True)
        out = self.project(torch.cat([y_c, y_d], dim=1))
        return self.fuse(torch.cat([x, out], dim=1))


__all__ = [
    "PointwiseSpatialAttention3D",
    "as_radius",
    "crop_offsets",
    "format_bytes",
    "offsets",
    "overcomplete_radius",
    "overcomplete_to_window",
    "psa_attention_matrix",
    "psa_collect_exact",
    "psa_collect_window",
    "psa_distribute_exact",
    "psa_distribute_window",
    "psa_exact_memory_bytes",
    "window_size",
    "window_transpose",
]
