"""Context Encoding Module with Semantic Encoding loss (EncNet, Zhang et al., 2018), in 3D.

Zhang H., Dana K., Shi J., Zhang Z., Wang X., Tyagi A., Agrawal A., "Context Encoding for Semantic
Segmentation", CVPR 2018, arXiv:1803.08904.

**Encoding layer (Sec. 2.1).** Treat the ``N = D·H·W`` voxels of a feature map as a bag of C-dim
descriptors ``x_i``. With K learned codewords ``d_k`` and smoothing factors ``s_k``:

    r_ik = x_i − d_k                                          residual to codeword k
    a_ik = exp(−s_k ‖r_ik‖²) / Σ_j exp(−s_j ‖r_ij‖²)          soft assignment   (Eq. 1 of the paper)
    e_k  = Σ_i a_ik r_ik                                      aggregated residual, e ∈ R^{K×C}

Like the authors' code, the stored parameter is ``scale_k = −s_k`` (initialised uniform in
[−1, 0], i.e. s_k ∈ [0, 1]) and ``a_ik = softmax_k(scale_k ‖r_ik‖²)``; codewords start uniform in
``±1/sqrt(K·C)``. ``e_k`` is computed without materialising the ``N×K×C`` residuals by expanding the
square: ``‖x_i − d_k‖² = ‖x_i‖² − 2 x_i·d_k + ‖d_k‖²`` and
``e_k = Σ_i a_ik x_i − (Σ_i a_ik) d_k`` — memory O(N·K).

**Context Encoding Module (Sec. 2.2, Fig. 2).** ``x → 1×1×1 ConvNormAct → encoding → BN over the K
codewords → ReLU → mean over K`` gives the encoded context ``e ∈ R^C``, then

    γ   = sigmoid(W_fc e)                                     channel-wise scaling factors
    out = ReLU(x + x ⊙ γ)                                     (the authors' code; the paper writes x ⊗ γ)

**SE-loss (Semantic Encoding loss).** A second FC layer on ``e`` predicts, per class, whether the class
occurs anywhere in the patch; it is trained with binary cross-entropy against :func:`medseg.losses.targets.presence_targets`.
It costs nothing at inference and gives the small organs' presence a global, size-independent signal.

Normalisation over the codewords: ``BatchNorm1d(K)`` on the ``(B, K, C)`` encoding normalises each
codeword over the B·C values it sees, so it is well defined for batch size 1 (as long as C > 1) —
used whatever ``norm`` the rest of the network uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medseg.nets.blocks.common import ConvNormAct


class EncodingLayer3D(nn.Module):
    """Residual encoding of a 3D feature map against K learned codewords (Zhang et al. 2018, Sec. 2.1).

    Args:
        channels: descriptor dimension C (input channels).
        num_codes: number of codewords K.

    ``forward(x)`` maps ``(B, C, D, H, W)`` to the aggregated residuals ``(B, K, C)``.

    Example:
        >>> enc = EncodingLayer3D(8, num_codes=4)
        >>> enc(torch.randn(2, 8, 5, 7, 3)).shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, channels: int, num_codes: int = 32) -> None:
        super().__init__()
        self.channels = channels
        self.num_codes = num_codes
        self.codewords = nn.Parameter(torch.empty(num_codes, channels))
        self.scale = nn.Parameter(torch.empty(num_codes))  # scale_k = −s_k
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the authors' code: codewords ~ U(±1/sqrt(K·C)), scale ~ U[−1, 0]."""
        bound = 1.0 / math.sqrt(self.num_codes * self.channels)
        nn.init.uniform_(self.codewords, -bound, bound)
        nn.init.uniform_(self.scale, -1.0, 0.0)

    def _descriptors(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, D, H, W), got shape {tuple(x.shape)}")
        return x.flatten(2).transpose(1, 2)  # (B, N, C)

    def _assign(self, desc: torch.Tensor) -> torch.Tensor:
        # ‖x_i − d_k‖² = ‖x_i‖² − 2 x_i·d_k + ‖d_k‖²   → (B, N, K)
        sq_dist = (
            desc.pow(2).sum(-1, keepdim=True)
            - 2.0 * desc @ self.codewords.t()
            + self.codewords.pow(2).sum(-1)
        )
        return torch.softmax(self.scale * sq_dist, dim=-1)

    def assignments(self, x: torch.Tensor) -> torch.Tensor:
        """Soft-assignment weights ``a_ik`` of shape ``(B, N, K)``, N = D·H·W in ``flatten`` order."""
        return self._assign(self._descriptors(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = self._descriptors(x)
        a = self._assign(desc)  # (B, N, K)
        # e_k = Σ_i a_ik x_i − (Σ_i a_ik) d_k
        return a.transpose(1, 2) @ desc - a.sum(1).unsqueeze(-1) * self.codewords


class ContextEncoding3D(nn.Module):
    """Context Encoding Module with an SE-loss presence head (Zhang et al. 2018, Sec. 2.2).

    Args:
        channels: input (and output) channels.
        num_classes: classes of the SE-loss presence head.
        num_codes: number of codewords K of the encoding layer.
        norm: normalisation of the 1×1×1 input projection (the codeword norm is always
            ``BatchNorm1d(K)``, see module notes).

    ``forward(x)`` returns ``(features, aux)``: ``features = ReLU(x + x·γ)`` with x's shape;
    ``aux = {"se_presence": (B, num_classes) logits}`` in training (train with BCE-with-logits against
    :func:`medseg.losses.targets.presence_targets`) and ``{}`` in eval mode.

    Example:
        >>> cem = ContextEncoding3D(16, num_classes=4, num_codes=8)
        >>> y, aux = cem(torch.randn(2, 16, 3, 5, 2))
        >>> y.shape, aux["se_presence"].shape
        (torch.Size([2, 16, 3, 5, 2]), torch.Size([2, 4]))
    """

    def __init__(self, channels: int, num_classes: int, num_codes: int = 32, norm: str = "instance") -> None:
        super().__init__()
        self.proj = ConvNormAct(channels, channels, kernel_size=1, norm=norm)
        self.encoding = EncodingLayer3D(channels, num_codes)
        self.code_norm = nn.BatchNorm1d(num_codes)
        self.fc = nn.Linear(channels, channels)
        self.se_head = nn.Linear(channels, num_classes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded context ``e = mean_k ReLU(BN(E(proj(x))))`` of shape ``(B, C)``."""
        codes = self.encoding(self.proj(x))  # (B, K, C)
        return torch.relu(self.code_norm(codes)).mean(dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        context = self.encode(x)
        gamma = torch.sigmoid(self.fc(context)).view(*context.shape, 1, 1, 1)
        out = torch.relu(x + x * gamma)
        aux: dict[str, torch.Tensor] = {}
        if self.training:
            aux = {"se_presence": self.se_head(context)}
        return out, aux
