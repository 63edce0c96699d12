"""Pyramid Attention Network blocks: Feature Pyramid Attention and Global Attention Upsample (3D).

Li H., Xiong P., An J., Wang L., "Pyramid Attention Network for Semantic Segmentation", BMVC 2018,
arXiv:1805.10180.

PAN adds two modules to an encoder–decoder:

**Feature Pyramid Attention (FPA, Sec. 3.2, Fig. 2)** at the bottleneck. With input ``x`` (C channels):

    main = ConvNormAct₁ₓ₁ₓ₁(x)                                       (C channels)
    d₁ = down₁(x),  d₂ = down₂(d₁),  d₃ = down₃(d₂)                  stride-2 convs, kernel k_l
    r_l = refine_l(d_l)                                               same-size conv, kernel k_l
    u₃ = r₃;  u₂ = ReLU(r₂ + up(u₃));  u₁ = ReLU(r₁ + up(u₂))         U-shaped top-down sum
    att = ConvNormAct₁ₓ₁ₓ₁(up(u₁))                                   back to C channels on x's grid
    glob = up(conv₁ₓ₁ₓ₁(GAP(x)))                                      global-pooling branch
    out = main ⊙ att + glob

i.e. pixel-level attention from a small multi-scale pyramid multiplies the main branch, and global
context is added. The paper's 2D kernels are 7/5/3; the default here is 5/3/3 (a 7×7×7 kernel on a
3D bottleneck is large and the bottleneck grid is already small). The pyramid works on
``max(C // 4, 1)`` channels.

**Global Attention Upsample (GAU, Sec. 3.3, Fig. 3)** in the decoder, fusing a coarse high-level map
``h`` with a fine low-level map ``l``:

    w   = ReLU(conv₁ₓ₁ₓ₁(GAP(h)))                                    (B, C_out, 1, 1, 1) channel weights
    out = ReLU( w ⊙ norm(conv₃ₓ₃ₓ₃(l))  +  up(ConvNormAct₁ₓ₁ₓ₁(h)) )

Implementation notes (3D, small CT bottlenecks):

* Upsampling is trilinear to the *exact* target size, so odd grids (e.g. 5×7×3) round-trip.
* **Robust pyramid downsampling:** a stride-2 conv with padding ``k // 2`` maps a size ``n`` to
  ``ceil(n / 2)``. Stride 2 is applied only along dimensions larger than 2; dimensions of size 1 or 2
  keep stride 1. A dimension of size ≥ 2 therefore never drops below 2, and a pyramid level is a
  single voxel only if ``x`` is, so instance norm (undefined on one voxel) stays valid; e.g.
  3×5×2 → 2×3×2 → 2×2×2 → 2×2×2.
* **No norm on pooled vectors:** the global-pooling branches (FPA's ``glob``, GAU's ``w``) act on a
  ``1×1×1`` map. Instance norm of one voxel returns only its shift β (the input is erased, and torch
  raises in training); batch norm of a pooled vector needs ≥2 samples and is noisy with CT batch sizes
  of 1–2; group norm would subtract the mean over channels and so change which channels are weighted.
  These branches therefore use a 1×1×1 conv *with bias* and no normalisation, independent of ``norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nets.blocks.common import ConvNormAct, get_norm, resize_to


class _AdaptiveDown(nn.Module):
    """``ConvNormAct`` with stride 2 along dimensions larger than 2 and stride 1 elsewhere.

    The stride is picked per call from the input size, so the same weights serve any grid.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str) -> None:
        super().__init__()
        self.block = ConvNormAct(in_channels, out_channels, kernel_size, stride=1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: nn.Conv3d = self.block[0]
        stride = tuple(2 if s > 2 else 1 for s in x.shape[2:])
        y = F.conv3d(x, conv.weight, conv.bias, stride=stride, padding=conv.padding)
        for layer in list(self.block)[1:]:
            y = layer(y)
        return y


class FeaturePyramidAttention3D(nn.Module):
    """Feature Pyramid Attention (Li et al. 2018, Fig. 2) for a 3D bottleneck; ``channels`` in and out.

    Args:
        channels: input and output channels.
        norm: normalisation of all convs except the global-pooling branch (see module notes).
        kernels: odd kernel sizes of the pyramid levels, from the first (finest, applied to ``x``)
            to the last (coarsest) level; one level per entry. Default ``(5, 3, 3)`` (paper: 7, 5, 3).

    Example:
        >>> fpa = FeaturePyramidAttention3D(32)
        >>> fpa(torch.randn(1, 32, 3, 5, 2)).shape
        torch.Size([1, 32, 3, 5, 2])
    """

    def __init__(self, channels: int, norm: str = "instance", kernels: tuple[int, ...] = (5, 3, 3)) -> None:
        super().__init__()
        if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"kernels must be a non-empty tuple of odd sizes, got {kernels!r}")
        mid = max(channels // 4, 1)
        self.main = ConvNormAct(channels, channels, kernel_size=1, norm=norm)
        downs, refines = [], []
        in_ch = channels
        for k in kernels:
            downs.append(_AdaptiveDown(in_ch, mid, k, norm))
            # Refinement conv without ReLU: the level is summed with the upsampled coarser level first.
            refines.append(ConvNormAct(mid, mid, kernel_size=k, norm=norm, act=False))
            in_ch = mid
        self.downs = nn.ModuleList(downs)
        self.refines = nn.ModuleList(refines)
        self.attention = ConvNormAct(mid, channels, kernel_size=1, norm=norm)
        self.global_conv = nn.Conv3d(channels, channels, kernel_size=1, bias=True)

    def pyramid(self, x: torch.Tensor) -> torch.Tensor:
        """The U-shaped pyramid's attention map ``att`` on ``x``'s grid, ``(B, channels, D, H, W)``."""
        levels = []
        y = x
        for down, refine in zip(self.downs, self.refines, strict=True):
            y = down(y)
            levels.append(refine(y))
        u = levels[-1]
        for level in reversed(levels[:-1]):
            u = F.relu(level + resize_to(u, level.shape[2:]))
        return self.attention(resize_to(u, x.shape[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        glob = self.global_conv(F.adaptive_avg_pool3d(x, 1))
        return self.main(x) * self.pyramid(x) + glob  # glob broadcasts = upsampling a 1×1×1 map


class GlobalAttentionUpsample3D(nn.Module):
    """Global Attention Upsample (Li et al. 2018, Fig. 3): high-level context weights low-level channels.

    Args:
        high_channels: channels of the coarse high-level map ``high``.
        low_channels: channels of the fine low-level (skip) map ``low``.
        out_channels: output channels.
        norm: normalisation of the 3×3×3 low-level conv and the 1×1×1 high-level projection; the
            pooled channel-weight branch has no norm (see module notes).

    ``forward(high, low)`` returns ``(B, out_channels, *low.shape[2:])``.

    Example:
        >>> gau = GlobalAttentionUpsample3D(64, 32, 32)
        >>> gau(torch.randn(1, 64, 3, 4, 2), torch.randn(1, 32, 5, 7, 3)).shape
        torch.Size([1, 32, 5, 7, 3])
    """

    def __init__(
        self, high_channels: int, low_channels: int, out_channels: int, norm: str = "instance"
    ) -> None:
        super().__init__()
        self.low_conv = nn.Sequential(
            nn.Conv3d(low_channels, out_channels, kernel_size=3, padding=1, bias=False),
            get_norm(norm, out_channels),
        )
        self.global_conv = nn.Conv3d(high_channels, out_channels, kernel_size=1, bias=True)
        self.high_proj = ConvNormAct(high_channels, out_channels, kernel_size=1, norm=norm)

    def channel_weights(self, high: torch.Tensor) -> torch.Tensor:
        """Channel weights ``ReLU(conv(GAP(high)))`` of shape ``(B, out_channels, 1, 1, 1)``."""
        return F.relu(self.global_conv(F.adaptive_avg_pool3d(high, 1)))

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        weighted = self.low_conv(low) * self.channel_weights(high)
        return F.relu(weighted + resize_to(self.high_proj(high), low.shape[2:]))
