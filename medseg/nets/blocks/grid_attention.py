"""Grid attention gate of the Attention U-Net (Oktay et al., 2018).

Oktay O. et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018, arXiv:1804.03999.

The additive attention gate of Eq. (1)–(2) of the paper, in the *grid* form of the authors' 3D CT code:
the skip feature ``x`` (fine grid) is projected by ``θ`` — a 2×2×2 convolution with stride 2 and no bias —
onto the coarse grid of the gating signal ``g``; ``g`` is projected by ``φ`` (1×1×1 conv) and resized to
θ's grid when the two differ. Then

    q_att = ψᵀ · ReLU(θ(x) + φ(g) + b_g) + b_ψ            (Eq. 1, σ₁ = ReLU)
    α     = sigmoid(q_att)                                (Eq. 2, σ₂ = sigmoid, coarse grid)
    α̂     = trilinear_upsample(α, size(x))
    out   = W(α̂ · x),  W = 1×1×1 conv + norm

so gating is computed on the coarse grid and only the coefficients are upsampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nets.blocks.common import get_norm


class GridAttentionGate3D(nn.Module):
    """Additive grid attention gate for a skip connection (Oktay et al. 2018, Eq. 1–2).

    Args:
        in_channels: channels of the skip feature ``x``.
        gating_channels: channels of the gating signal ``g`` (on a grid ``sub_sample`` times coarser).
        inter_channels: channels of the joint space θx + φg; defaults to ``in_channels // 2`` (min 1).
        sub_sample: stride (and kernel size) of θ, i.e. how much coarser the gating grid is: one int, or one
            per axis (``(2, 2, 1)`` when the pooling below this level kept the slice axis).
        norm: normalisation of the output transform ``W``.

    Example:
        >>> gate = GridAttentionGate3D(32, 64)
        >>> x, g = torch.randn(1, 32, 16, 16, 16), torch.randn(1, 64, 8, 8, 8)
        >>> y, alpha = gate(x, g)
        >>> y.shape, alpha.shape
        (torch.Size([1, 32, 16, 16, 16]), torch.Size([1, 1, 16, 16, 16]))
    """

    def __init__(
        self,
        in_channels: int,
        gating_channels: int,
        inter_channels: int | None = None,
        sub_sample: int | tuple[int, int, int] = 2,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        inter = inter_channels or max(in_channels // 2, 1)
        self.theta = nn.Conv3d(in_channels, inter, kernel_size=sub_sample, stride=sub_sample, bias=False)
        self.phi = nn.Conv3d(gating_channels, inter, kernel_size=1, bias=True)
        self.psi = nn.Conv3d(inter, 1, kernel_size=1, bias=True)
        self.W = nn.Sequential(
            nn.Conv3d(in_channels, in_channels, kernel_size=1), get_norm(norm, in_channels)
        )

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention coefficients α on the coarse (θ) grid, shape ``(B, 1, *θ(x).shape[2:])``."""
        theta_x = self.theta(x)
        phi_g = self.phi(g)
        if phi_g.shape[2:] != theta_x.shape[2:]:
            phi_g = F.interpolate(phi_g, size=theta_x.shape[2:], mode="trilinear", align_corners=False)
        return torch.sigmoid(self.psi(F.relu(theta_x + phi_g)))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the gated skip ``W(α̂·x)`` and α̂ upsampled to ``x``'s grid (values in [0, 1])."""
        alpha = self.coefficients(x, g)
        alpha = F.interpolate(alpha, size=x.shape[2:], mode="trilinear", align_corners=False)
        return self.W(alpha * x), alpha
