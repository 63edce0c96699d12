"""Tests for EncNet's encoding layer, Context Encoding Module and SE-loss targets (Zhang et al., CVPR 2018)."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.losses.targets import presence_targets
from medseg.nets.blocks.encnet import ContextEncoding3D, EncodingLayer3D


def _loop_reference(layer: EncodingLayer3D, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct loops over batch, voxels and codewords, in float64."""
    b, c = x.shape[:2]
    desc = x.double().reshape(b, c, -1)
    codes = layer.codewords.detach().double()
    scale = layer.scale.detach().double()  # scale_k = −s_k
    k = codes.shape[0]
    n = desc.shape[2]
    assign = torch.zeros(b, n, k, dtype=torch.float64)
    enc = torch.zeros(b, k, c, dtype=torch.float64)
    for bi in range(b):
        for i in range(n):
            xi = desc[bi, :, i]
            logits = [float(scale[kk]) * float(((xi - codes[kk]) ** 2).sum()) for kk in range(k)]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            for kk in range(k):
                a = exps[kk] / sum(exps)
                assign[bi, i, kk] = a
                enc[bi, kk] += a * (xi - codes[kk])
    return assign, enc


def test_encoding_matches_python_loop() -> None:
    torch.manual_seed(0)
    layer = EncodingLayer3D(3, num_codes=4)
    with torch.no_grad():  # spread the codewords so the assignments are far from uniform
        layer.codewords.mul_(20.0)
    x = torch.randn(2, 3, 2, 3, 1)
    ref_assign, ref_enc = _loop_reference(layer, x)
    assert torch.allclose(layer.assignments(x).double(), ref_assign, atol=1e-5)
    assert torch.allclose(layer(x).double(), ref_enc, atol=1e-5)
    assert layer(x).shape == (2, 4, 3)
    assert torch.allclose(layer.assignments(x).sum(-1), torch.ones(2, 6), atol=1e-6)


def test_encoding_initialisation_ranges() -> None:
    torch.manual_seed(1)
    layer = EncodingLayer3D(16, num_codes=8)
    bound = 1.0 / math.sqrt(8 * 16)
    assert layer.codewords.shape == (8, 16)
    assert layer.codewords.abs().max() <= bound
    assert layer.scale.shape == (8,)
    assert (layer.scale <= 0).all() and (layer.scale >= -1).all()


def test_encoding_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="expected"):
        EncodingLayer3D(4)(torch.randn(1, 5, 2, 2, 2))


def test_presence_targets_by_hand() -> None:
    labels = torch.zeros(2, 1, 2, 2, 1, dtype=torch.long)
    labels[0, 0, 0, 0, 0] = 2
    labels[0, 0, 1, 1, 0] = 3
    labels[1] = 1
    expected = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(presence_targets(labels, 4), expected)
    assert torch.equal(presence_targets(labels[:, 0], 4), expected)  # (B, D, H, W) form
    assert presence_targets(labels, 4).dtype == torch.float32


def test_presence_targets_ignores_out_of_range_labels() -> None:
    labels = torch.tensor([[[[0, 255], [1, -1]]]])  # (B, D, H, W) = (1, 1, 2, 2)
    assert torch.equal(presence_targets(labels, 3), torch.tensor([[1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError):
        presence_targets(torch.zeros(2, 3, dtype=torch.long), 3)


def test_context_encoding_shapes_and_eval_aux() -> None:
    torch.manual_seed(2)
    cem = ContextEncoding3D(8, num_classes=5, num_codes=4).train()
    x = torch.randn(1, 8, 3, 5, 2)  # batch size 1 must work in training
    y, aux = cem(x)
    assert y.shape == x.shape
    assert set(aux) == {"se_presence"} and aux["se_presence"].shape == (1, 5)
    cem.eval()
    y_eval, aux_eval = cem(torch.randn(2, 8, 5, 7, 3))
    assert aux_eval == {} and y_eval.shape == (2, 8, 5, 7, 3)


def test_context_encoding_matches_manual_recomputation() -> None:
    torch.manual_seed(3)
    cem = ContextEncoding3D(8, num_classes=3, num_codes=4).eval()
    x = torch.randn(2, 8, 5, 7, 3)
    codes = cem.encoding(cem.proj(x))
    bn = cem.code_norm  # eval: running statistics
    normed = (codes - bn.running_mean[None, :, None]) / torch.sqrt(bn.running_var[None, :, None] + bn.eps)
    normed = normed * bn.weight[None, :, None] + bn.bias[None, :, None]
    context = torch.relu(normed).mean(dim=1)
    gamma = torch.sigmoid(context @ cem.fc.weight.t() + cem.fc.bias)
    expected = torch.relu(x + x * gamma[:, :, None, None, None])
    y, _ = cem(x)
    assert torch.allclose(y, expected, atol=1e-5)
    cem.train()
    _, aux = cem(x)
    ctx = cem.encode(x)
    assert torch.allclose(aux["se_presence"], ctx @ cem.se_head.weight.t() + cem.se_head.bias, atol=1e-5)


def test_context_encoding_all_parameters_receive_gradients() -> None:
    torch.manual_seed(4)
    cem = ContextEncoding3D(8, num_classes=3, num_codes=4).train()
    x = torch.randn(2, 8, 5, 7, 3)
    y, aux = cem(x)
    target = presence_targets(torch.randint(0, 3, (2, 1, 5, 7, 3)), 3)
    loss = y.pow(2).mean() + torch.nn.functional.binary_cross_entropy_with_logits(aux["se_presence"], target)
    loss.backward()
    for name, param in cem.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
