"""Per-level, per-axis pooling of the (Attention) U-Net: anisotropic kernels reach every decoder path, the
gates and the attention maps; the default is the 2×2×2 network every checkpoint was trained with."""

from __future__ import annotations

import pytest
import torch

from medseg.inference.attention import attention_on_grid
from medseg.nets.unet import AttentionUNet3D, UNet3D

SMALL = (4, 8, 16, 32, 64)
#: Thick slices: the slice axis (2) is kept by the first two poolings, pooled by the last two.
ANISO = [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]


@pytest.mark.parametrize("cls", [AttentionUNet3D, UNet3D])
def test_default_kernels_are_the_2x2x2_network(cls):
    """No kernels and explicit 2×2×2 kernels build the same weights and compute the same output."""
    torch.manual_seed(0)
    default = cls(1, 3, filters=SMALL).eval()
    explicit = cls(1, 3, filters=SMALL, pool_kernels=[[2, 2, 2]] * 4).eval()
    explicit.load_state_dict(default.state_dict())  # strict: same names, same shapes
    x = torch.randn(1, 1, 32, 24, 16)
    with torch.no_grad():
        assert torch.equal(default(x), explicit(x))


@pytest.mark.parametrize("cls", [AttentionUNet3D, UNet3D])
def test_anisotropic_kernels_shape_every_output(cls):
    net = cls(1, 3, filters=SMALL, pool_kernels=ANISO).train()
    out = net(torch.randn(2, 1, 64, 48, 12))
    shapes = [tuple(t.shape[2:]) for t in out["logits"]]
    # levels 1-3 of the decoder: factors (2,2,1), (4,4,1), (8,8,2) of the input
    assert shapes == [(64, 48, 12), (32, 24, 12), (16, 12, 12), (8, 6, 6)]
    assert net.level_factors() == [(1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 8, 2), (16, 16, 4)]
    sum(o.square().mean() for o in out["logits"]).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing
    net.eval()
    with torch.no_grad():  # odd sizes still come back whole
        assert net(torch.randn(1, 1, 37, 29, 11)).shape == (1, 3, 37, 29, 11)


def test_gate_theta_follows_the_pooling_below_its_level():
    net = AttentionUNet3D(1, 2, filters=SMALL, pool_kernels=ANISO)
    kernels = {lvl: tuple(gate.theta.kernel_size) for lvl, gate in net.gates.items()}
    assert kernels == {"1": (2, 2, 1), "2": (2, 2, 2), "3": (2, 2, 2)}
    assert all(tuple(g.theta.stride) == tuple(g.theta.kernel_size) for g in net.gates.values())
    x = torch.randn(1, 1, 48, 40, 12)
    with torch.no_grad():
        _, alphas = net.eval()(x, return_attention=True)
    assert [tuple(a.shape[2:]) for a in alphas] == [(24, 20, 12), (12, 10, 12), (6, 5, 6)]


def test_attention_maps_upsample_with_per_axis_factors():
    """α of every gated level comes back on the input grid also when the slice axis was pooled less."""
    net = AttentionUNet3D(1, 2, filters=SMALL, pool_kernels=ANISO).eval()
    image = torch.randn(1, 48, 40, 12)
    maps = attention_on_grid(net, image, roi_size=(48, 40, 12), overlap=0.0)
    assert maps.shape == (3, 48, 40, 12)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


@pytest.mark.parametrize("kernels", [[[2, 2, 2]] * 3, [[2, 2, 3]] * 4, [[2, 2]] * 4], ids=str)
def test_wrong_kernels_are_refused(kernels):
    with pytest.raises(ValueError, match="pool_kernels"):
        UNet3D(1, 2, filters=SMALL, pool_kernels=kernels)
