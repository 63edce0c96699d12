"""AttentionUNet3D / UNet3D: shapes, gradients, attention coefficients, the coarse-grid gate, contracts."""

from __future__ import annotations

import pytest
import torch

from medseg.nets.blocks.grid_attention import GridAttentionGate3D
from medseg.nets.unet import AttentionUNet3D, UNet3D, count_parameters

SMALL = (4, 8, 16, 32, 64)


@pytest.mark.parametrize("size", [(80, 96, 64), (33, 41, 27), (35, 17, 19)])
@pytest.mark.parametrize("cls", [AttentionUNet3D, UNet3D])
def test_output_shape_on_odd_sizes(cls, size):
    net = cls(1, 3, filters=SMALL).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, *size)).shape == (1, 3, *size)


def test_training_returns_deep_supervision_list_full_resolution_first():
    net = AttentionUNet3D(1, 3, filters=SMALL).train()
    out = net(torch.randn(2, 1, 32, 40, 24))
    shapes = [tuple(t.shape) for t in out["logits"]]
    assert shapes == [(2, 3, 32, 40, 24), (2, 3, 16, 20, 12), (2, 3, 8, 10, 6), (2, 3, 4, 5, 3)]
    assert out["aux"] == {}


def test_every_parameter_gets_a_gradient():
    for cls in (AttentionUNet3D, UNet3D):
        net = cls(1, 3, filters=SMALL).train()
        out = net(torch.randn(2, 1, 32, 32, 16))
        sum(o.square().mean() for o in out["logits"]).backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
        assert not missing, f"{cls.__name__}: no gradient for {missing}"


def test_attention_maps_in_unit_interval_at_skip_size():
    net = AttentionUNet3D(1, 2, filters=SMALL).eval()
    x = torch.randn(1, 1, 40, 36, 28)
    with torch.no_grad():
        logits, alphas = net(x, return_attention=True)
    assert logits.shape == (1, 2, 40, 36, 28)
    # gated skip levels 2, 3, 4 (1-based): 1/2, 1/4, 1/8 of the input
    assert [tuple(a.shape[2:]) for a in alphas] == [(20, 18, 14), (10, 9, 7), (5, 4, 3)]
    for a in alphas:
        assert a.shape[:2] == (1, 1)
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_full_resolution_skip_is_not_gated_and_unet_has_no_gates():
    att = AttentionUNet3D(1, 2, filters=SMALL)
    assert sorted(att.gates.keys()) == ["1", "2", "3"]
    assert len(UNet3D(1, 2, filters=SMALL).gates) == 0


def test_gate_theta_puts_coefficients_on_the_coarse_grid():
    gate = GridAttentionGate3D(8, 16)
    assert gate.theta.stride == (2, 2, 2) and gate.theta.kernel_size == (2, 2, 2) and gate.theta.bias is None
    x, g = torch.randn(1, 8, 12, 10, 6), torch.randn(1, 16, 6, 5, 3)
    coarse = gate.coefficients(x, g)
    assert coarse.shape == (1, 1, 6, 5, 3)
    y, alpha = gate(x, g)
    assert y.shape == x.shape and alpha.shape == (1, 1, 12, 10, 6)
    # α is the trilinear upsampling of the coarse coefficients: averaging it back recovers their range
    assert torch.allclose(alpha.mean(), coarse.mean(), atol=0.05)


def test_gate_suppresses_where_alpha_is_zero():
    gate = GridAttentionGate3D(4, 4).eval()
    torch.nn.init.zeros_(gate.psi.weight)
    torch.nn.init.constant_(gate.psi.bias, -50.0)  # sigmoid(-50) ≈ 0 → gated skip = W(0) = bias only
    x = torch.randn(1, 4, 8, 8, 8)
    y, alpha = gate(x, torch.randn(1, 4, 4, 4, 4))
    assert float(alpha.max()) < 1e-20
    y0, _ = gate(torch.zeros_like(x), torch.randn(1, 4, 4, 4, 4))
    assert torch.allclose(y, y0, atol=1e-5)


def test_default_parameter_counts_match_the_paper_scale():
    unet = count_parameters(UNet3D(1, 2, deep_supervision=False))
    att = count_parameters(AttentionUNet3D(1, 2))
    assert abs(unet - 5.88e6) / 5.88e6 < 0.01  # paper: 5.88 M
    assert 6.0e6 < att < 6.5e6  # paper: 6.40 M (its gates differ slightly, see README)


def test_eval_is_deterministic():
    net = AttentionUNet3D(1, 3, filters=SMALL).eval()
    x = torch.randn(1, 1, 32, 24, 16)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
