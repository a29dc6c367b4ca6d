"""``Pooling``: one vector per sequence from a ``(B, S, D)`` hidden state, never reading padding."""

from __future__ import annotations

import torch
from torch import nn

from tformer.schema import check_choice

# cls: position 0 (a CLS token); mean: the average of the kept positions; max: their maximum.
POOLINGS: tuple[str, ...] = ("cls", "mean", "max")


class Pooling(nn.Module):
    """``forward(hidden (B, S, D), keep (B, S) bool or None) -> (B, D)``; ``keep`` True marks a
    token, None keeps every position.

    ``mean`` averages and ``max`` takes the maximum over the kept positions only; ``cls`` reads
    position 0. The forward pass never reads the mask's values on the host (no device sync), so a
    row with no kept position pools to zeros instead of raising: callers that want such rows
    refused call :meth:`check` where the mask is on the host already.
    """

    def __init__(self, mode: str):
        super().__init__()
        self.mode = check_choice("Pooling: argument 'mode'", mode, POOLINGS)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if hidden.dim() != 3:
            raise ValueError(f"Pooling: argument 'hidden' must be (B, S, D), got shape {tuple(hidden.shape)}")
        if keep is not None and tuple(keep.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"Pooling: argument 'keep' must have shape (B, S) = {tuple(hidden.shape[:2])}, got "
                             f"{tuple(keep.shape)}")
        if self.mode == "cls":
            return hidden[:, 0]
        if keep is None:
            return hidden.mean(dim=1) if self.mode == "mean" else hidden.amax(dim=1)
        mask = keep.bool().unsqueeze(-1)
        if self.mode == "max":
            pooled = hidden.masked_fill(~mask, float("-inf")).amax(dim=1)
            return pooled.masked_fill(~mask.any(dim=1), 0.0)  # an empty row: zeros, not -inf
        weights = mask.to(hidden.dtype)
        # A row that is all padding pools to zeros rather than 0/0.
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def check(self, keep: torch.Tensor, owner: str = "Pooling", argument: str = "keep") -> None:
        """Raise a ValueError naming the rows of ``keep (B, S)`` that have nothing to pool (all
        padding) or, for ``cls``, whose position 0 is padding (left padding hides the CLS token).
        Reads the mask's values: call it on a host tensor, not inside a device forward pass."""
        keep = keep.bool()
        empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{owner}: rows {empty} of '{argument}' are all padding; there is nothing to pool "
                             f"(every sequence needs at least one token)")
        if self.mode == "cls":
            hidden_cls = (~keep[:, 0]).nonzero().flatten().tolist()
            if hidden_cls:
                raise ValueError(f"{owner}: 'cls' pooling reads position 0, which is padding in rows {hidden_cls}; "
                                 f"pad on the right")
