"""``Softmax(dim)`` module over ``tformer.ops.softmax``."""

from __future__ import annotations

import torch
from torch import nn

from tformer import ops


class Softmax(nn.Module):
    """Like ``torch.nn.Softmax(dim)``, plus the op's ``mask`` and ``scale``:
    ``forward(x, mask=None, scale=1.0)`` is ``softmax(x * scale + mask)`` along ``dim``. A bool
    mask is True where an entry takes part; a row where nothing takes part gives zeros, not NaN."""

    def __init__(self, dim: int = -1, *, backend: str | None = None):
        super().__init__()
        self.dim = dim
        self.backend = backend

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        return ops.softmax(x, self.dim, scale=scale, mask=mask, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend!r}"
