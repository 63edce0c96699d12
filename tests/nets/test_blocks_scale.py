"""Tests for attention-to-scale fusion (Chen et al., CVPR 2016)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg.nets.blocks.scale_attention import ScaleAttention3D, scaled_size

SCALES = (1.0, 0.75, 0.5)


class TinyBackbone(nn.Module):
    """3×3×3 conv + ReLU → features, 1×1×1 conv → logits."""

    def __init__(self, in_channels: int = 1, feature_channels: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Conv3d(in_channels, feature_channels, 3, padding=1)
        self.head = nn.Conv3d(feature_channels, num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.relu(self.features(x))
        return self.head(feats), feats


def _manual_scale_logits(backbone: TinyBackbone, x: torch.Tensor) -> list[torch.Tensor]:
    size = tuple(x.shape[2:])
    out = []
    for s in SCALES:
        small = tuple(max(1, int(n * s + 0.5)) for n in size)
        xs = x if small == size else F.interpolate(x, size=small, mode="trilinear", align_corners=False)
        logits, _ = backbone.forward_features(xs)
        if logits.shape[2:] != x.shape[2:]:
            logits = F.interpolate(logits, size=size, mode="trilinear", align_corners=False)
        out.append(logits)
    return out


def test_scaled_size_rounds_and_clamps() -> None:
    assert scaled_size((5, 7, 3), 0.5) == (3, 4, 2)
    assert scaled_size((5, 7, 1), 0.25) == (1, 2, 1)


def test_attention_weights_sum_to_one() -> None:
    torch.manual_seed(0)
    net = ScaleAttention3D(TinyBackbone(), 4, 3, scales=SCALES).eval()
    x = torch.randn(2, 1, 5, 7, 3)
    fused, weights = net.forward_with_weights(x)
    assert fused.shape == (2, 3, 5, 7, 3)
    assert weights.shape == (2, 3, 5, 7, 3)  # (B, S, D, H, W)
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(2, 5, 7, 3), atol=1e-6)
    # fused = Σ_s w_s · logits_s, with logits from an independent multi-scale run
    logits = _manual_scale_logits(net.backbone, x)
    manual = sum(weights[:, s : s + 1] * logits[s] for s in range(len(SCALES)))
    assert torch.allclose(fused, manual, atol=1e-5)
    assert torch.allclose(net(x), fused)  # eval forward returns the fused tensor only


@pytest.mark.parametrize("fusion", ["average", "max"])
def test_average_and_max_special_cases(fusion: str) -> None:
    torch.manual_seed(1)
    backbone = TinyBackbone()
    net = ScaleAttention3D(backbone, 4, 3, scales=SCALES, fusion=fusion).eval()
    assert net.attention is None
    assert {id(p) for p in net.parameters()} == {id(p) for p in backbone.parameters()}
    x = torch.randn(1, 1, 5, 7, 3)
    logits = _manual_scale_logits(backbone, x)
    if fusion == "average":
        manual = (logits[0] + logits[1] + logits[2]) / 3
    else:
        manual = torch.maximum(torch.maximum(logits[0], logits[1]), logits[2])
    assert torch.allclose(net(x), manual, atol=1e-5)
    _, weights = net.forward_with_weights(x)
    if fusion == "average":
        assert torch.allclose(weights, torch.full((1, 3, 5, 7, 3), 1 / 3))
    else:
        assert weights is None


def test_training_returns_aux_per_scale() -> None:
    torch.manual_seed(2)
    net = ScaleAttention3D(TinyBackbone(), 4, 3, scales=SCALES).train()
    x = torch.randn(2, 1, 5, 7, 3)
    fused, aux = net(x)
    assert fused.shape == (2, 3, 5, 7, 3)
    assert list(aux) == ["scale0", "scale1", "scale2"]
    manual = _manual_scale_logits(net.backbone, x)
    for i in range(3):
        assert aux[f"scale{i}"].shape == (2, 3, 5, 7, 3)
        assert torch.allclose(aux[f"scale{i}"], manual[i], atol=1e-5)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="attention, average, max"):
        ScaleAttention3D(TinyBackbone(), 4, 3, fusion="sum")
    with pytest.raises(ValueError, match="positive"):
        ScaleAttention3D(TinyBackbone(), 4, 3, scales=(1.0, 0.0))
    with pytest.raises(TypeError, match="forward_features"):
        ScaleAttention3D(nn.Conv3d(1, 3, 1), 4, 3)


def test_all_parameters_receive_gradients() -> None:
    torch.manual_seed(3)
    net = ScaleAttention3D(TinyBackbone(), 4, 3, scales=SCALES).train()
    fused, aux = net(torch.randn(2, 1, 5, 7, 3))
    (fused.pow(2).mean() + sum(a.pow(2).mean() for a in aux.values())).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
