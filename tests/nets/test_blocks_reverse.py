"""Tests for the reverse-attention head (Huang et al., BMVC 2017)."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.nets.blocks.reverse_attention import ReverseAttentionHead3D, reverse_attention_fuse


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_fuse_by_hand() -> None:
    p_org = torch.tensor([0.0, 2.0, -1.0, 3.0])
    f_rev = torch.tensor([1.0, -1.0, 3.0, 0.0])
    # P = P_org − sigmoid(−P_org)·F_rev, element by element
    expected = torch.tensor(
        [
            0.0 - 0.5 * 1.0,  # sigmoid(0) = 0.5
            2.0 - _sigmoid(-2.0) * -1.0,  # 2.119202922
            -1.0 - _sigmoid(1.0) * 3.0,  # −3.193175737
            3.0,  # F_rev = 0 leaves P_org
        ]
    )
    assert torch.allclose(reverse_attention_fuse(p_org, f_rev), expected, atol=1e-6)
    assert reverse_attention_fuse(p_org, f_rev)[1].item() == pytest.approx(2.119202922, abs=1e-6)


def test_confident_original_is_untouched() -> None:
    # a very confident original logit gets attention ≈ 0, so the reverse branch barely changes it
    out = reverse_attention_fuse(torch.tensor([20.0]), torch.tensor([5.0]))
    assert out.item() == pytest.approx(20.0, abs=1e-6)


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_head_shapes_and_aux(norm: str) -> None:
    torch.manual_seed(0)
    head = ReverseAttentionHead3D(6, num_classes=3, norm=norm).train()
    x = torch.randn(2, 6, 5, 7, 3)
    p, aux = head(x)
    assert p.shape == (2, 3, 5, 7, 3)
    assert set(aux) == {"ra_org", "ra_neg"}
    assert aux["ra_org"].shape == aux["ra_neg"].shape == p.shape
    # the fused output is the documented arithmetic of the two supervised branches
    assert torch.allclose(p, aux["ra_org"] + torch.sigmoid(-aux["ra_org"]) * aux["ra_neg"], atol=1e-6)

    head.eval()
    p_eval, aux_eval = head(x)
    assert aux_eval == {}
    assert p_eval.shape == p.shape


def test_branches_match_aux() -> None:
    torch.manual_seed(1)
    head = ReverseAttentionHead3D(4, num_classes=2).train()
    x = torch.randn(1, 4, 3, 3, 3)
    p_org, f_rev = head.branches(x)
    _, aux = head(x)
    assert torch.allclose(aux["ra_org"], p_org)
    assert torch.allclose(aux["ra_neg"], -f_rev)


def test_all_parameters_receive_gradients() -> None:
    torch.manual_seed(2)
    head = ReverseAttentionHead3D(4, num_classes=3).train()
    p, aux = head(torch.randn(2, 4, 5, 7, 3))
    (p.pow(2).mean() + sum(a.pow(2).mean() for a in aux.values())).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
