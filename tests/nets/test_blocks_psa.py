"""Tests for PSANet's point-wise spatial attention, exact and windowed (Zhao et al., ECCV 2018)."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from medseg.nets.blocks.psa import (
    PointwiseSpatialAttention3D,
    crop_offsets,
    overcomplete_radius,
    overcomplete_to_window,
    psa_attention_matrix,
    psa_collect_exact,
    psa_collect_window,
    psa_distribute_exact,
    psa_distribute_window,
    window_size,
)

GRID = (3, 4, 2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _positions(grid):
    return list(itertools.product(*(range(s) for s in grid)))


def _channel(delta, radius) -> int:
    """Channel of an offset in a map of per-axis ``radius`` (depth-major, centre = offset 0)."""
    (dd, dh, dw), (rd, rh, rw) = delta, radius
    return ((dd + rd) * (2 * rh + 1) + dh + rh) * (2 * rw + 1) + dw + rw


def _loop_reference(x, weights, radius, direction: str, normalize: bool):
    """Direct double loop over receivers i and sources j; ``radius`` bounds |j − i| per axis."""
    grid = x.shape[2:]
    out = torch.zeros_like(x)
    for i in _positions(grid):
        sources, logits = [], []
        for j in _positions(grid):
            delta = tuple(b - a for a, b in zip(i, j, strict=True))  # j − i
            if any(abs(d) > r for d, r in zip(delta, radius, strict=True)):
                continue
            if direction == "collect":  # weight at offset j − i of i's map
                logits.append(weights[(slice(None), _channel(delta, radius), *i)])
            else:  # weight at offset i − j of j's map
                logits.append(weights[(slice(None), _channel(tuple(-d for d in delta), radius), *j)])
            sources.append(j)
        a = torch.stack(logits, dim=1)  # (B, sources)
        if normalize:
            a = a.softmax(dim=1)
        for s, j in enumerate(sources):
            out[(slice(None), slice(None), *i)] += a[:, s : s + 1] * x[(slice(None), slice(None), *j)]
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_exact_collect_and_distribute_match_direct_loop(normalize: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, *GRID, dtype=torch.float64)
    radius = overcomplete_radius(GRID)
    w = torch.randn(2, window_size(radius), *GRID, dtype=torch.float64)
    for fn, direction in ((psa_collect_exact, "collect"), (psa_distribute_exact, "distribute")):
        expected = _loop_reference(x, w, radius, direction, normalize)
        assert torch.allclose(fn(x, w, normalize=normalize), expected, atol=1e-10), direction


def test_distribute_matrix_is_transpose_of_collect_matrix() -> None:
    torch.manual_seed(1)
    grid = (2, 3, 4)
    w = torch.randn(3, window_size(overcomplete_radius(grid)), *grid)
    collect, distribute = psa_attention_matrix(w, "collect"), psa_attention_matrix(w, "distribute")
    assert collect.shape == (3, 24, 24)
    assert torch.equal(distribute, collect.transpose(1, 2))
    # direct loop: A_c[i, j] = h_i[j − i]
    r = overcomplete_radius(grid)
    for a, i in enumerate(_positions(grid)):
        for b, j in enumerate(_positions(grid)):
            delta = tuple(jj - ii for ii, jj in zip(i, j, strict=True))
            assert collect[1, a, b] == w[(1, _channel(delta, r), *i)]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("radius", [(1, 1, 1), (0, 2, 1)])
def test_window_matches_direct_loop(radius, normalize: bool) -> None:
    torch.manual_seed(2)
    grid = (4, 3, 3)
    x = torch.randn(1, 2, *grid, dtype=torch.float64)
    w = torch.randn(1, window_size(radius), *grid, dtype=torch.float64)
    for fn, direction in ((psa_collect_window, "collect"), (psa_distribute_window, "distribute")):
        expected = _loop_reference(x, w, radius, direction, normalize)
        assert torch.allclose(fn(x, w, radius, normalize=normalize), expected, atol=1e-10), direction


def test_window_collect_and_distribute_are_adjoint() -> None:
    """With raw weights distribute is the transpose (adjoint) of collect: <C(x), y> = <x, D(y)>."""
    torch.manual_seed(3)
    grid, radius = (4, 3, 5), 1
    x, y = torch.randn(2, 1, *grid, dtype=torch.float64), torch.randn(2, 1, *grid, dtype=torch.float64)
    w = torch.randn(2, window_size(radius), *grid, dtype=torch.float64)
    lhs = (psa_collect_window(x, w, radius) * y).sum(dim=(1, 2, 3, 4))
    rhs = (x * psa_distribute_window(y, w, radius)).sum(dim=(1, 2, 3, 4))
    assert torch.allclose(lhs, rhs, atol=1e-10)


@pytest.mark.parametrize("grid,extra", [((3, 4, 2), 0), ((3, 4, 2), 2), ((5, 7, 3), 0)])
@pytest.mark.parametrize("normalize", [False, True])
def test_window_equals_exact_when_it_covers_the_grid(grid, extra: int, normalize: bool) -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 3, *grid, dtype=torch.float64)
    w = torch.randn(2, window_size(overcomplete_radius(grid)), *grid, dtype=torch.float64)
    r = max(grid) - 1 + extra  # some axes are zero-padded, none is cropped
    ww = overcomplete_to_window(w, r)
    assert ww.shape[1] == (2 * r + 1) ** 3
    for exact, window in (
        (psa_collect_exact, psa_collect_window),
        (psa_distribute_exact, psa_distribute_window),
    ):
        assert torch.allclose(window(x, ww, r, normalize), exact(x, w, normalize), atol=1e-10)


def test_cropped_window_equals_exact_with_weights_outside_window_zeroed() -> None:
    torch.manual_seed(5)
    grid = (4, 5, 3)
    big = overcomplete_radius(grid)
    x = torch.randn(1, 2, *grid, dtype=torch.float64)
    w = torch.randn(1, window_size(big), *grid, dtype=torch.float64)
    keep = torch.zeros(window_size(big), dtype=torch.bool)
    for delta in itertools.product(*(range(-r, r + 1) for r in big)):
        keep[_channel(delta, big)] = max(abs(d) for d in delta) <= 1
    w_zeroed = w * keep[None, :, None, None, None]
    ww = crop_offsets(w, big, 1)
    assert torch.allclose(psa_collect_window(x, ww, 1), psa_collect_exact(x, w_zeroed), atol=1e-10)
    assert torch.allclose(psa_distribute_window(x, ww, 1), psa_distribute_exact(x, w_zeroed), atol=1e-10)


def test_exact_and_window_modules_agree_when_window_covers_grid() -> None:
    torch.manual_seed(6)
    exact = PointwiseSpatialAttention3D(8, mode="exact", max_grid_size=4).eval()
    window = PointwiseSpatialAttention3D(8, mode="window", radius=3).eval()
    window.load_state_dict(exact.state_dict())  # same offset layout: (2·3+1)³ weights per position
    for grid in [(3, 4, 2), (4, 4, 4), (1, 3, 2)]:
        x = torch.randn(2, 8, *grid)
        assert torch.allclose(window(x), exact(x), atol=1e-5), grid


@pytest.mark.parametrize("mode", ["exact", "window"])
def test_module_shapes_on_odd_grids_and_gradients(mode: str) -> None:
    torch.manual_seed(7)
    psa = PointwiseSpatialAttention3D(8, mode=mode, radius=1).train()
    assert psa(torch.randn(1, 8, 1, 1, 4)).shape == (1, 8, 1, 1, 4)
    y = psa(torch.randn(2, 8, 5, 7, 3))
    assert y.shape == (2, 8, 5, 7, 3)
    (y * torch.randn_like(y)).sum().backward()
    for name, param in psa.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_window_mode_runs_on_grids_too_large_for_exact() -> None:
    torch.manual_seed(8)
    psa = PointwiseSpatialAttention3D(4, inner_channels=2, mode="window", radius=2).eval()
    with torch.no_grad():
        y = psa(torch.randn(1, 4, 20, 18, 16))
    assert y.shape == (1, 4, 20, 18, 16) and torch.isfinite(y).all()


def test_size_guard_names_memory_and_suggests_window() -> None:
    psa = PointwiseSpatialAttention3D(4, max_exact_bytes=2**20, max_grid_size=4)  # 4³ needs 0.3 MB
    psa(torch.randn(1, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="mode='window'") as info:
        psa(torch.randn(8, 4, 4, 4, 4))  # a batch of 8 needs 2.2 MB
    assert re.search(r"about \d+(\.\d+)? (MB|GB)", str(info.value))
    with pytest.raises(ValueError, match=r"about 16\.4 GB.*mode='window'"):
        PointwiseSpatialAttention3D(4, max_grid_size=24)  # 24³ over-complete maps: checked at build


def test_exact_mode_rejects_grid_larger_than_built_for() -> None:
    psa = PointwiseSpatialAttention3D(4, max_grid_size=(4, 4, 4))
    with pytest.raises(ValueError, match="max_grid_size"):
        psa(torch.randn(1, 4, 5, 3, 3))


def test_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        PointwiseSpatialAttention3D(4, mode="global")
