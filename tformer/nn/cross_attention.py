"""``CrossAttention``: queries from one sequence, keys and values from another (the decoder
reading the encoder's output), with the encoder's key padding mask."""

from __future__ import annotations

import torch
from torch import nn

from tformer import ops


class CrossAttention(nn.Module):
    """Multi-head attention of ``(B, Sq, d_model)`` queries over ``(B, Sk, d_model)`` memory.

    ``q`` projects the queries; one fused ``kv`` linear layer projects the memory to keys then
    values. At inference the memory is fixed, so :meth:`project_memory` runs once per utterance
    and every decoding step reuses its ``(k, v)`` (the "cached encoder projection").
    """

    def __init__(self, d_model: int, num_heads: int, *, bias: bool = True, attn_dropout: float = 0.0,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"CrossAttention: d_model={d_model} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.attn_dropout = attn_dropout
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        self.q = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=bias, **factory)
        self.proj = nn.Linear(d_model, d_model, bias=bias, **factory)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory ``(B, Sk, d_model)`` -> ``(k, v)``, each ``(B, H, Sk, D)``."""
        batch, length, _ = memory.shape
        k, v = self.kv(memory).chunk(2, dim=-1)
        k = k.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], *,
                memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x ``(B, Sq, d_model)``; ``memory_kv`` from :meth:`project_memory`;
        ``memory_padding_mask`` ``(B, Sk)`` bool, True = padding frame. Returns ``(B, Sq, d_model)``."""
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = memory_kv
        dropout_p = self.attn_dropout if self.training else 0.0
        out = ops.attention(q, k, v, key_padding_mask=memory_padding_mask, dropout_p=dropout_p, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))
