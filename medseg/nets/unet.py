"""3D U-Net (Çiçek et al., 2016) and the 3D Attention U-Net with grid attention gates (Oktay et al., 2018).

Çiçek Ö., Abdulkadir A., Lienkamp S. S., Brox T., Ronneberger O., "3D U-Net: Learning Dense Volumetric
Segmentation from Sparse Annotation", MICCAI 2016, arXiv:1606.06650 — the 3D encoder–decoder with skip
connections (its network architecture section) that both networks here are built on.

Oktay O., Schlemper J., Le Folgoc L. et al., "Attention U-Net: Learning Where to Look for the Pancreas",
MIDL 2018, arXiv:1804.03999 — the 3D CT network of the paper and the authors' code
(``unet_CT_single_att_dsv_3D``):

* 5 levels, filters 16/32/64/128/256, two 3×3×3 conv–norm–ReLU per level, 2×2×2 max-pool down. The
  pooling between levels may be chosen per level and per axis (``pool_kernels``, e.g. ``[[2, 2, 1], [2, 2,
  2], …]`` for thick slices): nnU-Net's anisotropic pooling (Isensee et al., Nat. Methods 2021; planned by
  :mod:`medseg.planning.planner`); the default, all ``2``, is the paper's network.
* Gating signal ``g`` from the bottleneck through a 1×1×1 conv–norm–ReLU (Fig. 1 of the paper).
* Grid attention gates (:class:`~medseg.nets.blocks.grid_attention.GridAttentionGate3D`, Eq. 1–2) on skip
  levels 2–4; the full-resolution skip is not gated. The deepest gate is driven by ``g``, each shallower gate
  by the decoder feature of the level below (the coarser grid), as in the authors' network.
* Decoder: trilinear ×2 up-sampling (to the skip's exact size, so odd sizes work), concatenation with the
  (gated) skip, two 3×3×3 convs.
* Deep supervision: a 1×1×1 head per decoder level (Sec. 2 of the paper).

:class:`UNet3D` has the identical encoder/decoder without gates and without ``g``: the ablation baseline, a
3D U-Net after Çiçek et al. in this layout (five levels instead of four, padded convolutions, trilinear
up-sampling instead of 2×2×2 up-convolutions, instance norm by default instead of batch norm, deep
supervision). :class:`AttentionUNet3D` adds the gates. Which of the two a class is decides the gates (the
class attribute ``grid_gates``); there is no constructor switch that could contradict the class, and the
registry names ``unet`` / ``attention_unet`` map to the two classes.

Pluggable parts (chosen by config through :mod:`medseg.nets.registry`): a bottleneck block (PAM, CAM, DANet
dual, EMA, PSA, FPA, context encoding), the decoder fusion (``concat`` or PAN's global attention
upsample ``gau``) and the final head (``plain`` or reverse attention).

Output contract:

* ``model.eval()``: full-resolution logits ``(B, K, D, H, W)``; with ``return_attention=True`` a tuple
  ``(logits, [α₂, α₃, α₄])`` with each α of shape ``(B, 1, *skip_size)`` and values in [0, 1].
* ``model.train()``: a dict ``{"logits": [full, level2, level3, level4], "aux": {name: tensor}}`` —
  the deep-supervision list (full resolution first, then coarser decoder levels) and the auxiliary outputs
  of the pluggable blocks (DANet branch logits, reverse branch, SE presence logits); ``"attention"`` is
  added with ``return_attention=True``. :class:`medseg.losses.SegmentationLoss` consumes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medseg.nets.blocks.common import ConvNormAct, DoubleConv
from medseg.nets.blocks.grid_attention import GridAttentionGate3D
from medseg.nets.fusion import ConcatFusion


@dataclass(frozen=True)
class UNetBlocks:
    """The pluggable parts of a U-Net, as factories (:mod:`medseg.nets.registry` makes them from the config's
    ``model.bottleneck``, ``model.decoder_fusion`` and ``model.head``).

    Attributes:
        bottleneck: ``(channels, num_classes, norm) -> nn.Module`` or ``None``; the module returns a tensor,
            or ``(tensor, aux_dict)``.
        fusion: ``(high_channels, low_channels, out_channels, norm) -> nn.Module``; ``None``: concatenation.
        head: ``(in_channels, num_classes, norm) -> nn.Module``, returning logits or ``(logits, aux)``;
            ``None``: a 1×1×1 convolution.
    """

    bottleneck: Callable[..., nn.Module] | None = None
    fusion: Callable[..., nn.Module] | None = None
    head: Callable[..., nn.Module] | None = None


class UNet3D(nn.Module):
    """3D U-Net (Çiçek et al., MICCAI 2016) with pluggable attention blocks; five levels by default.

    Two 3×3×3 conv–norm–ReLU per level and max pooling on the way down; on the way up, per level, the decoder
    fusion (by default trilinear up-sampling, concatenation with the skip and two 3×3×3 conv–norm–ReLU); then
    the head (by default a 1×1×1 convolution). See the module docstring. It has no attention gates:
    :class:`AttentionUNet3D` adds them.

    Args:
        in_channels: image channels (1 for CT).
        num_classes: output classes including background.
        filters: channels per level (at least 2 levels), default ``(16, 32, 64, 128, 256)`` (Oktay et al.'s 3D
            CT network).
        norm: ``instance`` | ``batch`` | ``group``.
        deep_supervision: add a 1×1×1 head per decoder level (used in training only).
        pool_kernels: per pooling step (``len(filters) - 1`` of them) the max-pool kernel (= stride) per
            axis, each 1 or 2; default all ``(2, 2, 2)``. The grid attention gate of a level uses the same
            factors for θ, so its coefficients lie on the gating signal's grid.
        blocks: the pluggable bottleneck, decoder fusion and head (:class:`UNetBlocks`); default none,
            concatenation and a 1×1×1 convolution.

    The class attribute ``grid_gates`` (False here; True in :class:`AttentionUNet3D`) decides the gates.

    Raises:
        ValueError: fewer than 2 levels, or malformed ``pool_kernels`` (:func:`check_pool_kernels`).

    Example:
        >>> net = UNet3D(1, 3).eval()
        >>> net(torch.randn(1, 1, 32, 48, 40)).shape
        torch.Size([1, 3, 32, 48, 40])
    """

    grid_gates = False

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        filters: Sequence[int] = (16, 32, 64, 128, 256),
        norm: str = "instance",
        deep_supervision: bool = True,
        pool_kernels: Sequence[Sequence[int]] | None = None,
        blocks: UNetBlocks = UNetBlocks(),
    ) -> None:
        super().__init__()
        filters = [int(f) for f in filters]
        if len(filters) < 2:
            raise ValueError(f"filters needs at least 2 levels, got {filters}")
        self.pool_kernels = check_pool_kernels(pool_kernels, len(filters) - 1)
        self.num_classes = num_classes
        self.filters = filters
        self.deep_supervision = deep_supervision
        depth = len(filters)

        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels if i == 0 else filters[i - 1], f, norm) for i, f in enumerate(filters)]
        )
        self.pools = nn.ModuleList([nn.MaxPool3d(k) for k in self.pool_kernels])  # no weights
        make_bottleneck, make_head = blocks.bottleneck, blocks.head
        self.bottleneck = make_bottleneck(filters[-1], num_classes, norm) if make_bottleneck else None

        # Gates on skip levels 1..depth-2 (0-based); level 0 (full resolution) is not gated.
        self.gates = nn.ModuleDict()
        if self.grid_gates:
            self.gating = ConvNormAct(filters[-1], filters[-1], kernel_size=1, norm=norm)
            for lvl in range(1, depth - 1):
                self.gates[str(lvl)] = GridAttentionGate3D(
                    filters[lvl],
                    filters[lvl + 1],
                    inter_channels=filters[lvl],
                    sub_sample=self.pool_kernels[lvl],
                    norm=norm,
                )
        make_fusion = blocks.fusion or ConcatFusion
        self.decoder = nn.ModuleList(
            [make_fusion(filters[lvl + 1], filters[lvl], filters[lvl], norm) for lvl in range(depth - 1)]
        )
        self.head = (
            make_head(filters[0], num_classes, norm) if make_head else nn.Conv3d(filters[0], num_classes, 1)
        )
        self.ds_heads = nn.ModuleList(
            [nn.Conv3d(filters[lvl], num_classes, 1) for lvl in range(1, depth - 1)]
            if deep_supervision
            else []
        )

    def level_factors(self) -> list[tuple[int, int, int]]:
        """Per level (0 = full resolution) how many input voxels one feature voxel spans, per axis."""
        factors = [(1, 1, 1)]
        for kernel in self.pool_kernels:
            factors.append(tuple(f * k for f, k in zip(factors[-1], kernel, strict=True)))
        return factors

    def _decode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list, dict]:
        """Run encoder + decoder; return (full-res feature, decoder features by level, alphas, aux)."""
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pools[i - 1](x))
            skips.append(x)
        aux: dict[str, torch.Tensor] = {}
        below = skips[-1]
        if self.bottleneck is not None:
            out = self.bottleneck(below)
            below, extra = out if isinstance(out, tuple) else (out, {})
            aux.update(extra)
        g = self.gating(below) if self.gates else None
        alphas: list[torch.Tensor] = []
        decoded: list[torch.Tensor] = [below]
        for lvl in range(len(self.filters) - 2, -1, -1):
            skip = skips[lvl]
            if str(lvl) in self.gates:
                gate_signal = g if lvl == len(self.filters) - 2 else below
                skip, alpha = self.gates[str(lvl)](skip, gate_signal)
                alphas.insert(0, alpha)
            below = self.decoder[lvl](below, skip)
            decoded.insert(0, below)
        return below, decoded, alphas, aux

    def _apply_head(self, feat: torch.Tensor, aux: dict) -> torch.Tensor:
        out = self.head(feat)
        if isinstance(out, tuple):
            out, extra = out
            aux.update(extra)
        return out

    @torch.no_grad()
    def init_class_prior(self, log_prior: torch.Tensor) -> None:
        """Bias every output head towards the class prior, ``bias = log p(k)``.

        The prior initialisation of Lin et al. 2017 (Focal Loss, Sec. 4.1): training starts from the class
        frequencies instead of a uniform softmax, so the first iterations are not spent suppressing the
        small classes everywhere (what it did on the phantoms: ``docs/design.md``, section
        ``medseg.nets.unet``). ``log_prior``: ``(K,)``. Heads that are not a plain convolution provide their
        own ``init_class_prior``; other heads are left as they are.
        """
        heads = [*self.ds_heads, self.head]
        for head in heads:
            if isinstance(head, nn.Conv3d):
                head.bias.copy_(log_prior)
            elif hasattr(head, "init_class_prior"):
                head.init_class_prior(log_prior)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-resolution logits and the penultimate (last decoder) feature map, for multi-scale wrappers."""
        feat, _, _, aux = self._decode(x)
        return self._apply_head(feat, aux), feat

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        feat, decoded, alphas, aux = self._decode(x)
        logits = self._apply_head(feat, aux)
        if not self.training:
            return (logits, alphas) if return_attention else logits
        outputs = [logits] + [head(decoded[i + 1]) for i, head in enumerate(self.ds_heads)]
        result = {"logits": outputs, "aux": aux}
        if return_attention:
            result["attention"] = alphas
        return result


class AttentionUNet3D(UNet3D):
    """The 3D Attention U-Net of Oktay et al. 2018: :class:`UNet3D` with grid attention gates on skip levels
    2..L-1 (Eq. 1-2 of the paper, :class:`~medseg.nets.blocks.grid_attention.GridAttentionGate3D`)."""

    grid_gates = True


def check_pool_kernels(kernels: Sequence[Sequence[int]] | None, steps: int) -> list[tuple[int, int, int]]:
    """``steps`` pooling kernels ``(kx, ky, kz)`` with entries 1 or 2; ``None`` → all ``(2, 2, 2)``.

    Raises:
        ValueError: a wrong number of steps, or a kernel that is not three values of 1 or 2.
    """
    if kernels is None:
        return [(2, 2, 2)] * steps
    out = [tuple(int(k) for k in kernel) for kernel in kernels]
    if len(out) != steps or any(len(k) != 3 or not set(k) <= {1, 2} for k in out):
        raise ValueError(
            f"pool_kernels: expected {steps} kernels of three values 1 or 2 (one per pooling), got {kernels}"
        )
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
