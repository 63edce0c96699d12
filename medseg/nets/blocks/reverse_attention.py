"""Reverse-attention segmentation head (Huang et al., 2017).

Huang Q., Xia C., Wu C., Li S., Wang Y., Song Y., Kuo C.-C. J., "Semantic Segmentation with Reverse
Attention", BMVC 2017, arXiv:1707.06426.

A plain segmentation head learns what *is* each class. The reverse-attention network (RAN) adds a
second classifier that learns what is *not* each class and uses it where the first one is unsure.
The head has three branches fed by the same feature map ``X``:

    P_org = CONV_org(X)                  original branch: ordinary class logits
    F_rev = CONV_rev(X)                  reverse branch: "not-class-c" evidence
    NEG(F_rev) = −F_rev                  supervised with the ordinary labels (Fig. 2, NEG block), so
                                         F_rev is pushed *down* where class c is present
    A     = sigmoid(−P_org)              reverse-attention mask, per class and voxel: ≈1 where the
                                         original branch has low/negative evidence for c, ≈0 where
                                         it is already confident
    P     = P_org + A ⊙ NEG(F_rev)
          = P_org − A ⊙ F_rev            final prediction (element-wise sum of the original and the
                                         attention-weighted reverse prediction)

so the reverse branch only changes the logits of classes the original branch does not already
activate — typically the "confusion" regions between two classes.

Choice of CONV_org / CONV_rev (the paper uses DeepLab's fc layers on a 2D backbone): each branch is
``ConvNormAct(C, C, 3×3×3)`` followed by a 1×1×1 convolution (with bias) to ``num_classes`` logits.
The two branches share no weights.

Auxiliary outputs (training only), following medseg's convention:

* ``"ra_org"``: ``P_org`` — segmentation logits, supervised with the label map;
* ``"ra_neg"``: ``−F_rev`` — segmentation logits, supervised with the label map (this is how the NEG
  block trains the reverse branch).

Not implemented: the paper's variant that clips ``P_org`` before negation and its multi-level
(multi-resolution) fusion; this head works on one feature map.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.nets.blocks.common import ConvNormAct


def reverse_attention_fuse(p_org: torch.Tensor, f_rev: torch.Tensor) -> torch.Tensor:
    """Fuse original logits and reverse-branch output: ``P = P_org − sigmoid(−P_org) ⊙ F_rev``.

    Pure function of two equally shaped tensors (any shape), so it can be checked by hand:

        >>> p_org = torch.tensor([0.0, 2.0])
        >>> f_rev = torch.tensor([1.0, -1.0])
        >>> reverse_attention_fuse(p_org, f_rev)  # [0 − 0.5·1, 2 + sigmoid(−2)·1]
        tensor([-0.5000,  2.1192])
    """
    attention = torch.sigmoid(-p_org)
    return p_org - attention * f_rev


def _branch(in_channels: int, num_classes: int, norm: str) -> nn.Sequential:
    """``3×3×3 ConvNormAct(C→C)`` then ``1×1×1`` conv to class logits."""
    return nn.Sequential(
        ConvNormAct(in_channels, in_channels, kernel_size=3, norm=norm),
        nn.Conv3d(in_channels, num_classes, kernel_size=1, bias=True),
    )


class ReverseAttentionHead3D(nn.Module):
    """Segmentation head with original, reverse and reverse-attention branches (Huang et al. 2017).

    Args:
        in_channels: channels of the incoming decoder feature map.
        num_classes: number of output classes (logit channels).
        norm: normalisation of the 3×3×3 layer of each branch (``instance`` | ``batch`` | ``group``).

    ``forward(features)`` returns ``(P, aux)``: ``P`` are the fused logits ``(B, num_classes, D, H, W)``
    on the grid of ``features``; ``aux = {"ra_org": P_org, "ra_neg": −F_rev}`` in training and ``{}``
    in eval mode.

    Example:
        >>> head = ReverseAttentionHead3D(16, num_classes=3)
        >>> logits, aux = head(torch.randn(2, 16, 5, 7, 3))
        >>> logits.shape, sorted(aux)
        (torch.Size([2, 3, 5, 7, 3]), ['ra_neg', 'ra_org'])
    """

    def __init__(self, in_channels: int, num_classes: int, norm: str = "instance") -> None:
        super().__init__()
        self.conv_org = _branch(in_channels, num_classes, norm)
        self.conv_rev = _branch(in_channels, num_classes, norm)

    @torch.no_grad()
    def init_class_prior(self, log_prior: torch.Tensor) -> None:
        """Start from the class prior: ``P_org`` biased to log p(k) and the NEG-supervised ``−F_rev`` too.

        See :meth:`medseg.nets.unet.UNet3D.init_class_prior`.
        """
        self.conv_org[-1].bias.copy_(log_prior)
        self.conv_rev[-1].bias.copy_(-log_prior)

    def branches(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(P_org, F_rev)``, both ``(B, num_classes, D, H, W)``."""
        return self.conv_org(features), self.conv_rev(features)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p_org, f_rev = self.branches(features)
        fused = reverse_attention_fuse(p_org, f_rev)
        aux: dict[str, torch.Tensor] = {}
        if self.training:
            aux = {"ra_org": p_org, "ra_neg": -f_rev}
        return fused, aux
