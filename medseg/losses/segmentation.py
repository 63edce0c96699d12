"""Segmentation loss over every output a network produces in training.

Thin wrapper over MONAI: ``DiceCELoss`` (soft Dice + cross-entropy, Milletari et al. 2016) on the main
output, MONAI's ``DeepSupervisionLoss`` for the deep-supervision list (targets resized with nearest
neighbour), the same Dice+CE on every auxiliary segmentation output (DANet branches, the reverse-attention
branches, per-scale logits) and binary cross-entropy on presence logits (EncNet's SE-loss).

Network output contract (see :mod:`medseg.nets.unet`): in training a dict ``{"logits": [full, level2, ...],
"aux": {name: tensor}}``; a plain tensor is also accepted (no deep supervision).

The loss is computed in float32 whatever dtype the network's outputs have: logits from a bfloat16 / float16
autocast forward are upcast here (``.float()``, free for float32), so softmax, log-softmax and the Dice sums
never run in 8-bit-mantissa arithmetic — PyTorch's AMP recipe (the CUDA autocast runs these ops in float32;
the CPU autocast does not, so the upcast is explicit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

from medseg.losses.targets import presence_targets


class SegmentationLoss(nn.Module):
    """Dice+CE with deep-supervision weights, auxiliary segmentation outputs and the SE presence loss.

    Args:
        num_classes: number of classes (for presence targets).
        dice_weight, ce_weight: λ of the soft Dice and cross-entropy terms (MONAI ``DiceCELoss``).
        deep_supervision_weights: weight per element of the logits list (full resolution first); missing
            entries continue the halving pattern.
        aux_weight: weight of every 5-D auxiliary output (segmentation logits).
        se_weight: weight of every 2-D auxiliary output (presence logits, BCE).
    """

    def __init__(
        self,
        num_classes: int,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        deep_supervision_weights: list[float] | None = None,
        aux_weight: float = 0.4,
        se_weight: float = 0.2,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dice_ce = DiceCELoss(
            to_onehot_y=True, softmax=True, batch=True, lambda_dice=dice_weight, lambda_ce=ce_weight
        )
        self.ds_weights = list(deep_supervision_weights or [1.0])
        self.aux_weight = aux_weight
        self.se_weight = se_weight

    def _ds_loss(self, logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        weights = self.ds_weights + [self.ds_weights[-1] * 0.5**i for i in range(1, 1 + len(logits))]
        return DeepSupervisionLoss(self.dice_ce, weights=weights[: len(logits)])(logits, target)

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        """``target``: integer labels ``(B, 1, D, H, W)``; ``outputs`` in any float dtype (see module docstring)."""
        target = target.float()
        if isinstance(outputs, torch.Tensor):
            return self.dice_ce(outputs.float(), target)
        loss = self._ds_loss([logits.float() for logits in outputs["logits"]], target)
        for aux in outputs.get("aux", {}).values():
            aux = aux.float()
            if aux.ndim == 2:
                loss = loss + self.se_weight * F.binary_cross_entropy_with_logits(
                    aux, presence_targets(target, self.num_classes)
                )
            else:
                small = (
                    target
                    if aux.shape[2:] == target.shape[2:]
                    else F.interpolate(target, size=aux.shape[2:], mode="nearest-exact")
                )
                loss = loss + self.aux_weight * self.dice_ce(aux, small)
        return loss


def build_loss(cfg, num_classes: int) -> SegmentationLoss:
    """Loss from the ``loss`` section of a :class:`medseg.config.Config`."""
    c = cfg.loss
    return SegmentationLoss(
        num_classes,
        dice_weight=c.dice_weight,
        ce_weight=c.ce_weight,
        deep_supervision_weights=list(c.deep_supervision_weights),
        aux_weight=c.aux_weight,
        se_weight=c.se_weight,
    )
