"""Losses that accept DynUNet's stacked deep-supervision output."""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss
from torch import nn


class StackedDeepSupervisionLoss(nn.Module):
    """MONAI's ``DeepSupervisionLoss`` for DynUNet, whose training output stacks the heads on dim 1.

    DynUNet returns ``(B, 1 + deep_supr_num, C, *spatial)`` in training mode (every head upsampled to full
    size) and ``(B, C, *spatial)`` in eval mode; both are accepted.

    Args:
        loss: the per-head loss, e.g. ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``.
        weight_mode: head weights as in MONAI (``"exp"`` halves each deeper head's weight, like nnU-Net).

    Example::

        loss = StackedDeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
        value = loss(net(images), labels)
    """

    def __init__(self, loss: nn.Module, weight_mode: str = "exp") -> None:
        super().__init__()
        self.loss = DeepSupervisionLoss(loss, weight_mode=weight_mode)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.dim() == target.dim() + 1:
            return self.loss(list(torch.unbind(pred, dim=1)), target)
        return self.loss(pred, target)
