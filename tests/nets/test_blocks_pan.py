"""Tests for PAN's Feature Pyramid Attention and Global Attention Upsample (Li et al., BMVC 2018)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg.nets.blocks.pan import FeaturePyramidAttention3D, GlobalAttentionUpsample3D


def _assert_all_grads(module: nn.Module) -> None:
    for name, param in module.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [(5, 7, 3), (3, 5, 2), (1, 1, 4), (2, 2, 2), (9, 6, 1)])
def test_fpa_shape_on_odd_and_tiny_grids(size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    fpa = FeaturePyramidAttention3D(8).train()
    y = fpa(torch.randn(1, 8, *size))
    assert y.shape == (1, 8, *size)
    assert torch.isfinite(y).all()


def test_fpa_pyramid_never_collapses_to_one_voxel() -> None:
    fpa = FeaturePyramidAttention3D(8)
    y = torch.randn(1, 8, 3, 5, 2)
    sizes = []
    for down in fpa.downs:
        y = down(y)
        sizes.append(tuple(y.shape[2:]))
    # stride 2 only along dims > 2: ceil(n/2) there, unchanged elsewhere
    assert sizes == [(2, 3, 2), (2, 2, 2), (2, 2, 2)]
    y = torch.randn(1, 8, 16, 9, 1)
    for down in fpa.downs:
        y = down(y)
    assert tuple(y.shape[2:]) == (2, 2, 1)  # 16→8→4→2, 9→5→3→2, 1 stays 1


@pytest.mark.parametrize("norm,kernels", [("batch", (7, 5, 3)), ("group", (3,)), ("instance", (5, 3))])
def test_fpa_norms_and_kernels(norm: str, kernels: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    fpa = FeaturePyramidAttention3D(8, norm=norm, kernels=kernels).train()
    assert len(fpa.downs) == len(kernels)
    assert fpa(torch.randn(2, 8, 5, 7, 3)).shape == (2, 8, 5, 7, 3)


def test_fpa_rejects_even_kernels() -> None:
    with pytest.raises(ValueError, match="odd"):
        FeaturePyramidAttention3D(8, kernels=(4, 3))


def test_fpa_combination_matches_manual_recomputation() -> None:
    torch.manual_seed(3)
    fpa = FeaturePyramidAttention3D(8).eval()
    x = torch.randn(2, 8, 5, 7, 3)
    # global branch by hand: W · mean_voxels(x) + b, broadcast over the grid
    w = fpa.global_conv.weight.view(8, 8)
    glob = torch.einsum("oc,bc->bo", w, x.mean(dim=(2, 3, 4))) + fpa.global_conv.bias
    expected = fpa.main(x) * fpa.pyramid(x) + glob[:, :, None, None, None]
    assert torch.allclose(fpa(x), expected, atol=1e-5)


def test_fpa_all_parameters_receive_gradients() -> None:
    torch.manual_seed(4)
    fpa = FeaturePyramidAttention3D(8).train()
    fpa(torch.randn(2, 8, 5, 7, 3)).pow(2).mean().backward()
    _assert_all_grads(fpa)


@pytest.mark.parametrize("high_size,low_size", [((3, 4, 2), (5, 7, 3)), ((1, 1, 2), (2, 2, 3))])
def test_gau_shape(high_size: tuple[int, ...], low_size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    gau = GlobalAttentionUpsample3D(12, 6, 4).train()
    y = gau(torch.randn(1, 12, *high_size), torch.randn(1, 6, *low_size))
    assert y.shape == (1, 4, *low_size)


def test_gau_matches_manual_recomputation() -> None:
    torch.manual_seed(5)
    gau = GlobalAttentionUpsample3D(12, 6, 4).eval()
    high, low = torch.randn(2, 12, 3, 4, 2), torch.randn(2, 6, 5, 7, 3)
    # channel weights by hand: ReLU(W · GAP(high) + b)
    pooled = high.mean(dim=(2, 3, 4))
    weights = torch.relu(pooled @ gau.global_conv.weight.view(4, 12).t() + gau.global_conv.bias)
    high_up = F.interpolate(gau.high_proj(high), size=(5, 7, 3), mode="trilinear", align_corners=False)
    expected = torch.relu(gau.low_conv(low) * weights[:, :, None, None, None] + high_up)
    assert torch.allclose(gau.channel_weights(high).flatten(1), weights, atol=1e-6)
    assert torch.allclose(gau(high, low), expected, atol=1e-5)


def test_gau_channel_weighting_with_fixed_weights() -> None:
    torch.manual_seed(6)
    gau = GlobalAttentionUpsample3D(12, 6, 4).eval()
    with torch.no_grad():
        gau.global_conv.weight.zero_()
        gau.global_conv.bias.copy_(torch.tensor([0.0, 1.0, 2.0, -3.0]))  # weights → 0, 1, 2, 0
    high, low = torch.randn(1, 12, 3, 4, 2), torch.randn(1, 6, 5, 7, 3)
    y = gau(high, low)
    low_c = gau.low_conv(low)
    high_up = F.interpolate(gau.high_proj(high), size=(5, 7, 3), mode="trilinear", align_corners=False)
    for c, w in enumerate([0.0, 1.0, 2.0, 0.0]):
        assert torch.allclose(y[:, c], torch.relu(w * low_c[:, c] + high_up[:, c]), atol=1e-5)
    # a zero weight drops the low-level feature entirely
    assert torch.allclose(y[:, 0], torch.relu(high_up[:, 0]), atol=1e-6)


def test_gau_all_parameters_receive_gradients() -> None:
    torch.manual_seed(7)
    gau = GlobalAttentionUpsample3D(12, 6, 4).train()
    with torch.no_grad():
        gau.global_conv.bias.fill_(0.5)  # keep every channel weight in ReLU's active range
    gau(torch.randn(2, 12, 3, 4, 2), torch.randn(2, 6, 5, 7, 3)).pow(2).mean().backward()
    _assert_all_grads(gau)
