"""Expectation-Maximization Attention unit (EMAU), in 3D.

Li X., Zhong Z., Wu J., Yang Y., Lin Z., Liu H., "Expectation-Maximization Attention Networks for Semantic
Segmentation", ICCV 2019, arXiv:1907.13426.

Instead of an N×N self-attention map, EMA represents the feature map ``X`` (``C × N``, ``N = D·H·W``)
by ``K ≪ N`` bases ``μ`` (``C × K``) found by a few EM iterations started from learned-by-averaging
bases (Sec. 3.2–3.3):

    E-step:   z_nk = exp(x_nᵀ μ_k) / Σ_j exp(x_nᵀ μ_j)            (softmax over the K bases)
    M-step:   μ_k  = Σ_n z_nk x_n / Σ_n z_nk                        (code: z / (1e-6 + Σ_n z))
              μ_k ← μ_k / ‖μ_k‖₂                                    (bases normalisation, Sec. 3.3)
    output:   x̃_n  = Σ_k z_nk μ_k,   y = ReLU(x + Norm(Conv₁ₓ₁ₓ₁(ReLU(X̃))))

The T EM iterations run without gradient (as in the paper and the authors' code); one more E-step with
gradient gives the responsibilities used for the reconstruction, so the input projection ``conv_in``
is trained through ``z`` (the authors' code reuses the last no-grad ``z``, which leaves ``conv_in``
without gradient). The initial bases are a buffer ``mu`` of shape ``(1, C, K)``, initialised as
``normal(0, sqrt(2/K))`` then L2-normalised over channels; in training they follow the batch-mean of the
final bases by a moving average, ``mu ← momentum·mu + (1 − momentum)·mean_b(μ)``, then are L2-normalised
again (note: ``momentum`` weighs the *old* value, the opposite of BatchNorm's convention). In a
multi-GPU setting the buffer is not synchronised here: data-parallel training averages it across ranks
after every step (:meth:`medseg.engine.distributed.Replicas.sync_buffers`).

Every tensor is at most ``B × N × K`` (the responsibilities), so memory is linear in ``N``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nets.blocks.common import ConvNormAct

#: Added to norms and to Σ_n z to avoid division by zero, as in the authors' code.
EPS = 1e-6


def l2_normalise(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t / (1e-6 + ‖t‖₂)`` along ``dim`` (the authors' ``_l2norm``)."""
    return t / (EPS + t.norm(dim=dim, keepdim=True))


def em_bases(x: torch.Tensor, mu: torch.Tensor, iterations: int) -> torch.Tensor:
    """Run ``iterations`` EM steps on ``x (B, C, N)`` from bases ``mu (B, C, K)``; returns new ``mu``.

    Each step: ``z = softmax_K(xᵀμ)``, ``z̄ = z / (1e-6 + Σ_n z)``, ``μ = normalise_C(x · z̄)``.
    Call it under ``torch.no_grad()`` as the EMA unit does; it is differentiable otherwise.
    """
    for _ in range(iterations):
        z = torch.softmax(torch.bmm(x.transpose(1, 2), mu), dim=2)  # (B, N, K)
        z = z / (EPS + z.sum(dim=1, keepdim=True))
        mu = l2_normalise(torch.bmm(x, z), dim=1)  # (B, C, K)
    return mu


class EMAUnit3D(nn.Module):
    """EMA unit (Li et al. 2019, Sec. 3.2–3.3): low-rank reconstruction from K EM bases + residual.

    Takes and returns ``(B, C, D, H, W)`` tensors.

    Args:
        channels: input/output channels ``C``.
        num_bases: number of bases ``K`` (64 in the paper).
        iterations: EM iterations ``T`` per forward (3 in the paper), at least 1.
        momentum: weight of the old bases in the moving average (0.9 in the paper).
        norm: normalisation after the output 1×1×1 conv, see :func:`medseg.nets.blocks.common.get_norm`.

    Buffers:
        mu: ``(1, C, K)`` unit-norm (over ``C``) initial bases, updated only in training.

    Example:
        >>> ema = EMAUnit3D(32, num_bases=16)
        >>> ema(torch.randn(2, 32, 5, 7, 3)).shape
        torch.Size([2, 32, 5, 7, 3])
    """

    mu: torch.Tensor

    def __init__(
        self,
        channels: int,
        num_bases: int = 64,
        iterations: int = 3,
        momentum: float = 0.9,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_bases = num_bases
        self.iterations = iterations
        self.momentum = momentum
        self.conv_in = nn.Conv3d(channels, channels, kernel_size=1)
        self.conv_out = ConvNormAct(channels, channels, 1, norm=norm, act=False)
        mu = torch.randn(1, channels, num_bases) * math.sqrt(2.0 / num_bases)
        self.register_buffer("mu", l2_normalise(mu, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``ReLU(x + Norm(Conv(ReLU(μ zᵀ))))`` with the shape of ``x``; updates ``mu`` in training."""
        feat = self.conv_in(x)
        flat = feat.flatten(2)  # (B, C, N)
        with torch.no_grad():
            mu0 = self.mu.to(flat.dtype).expand(flat.shape[0], -1, -1)
            mu = em_bases(flat.detach(), mu0, self.iterations)  # (B, C, K), no gradient
        z = torch.softmax(torch.bmm(flat.transpose(1, 2), mu), dim=2)  # final E-step, with gradient
        recon = torch.bmm(mu, z.transpose(1, 2)).view_as(feat)
        out = F.relu(x + self.conv_out(F.relu(recon)))
        if self.training:
            self._update_bases(mu)
        return out

    @torch.no_grad()
    def _update_bases(self, mu: torch.Tensor) -> None:
        """Moving average of the batch-mean bases into the ``mu`` buffer, then re-normalise."""
        batch_mu = mu.mean(dim=0, keepdim=True).to(self.mu.dtype)
        self.mu.mul_(self.momentum).add_(batch_mu, alpha=1.0 - self.momentum)
        self.mu.copy_(l2_normalise(self.mu, dim=1))


__all__ = ["EMAUnit3D", "em_bases", "l2_normalise"]
