"""Loss functions for the imbalanced two-class problem."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_t)^gamma, optional class weights."""

    def __init__(self, weight: torch.Tensor | None = None, gamma: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
        loss = -((1.0 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights n / (k * n_c), so each class carries equal total weight."""
    total, k = sum(counts), len(counts)
    return torch.tensor([total / (k * c) for c in counts], dtype=torch.float32)


def build_loss(name: str, counts: list[int], gamma: float = 2.0) -> nn.Module:
    """``weighted_ce``, ``ce`` or ``focal`` (class-weighted) for the given class counts."""
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "weighted_ce":
        return nn.CrossEntropyLoss(weight=class_weights(counts))
    if name == "focal":
        return FocalLoss(class_weights(counts), gamma)
    raise ValueError(f"unknown loss {name!r}; choose one of weighted_ce, ce, focal")
