"""Losses as modules. Each returns a *sum* over items in float32 (logits may be bf16/fp16), so the
trainer can divide by the item count of the whole accumulated batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropySum(nn.Module):
    """Summed cross-entropy of ``logits`` ``(..., V)`` against ``targets`` ``(...)``; ``weights``
    (same shape as ``targets``, 0/1) drops items."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, *, weights: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> torch.Tensor:
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="none", label_smoothing=label_smoothing)
        if weights is not None:
            losses = losses * weights.reshape(-1).to(losses.dtype)
        return losses.sum()


class CtcSum(nn.Module):
    """Summed CTC loss (Graves et al. 2006) of encoder logits ``(B, S', V)`` with
    ``padding_mask`` ``(B, S')`` (True at padding) against ``targets`` ``(B, T)`` of
    ``target_lengths`` ``(B,)``; ``blank`` is the blank id. Infinite losses (an input shorter than
    its target) count as zero."""

    def __init__(self, blank: int):
        super().__init__()
        self.blank = blank

    def forward(self, logits: torch.Tensor, padding_mask: torch.Tensor, targets: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (S', B, V)
        return F.ctc_loss(log_probs, targets, (~padding_mask).sum(dim=1), target_lengths, blank=self.blank,
                          reduction="sum", zero_infinity=True)


_CROSS_ENTROPY = CrossEntropySum()


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`CrossEntropySum` as a function."""
    return _CROSS_ENTROPY(logits, targets, weights=weights, label_smoothing=label_smoothing)
