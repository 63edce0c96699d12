"""Tests for the Expectation-Maximization Attention unit (Li et al., ICCV 2019)."""

from __future__ import annotations

import pytest
import torch

from medseg.nets.blocks.ema import EMAUnit3D

pytestmark = pytest.mark.usefixtures("one_thread")


def _column_norms(mu: torch.Tensor) -> torch.Tensor:
    return mu.norm(dim=1)


def _reference_forward(unit: EMAUnit3D, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The EMA unit written out with einsum, position by position semantics (returns output, bases)."""
    feat = (
        torch.einsum("oc,bcn->bon", unit.conv_in.weight.flatten(1), x.flatten(2)) + unit.conv_in.bias[:, None]
    )
    mu = unit.mu.expand(x.shape[0], -1, -1)
    for _ in range(unit.iterations):
        z = torch.einsum("bcn,bck->bnk", feat, mu).softmax(dim=2)  # E-step
        z = z / (1e-6 + z.sum(dim=1, keepdim=True))
        mu = torch.einsum("bcn,bnk->bck", feat, z)  # M-step
        mu = mu / (1e-6 + mu.norm(dim=1, keepdim=True))
    z = torch.einsum("bcn,bck->bnk", feat, mu).softmax(dim=2)
    recon = torch.relu(torch.einsum("bck,bnk->bcn", mu, z)).view_as(x)
    return torch.relu(x + unit.conv_out(recon)), mu


def test_bases_buffer_shape_and_unit_norm_at_init() -> None:
    torch.manual_seed(0)
    unit = EMAUnit3D(12, num_bases=10)
    assert unit.mu.shape == (1, 12, 10)
    assert "mu" in dict(unit.named_buffers()) and "mu" not in dict(unit.named_parameters())
    assert torch.allclose(_column_norms(unit.mu), torch.ones(1, 10), atol=1e-5)


def test_forward_matches_reference_and_keeps_shape() -> None:
    torch.manual_seed(1)
    unit = EMAUnit3D(8, num_bases=6, iterations=3).eval()
    x = torch.randn(2, 8, 5, 7, 3)
    expected, _ = _reference_forward(unit, x)
    y = unit(x)
    assert y.shape == x.shape
    assert torch.allclose(y, expected, atol=1e-5)


def test_bases_update_only_in_training_by_moving_average() -> None:
    torch.manual_seed(2)
    unit = EMAUnit3D(8, num_bases=6, momentum=0.9)
    x = torch.randn(3, 8, 5, 7, 3)
    mu0 = unit.mu.clone()
    unit.eval()(x)
    assert torch.equal(unit.mu, mu0)  # eval: no update
    unit.train()
    _, batch_mu = _reference_forward(unit, x)
    unit(x)
    expected = 0.9 * mu0 + 0.1 * batch_mu.mean(dim=0, keepdim=True)
    expected = expected / (1e-6 + expected.norm(dim=1, keepdim=True))
    assert not torch.equal(unit.mu, mu0)
    assert torch.allclose(unit.mu, expected, atol=1e-5)


def test_bases_stay_unit_norm_after_many_updates() -> None:
    torch.manual_seed(3)
    unit = EMAUnit3D(6, num_bases=4, momentum=0.5)
    for step in range(5):
        unit.train(step % 2 == 0)(torch.randn(2, 6, 3, 4, 5) * (step + 1))
        assert torch.allclose(_column_norms(unit.mu), torch.ones(1, 4), atol=1e-5)


def test_gradients_reach_every_parameter_including_input_projection() -> None:
    torch.manual_seed(4)
    unit = EMAUnit3D(8, num_bases=5).train()
    y = unit(torch.randn(2, 8, 5, 7, 3))
    (y * torch.randn_like(y)).sum().backward()
    for name, param in unit.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert unit.mu.grad is None


def test_memory_is_linear_no_n_by_n_tensor() -> None:
    """No tensor of N² elements is ever saved for backward (largest is B·N·K or B·C·N)."""
    torch.manual_seed(5)
    unit = EMAUnit3D(4, num_bases=3).train()
    x = torch.randn(1, 4, 9, 8, 7)
    n = 9 * 8 * 7
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unit(x).sum().backward()
    assert max(sizes) < n * n // 10


@pytest.mark.parametrize("kwargs", [{"iterations": 0}, {"momentum": 1.5}])
def test_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EMAUnit3D(4, **kwargs)
