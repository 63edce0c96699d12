"""Dual attention (position + channel self-attention) of DANet, in 3D.

Fu J., Liu J., Tian H., Li Y., Bao Y., Fang Z., Lu H., "Dual Attention Network for Scene Segmentation",
CVPR 2019, arXiv:1809.02983.

Position attention module (PAM, Sec. 3.2). For an input ``A`` of shape ``(C, N)``, ``N = D·H·W``, two
1×1×1 convolutions give ``B`` and ``C`` (``C/8`` channels each) and a third gives ``D`` (``C`` channels):

    s_ji = exp(B_i · C_j) / Σ_i exp(B_i · C_j)                 (Eq. 1: impact of position i on j)
    E_j  = α · Σ_i s_ji D_i + A_j                               (Eq. 2: α learned, starts at 0)

In the authors' code (and here) ``C`` is the *query* and ``B`` the *key*: ``energy = QᵀK`` (N×N,
``energy[j, i] = q_j · k_i``), row-wise softmax over the keys, ``out = V·Sᵀ`` and ``E = α·out + A``; α
is the parameter ``gamma``.

Channel attention module (CAM, Sec. 3.3), directly on ``A`` (no projections):

    x_ji = exp(A_i · A_j) / Σ_i exp(A_i · A_j)                       (Eq. 3, C×C map)
    E_j  = β · Σ_i x_ji A_i + A_j                                    (Eq. 4, β learned, starts at 0)

where, as in the authors' code, the softmax is applied to ``max(energy) − energy`` (row-wise max), which
by shift invariance equals ``softmax(−energy)``: a channel attends most to the channels it is *least*
correlated with. We follow the code, not the printed equation.

3D memory. The PAM map is N×N: a 24³ grid has N = 13 824 positions, so one fp32 map is 764 MB (and a
softmax keeps a second copy). :class:`PositionAttention3D` therefore processes the queries in chunks of
rows — each softmax row only needs its own row of energies, so the result equals the plain formula up to
float rounding — with a custom autograd function that reuses one workspace per chunk in forward and two
in backward, recomputing probabilities from the saved per-row log-sum-exp (the memory-efficient attention
trick). Extra memory is ``O(B · chunk · N)`` in inference and in training instead of ``O(B · N²)``; the
automatic chunk keeps one energy block within :data:`PAM_CHUNK_BYTES`. Measured memory and time, and why
``torch.nn.functional.scaled_dot_product_attention`` is not used: ``docs/speed.md`` and ``docs/design.md``
(section ``medseg.nets.blocks.danet``).

Head. :class:`DualAttention3D` (U-Net bottleneck) and :class:`DualAttentionHead3D` (the paper's
segmentation head) share one trunk. Deviation: the authors' head puts ``Dropout2d(0.1)`` before its three
1×1 classifiers; we leave dropout out (deterministic blocks; add it at the network level if wanted).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from medseg.nets.blocks.common import ConvNormAct

#: Bytes of one chunk of the PAM energy map when ``chunk_size`` is automatic. Forward reuses one such
#: workspace, backward two, so the extra peak is about twice this value plus O(B·C·N) tensors.
PAM_CHUNK_BYTES = 32 * 2**20


def position_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain PAM formula (Eq. 1–2 without the residual), materialising the full N×N map.

    Reference for tests, and the path :func:`position_attention_chunked` takes when one chunk covers N.

    Args:
        q: queries ``(B, Cq, N)``; k: keys ``(B, Cq, N)``; v: values ``(B, C, N)``.

    Returns:
        ``out = V · softmax(Qᵀ K)ᵀ`` of shape ``(B, C, N)``.
    """
    attention = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # (B, N_query, N_key)
    return torch.bmm(v, attention.transpose(1, 2))


def auto_chunk_size(batch: int, positions: int, itemsize: int = 4, budget: int = PAM_CHUNK_BYTES) -> int:
    """Number of query rows whose ``(batch, rows, positions)`` energy block fits in ``budget`` bytes."""
    return max(1, budget // (batch * positions * itemsize))


class _ChunkedPositionAttention(torch.autograd.Function):
    """Exact ``V · softmax(Qᵀ K)ᵀ`` with O(chunk · N) memory in forward *and* backward.

    Forward walks over blocks of query rows, writing energies into one reused workspace and turning them
    into softmax probabilities in place; it keeps only ``q, k, v``, the output and the per-row
    log-sum-exp. Backward recomputes each block's probabilities from the log-sum-exp and applies the
    softmax Jacobian with the identity ``Σ_j P_ij dP_ij = dO_i · O_i`` (as in memory-efficient attention),
    using two reused workspaces. Memory therefore does not depend on how the allocator recycles freed
    blocks. Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
        batch, _, n = q.shape
        out = v.new_empty(batch, v.shape[1], n)
        lse = q.new_empty(batch, n)
        work = q.new_empty(batch * min(chunk_size, n) * n)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            p = work[: batch * (stop - start) * n].view(batch, stop - start, n)
            torch.bmm(q[:, :, start:stop].transpose(1, 2), k, out=p)  # energies of this block
            row_max = p.amax(dim=-1, keepdim=True)
            p.sub_(row_max).exp_()
            row_sum = p.sum(dim=-1, keepdim=True)
            p.div_(row_sum)  # softmax over the keys, in place
            lse[:, start:stop] = (row_max + row_sum.log()).squeeze(-1)
            out[:, :, start:stop] = torch.bmm(v, p.transpose(1, 2))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        batch, _, n = q.shape
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        delta = (grad_out * out).sum(dim=1)  # (B, N): Σ_j P_ij dP_ij = dO_i · O_i
        rows = min(chunk_size, n)
        work_p = q.new_empty(batch * rows * n)
        work_dp = q.new_empty(batch * rows * n)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            size = batch * (stop - start) * n
            p = work_p[:size].view(batch, stop - start, n)
            dp = work_dp[:size].view(batch, stop - start, n)
            q_rows, g_rows = q[:, :, start:stop], grad_out[:, :, start:stop]
            torch.bmm(q_rows.transpose(1, 2), k, out=p)
            p.sub_(lse[:, start:stop, None]).exp_()  # recomputed softmax
            grad_v.baddbmm_(g_rows, p)  # dV += dO · P
            torch.bmm(g_rows.transpose(1, 2), v, out=dp)  # dP = dOᵀ V
            dp.sub_(delta[:, start:stop, None]).mul_(p)  # dE = P ⊙ (dP − δ)
            grad_q[:, :, start:stop] = torch.bmm(k, dp.transpose(1, 2))
            grad_k.baddbmm_(q_rows, dp)
        return grad_q, grad_k, grad_v, None


def position_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """PAM output ``V · softmax(Qᵀ K)ᵀ`` computed ``chunk_size`` query rows at a time.

    Same arguments and result as :func:`position_attention_reference` (rows of a softmax are independent,
    so chunking is exact up to float rounding). Extra memory is ``O(B · chunk_size · N)`` instead of
    ``O(B · N²)`` in inference and in training (see :class:`_ChunkedPositionAttention`).
    ``chunk_size=None`` picks the largest chunk whose energy block fits in :data:`PAM_CHUNK_BYTES`; when
    one chunk covers all ``N`` queries the plain autograd formula is used.
    """
    n = q.shape[-1]
    if chunk_size is None:
        chunk_size = auto_chunk_size(q.shape[0], n, q.element_size())
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if chunk_size >= n:
        return position_attention_reference(q, k, v)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return _ChunkedPositionAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), chunk_size)


class PositionAttention3D(nn.Module):
    """Position attention module (PAM) of DANet for ``(B, C, D, H, W)`` tensors, memory-bounded.

    Every voxel aggregates the value features of all voxels, weighted by query–key similarity
    (Eq. 1–2 of Fu et al. 2019), scaled by ``gamma`` (zero at init, so the block starts as identity).

    Args:
        channels: input/output channels ``C``.
        reduction: query/key width is ``max(C // reduction, 1)`` (the paper uses 8).
        chunk_size: query positions per chunk; ``None`` = automatic (energy block ≤ 32 MB).

    Example:
        >>> pam = PositionAttention3D(64)
        >>> pam(torch.randn(1, 64, 5, 7, 3)).shape
        torch.Size([1, 64, 5, 7, 3])
    """

    def __init__(self, channels: int, reduction: int = 8, chunk_size: int | None = None) -> None:
        super().__init__()
        qk_channels = max(channels // reduction, 1)
        self.query = nn.Conv3d(channels, qk_channels, kernel_size=1)
        self.key = nn.Conv3d(channels, qk_channels, kernel_size=1)
        self.value = nn.Conv3d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.chunk_size = chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``gamma · PAM(x) + x`` with the shape of ``x``."""
        q = self.query(x).flatten(2)
        k = self.key(x).flatten(2)
        v = self.value(x).flatten(2)
        out = position_attention_chunked(q, k, v, self.chunk_size)
        return self.gamma * out.view_as(x) + x


class ChannelAttention3D(nn.Module):
    """Channel attention module (CAM) of DANet for ``(B, C, D, H, W)`` tensors (Fu et al. 2019, Eq. 3–4).

    Computes the C×C channel affinity ``X·Xᵀ`` over all voxels, turns ``max − energy`` into attention
    with a row softmax (as the authors' code), mixes channels with it and adds the input scaled by
    ``beta`` (zero at init). Memory is ``O(C² + C·N)``, so no chunking is needed.

    Args:
        channels: input/output channels ``C`` (no learned projections besides ``beta``).

    Example:
        >>> cam = ChannelAttention3D(16)
        >>> cam(torch.randn(2, 16, 5, 7, 3)).shape
        torch.Size([2, 16, 5, 7, 3])
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``beta · softmax(max(XXᵀ) − XXᵀ) · X + x`` with the shape of ``x``."""
        flat = x.flatten(2)  # (B, C, N)
        energy = torch.bmm(flat, flat.transpose(1, 2))  # (B, C, C)
        energy = energy.amax(dim=-1, keepdim=True) - energy
        attention = torch.softmax(energy, dim=-1)
        out = torch.bmm(attention, flat)
        return self.beta * out.view_as(x) + x


class _DualAttentionBase(nn.Module):
    """Shared DANet trunk: two branches (conv → PAM/CAM → conv), summed, then ``self.fuse``.

    Subclasses only choose ``fuse``; the auxiliary per-branch classifiers (``conv6``/``conv7`` of the
    authors' head) are evaluated only in training, where their logits feed deep-supervision losses.
    """

    def __init__(self, in_channels: int, num_classes: int, fuse: nn.Module, norm: str, reduction: int):
        super().__init__()
        inter = max(in_channels // 4, 1)
        self.inter_channels = inter
        self.pam_in = ConvNormAct(in_channels, inter, 3, norm=norm)
        self.pam = PositionAttention3D(inter, reduction)
        self.pam_out = ConvNormAct(inter, inter, 3, norm=norm)
        self.cam_in = ConvNormAct(in_channels, inter, 3, norm=norm)
        self.cam = ChannelAttention3D(inter)
        self.cam_out = ConvNormAct(inter, inter, 3, norm=norm)
        self.pam_classifier = nn.Conv3d(inter, num_classes, kernel_size=1)
        self.cam_classifier = nn.Conv3d(inter, num_classes, kernel_size=1)
        self.fuse = fuse

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(fuse(P + C), aux)``; ``aux`` holds the two branch logits in training, else ``{}``."""
        p = self.pam_out(self.pam(self.pam_in(x)))
        c = self.cam_out(self.cam(self.cam_in(x)))
        aux: dict[str, torch.Tensor] = {}
        if self.training:
            aux = {"danet_pam": self.pam_classifier(p), "danet_cam": self.cam_classifier(c)}
        return self.fuse(p + c), aux


class DualAttention3D(_DualAttentionBase):
    """DANet head (Fu et al. 2019) as a U-Net bottleneck: features in, features out, plus auxiliary logits.

    ``inter = max(in_channels // 4, 1)``; branch P is ``3³ ConvNormAct → PAM → 3³ ConvNormAct``, branch C
    the same with CAM; their sum goes through a 1×1×1 ``ConvNormAct`` (conv, norm, ReLU) to
    ``out_channels``. In training the returned dict holds ``"danet_pam"`` and ``"danet_cam"``: 1×1×1
    classifiers of each branch, ``(B, num_classes, D, H, W)`` at ``x``'s resolution (upsample them to the
    label grid for the auxiliary losses, weight 1 each in the paper). In eval it is empty.

    Args:
        in_channels: input channels.
        out_channels: output feature channels.
        num_classes: classes of the auxiliary logits.
        norm: normalisation name, see :func:`medseg.nets.blocks.common.get_norm`.
        reduction: PAM query/key reduction.

    Example:
        >>> block = DualAttention3D(32, 64, num_classes=3)
        >>> feats, aux = block(torch.randn(1, 32, 5, 7, 3))
        >>> feats.shape, sorted(aux)
        (torch.Size([1, 64, 5, 7, 3]), ['danet_cam', 'danet_pam'])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_classes: int,
        norm: str = "instance",
        reduction: int = 8,
    ) -> None:
        inter = max(in_channels // 4, 1)
        fuse = ConvNormAct(inter, out_channels, 1, norm=norm)
        super().__init__(in_channels, num_classes, fuse, norm, reduction)


class DualAttentionHead3D(_DualAttentionBase):
    """The original DANet segmentation head (Fu et al. 2019): returns class logits (the paper's fused output).

    Same trunk as :class:`DualAttention3D`; the summed branches go through a plain 1×1×1 conv (with bias)
    to ``num_classes`` (``conv8`` in the authors' code). Returns ``(logits, aux)`` with the two auxiliary
    branch logits in training and ``{}`` in eval.

    Example:
        >>> head = DualAttentionHead3D(32, num_classes=3).eval()
        >>> logits, aux = head(torch.randn(1, 32, 5, 7, 3))
        >>> logits.shape, aux
        (torch.Size([1, 3, 5, 7, 3]), {})
    """

    def __init__(
        self, in_channels: int, num_classes: int, norm: str = "instance", reduction: int = 8
    ) -> None:
        inter = max(in_channels // 4, 1)
        super().__init__(
            in_channels, num_classes, nn.Conv3d(inter, num_classes, kernel_size=1), norm, reduction
        )


__all__ = [
    "ChannelAttention3D",
    "DualAttention3D",
    "DualAttentionHead3D",
    "PositionAttention3D",
    "auto_chunk_size",
    "position_attention_chunked",
    "position_attention_reference",
]
