"""Attention to scale: fuse a shared backbone's predictions at several input scales (3D).

Chen L.-C., Yang Y., Wang J., Xu W., Yuille A. L., "Attention to Scale: Scale-aware Semantic Image
Segmentation", CVPR 2016, arXiv:1511.03339.

The same network (shared weights) segments the input resized by each factor ``s`` of ``scales``.
Every scale's logits ``f^s`` and penultimate features are resized back to the full input grid, and
a small attention model predicts, per voxel, how much to trust each scale:

    h      = conv₁ₓ₁ₓ₁( ReLU( conv₃ₓ₃ₓ₃( concat_s features^s ) ) )    S channels, one per scale
    w^s    = exp(h^s) / Σ_t exp(h^t)                               softmax over scales      (Eq. 2)
    g_c    = Σ_s w^s ⊙ f^s_c                                       fused logits, every class (Eq. 1)

so the weights are shared by all classes of a voxel and sum to 1 over scales. The paper's attention
model is a 3×3 conv (512 filters) + ReLU + 1×1 conv on fc7 features of all scales; here the hidden
width is ``hidden_channels`` (default 32) because 3D maps are large.

Extra supervision (Sec. 3.3 of the paper): besides the fused output, every scale's own
(full-size) logits are supervised with the label map, returned in ``aux`` as ``"scale0"``,
``"scale1"``, … in the order of ``scales``.

``fusion="average"`` and ``fusion="max"`` replace the attention model by average- or max-pooling of
the logits over scales (the paper's baselines); they create no attention parameters.

Backbone contract: ``backbone.forward_features(x) -> (logits, features)`` with logits
``(B, num_classes, *x.shape[2:])`` and features ``(B, feature_channels, *x.shape[2:])``. The rescaled
input size per dimension is ``max(1, round(n·s))``; a backbone that needs sizes divisible by 2^k must
pad internally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medseg.nets.blocks.common import resize_to
from medseg.nets.registry import SCALE_FUSIONS as FUSIONS


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, ...]:
    """Spatial size of the input rescaled by ``scale``: ``max(1, round(n·scale))`` per dimension."""
    return tuple(max(1, math.floor(n * scale + 0.5)) for n in size)


class ScaleAttention3D(nn.Module):
    """Multi-scale inference with a shared backbone and learned per-voxel scale weights (Chen et al. 2016).

    Args:
        backbone: network with ``forward_features(x) -> (logits, features)`` (see module notes).
        feature_channels: channels of the backbone's penultimate features.
        num_classes: logit channels of the backbone.
        scales: input scale factors (> 0); index ``i`` gives the aux key ``f"scale{i}"``.
        fusion: ``"attention"`` (learned weights), ``"average"`` or ``"max"`` over scales.
        hidden_channels: width of the attention model's 3×3×3 conv.

    ``forward(x)``: in training ``(fused, aux)`` with ``aux = {"scale0": logits₀, "scale1": …}``; in
    eval mode only the fused logits tensor (so sliding-window inference can call it directly). All
    logits are ``(B, num_classes, *x.shape[2:])``. ``forward_with_weights(x)`` returns
    ``(fused, weights)`` with weights ``(B, S, *x.shape[2:])`` (``None`` for ``fusion="max"``, whose
    choice differs per class).

    Example:
        >>> net = ScaleAttention3D(my_backbone, feature_channels=16, num_classes=3)  # doctest: +SKIP
        >>> fused, weights = net.forward_with_weights(torch.randn(1, 1, 24, 24, 12))  # doctest: +SKIP
        >>> weights.sum(dim=1)  # all ones                                              # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int,
        num_classes: int,
        scales: tuple[float, ...] = (1.0, 0.75, 0.5),
        fusion: str = "attention",
        hidden_channels: int = 32,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; valid names: {', '.join(FUSIONS)}")
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"scales must be a non-empty tuple of positive factors, got {scales!r}")
        if not callable(getattr(backbone, "forward_features", None)):
            raise TypeError("backbone must provide forward_features(x) -> (logits, features)")
        self.backbone = backbone
        self.feature_channels = feature_channels
        self.num_classes = num_classes
        self.scales = tuple(float(s) for s in scales)
        self.fusion = fusion
        self.attention: nn.Sequential | None = None
        if fusion == "attention":
            n = len(self.scales)
            self.attention = nn.Sequential(
                nn.Conv3d(n * feature_channels, hidden_channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv3d(hidden_channels, n, kernel_size=1),
            )

    def scale_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the backbone at every scale; return per-scale logits and features, all at full size."""
        size = x.shape[2:]
        logits, features = [], []
        for s in self.scales:
            xs = resize_to(x, scaled_size(size, s))
            lg, ft = self.backbone.forward_features(xs)
            logits.append(resize_to(lg, size))
            features.append(resize_to(ft, size))
        return logits, features

    def _fuse(
        self, logits: list[torch.Tensor], features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        stacked = torch.stack(logits, dim=1)  # (B, S, C, D, H, W)
        if self.fusion == "max":
            return stacked.amax(dim=1), None
        if self.fusion == "average":
            weights = stacked.new_full((stacked.shape[0], len(logits), *stacked.shape[3:]), 1.0 / len(logits))
        else:
            assert self.attention is not None
            weights = torch.softmax(self.attention(torch.cat(features, dim=1)), dim=1)  # (B, S, D, H, W)
        return (weights.unsqueeze(2) * stacked).sum(dim=1), weights

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused logits and per-voxel scale weights ``(B, S, D, H, W)`` (``None`` for max fusion)."""
        return self._fuse(*self.scale_outputs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, features = self.scale_outputs(x)
        fused, _ = self._fuse(logits, features)
        if not self.training:
            return fused
        return fused, {f"scale{i}": lg for i, lg in enumerate(logits)}
