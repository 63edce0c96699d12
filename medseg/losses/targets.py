"""Targets derived from a label map for auxiliary losses."""

from __future__ import annotations

import torch


def presence_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Which classes occur in each sample: ``(B, num_classes)`` float tensor of 0/1 (SE-loss targets).

    Args:
        labels: integer label map ``(B, 1, D, H, W)`` or ``(B, D, H, W)``. Values outside
            ``[0, num_classes)`` (e.g. an ignore index such as 255) are ignored.
        num_classes: number of classes.

    Example:
        >>> presence_targets(torch.tensor([[[[0, 2]]], [[[1, 1]]]]), 3)
        tensor([[1., 0., 1.],
                [0., 1., 0.]])
    """
    if labels.dim() not in (4, 5):
        raise ValueError(f"labels must be (B, 1, D, H, W) or (B, D, H, W), got shape {tuple(labels.shape)}")
    flat = labels.reshape(labels.shape[0], -1).long()
    valid = (flat >= 0) & (flat < num_classes)
    index = torch.where(valid, flat, torch.full_like(flat, num_classes))  # invalid → extra bin
    counts = torch.zeros(flat.shape[0], num_classes + 1, dtype=torch.float32, device=labels.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return (counts[:, :num_classes] > 0).float()
