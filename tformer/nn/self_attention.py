"""``SelfAttention``: the attention sublayer of :class:`TransformerBlock` (fused qkv projection,
grouped-query heads, optional rotary positions, optional KV cache)."""

from __future__ import annotations

import torch
from torch import nn

from tformer import ops


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``(B, T, d_model)``, batch first.

    One ``qkv`` linear layer projects to ``d_model + 2 * num_kv_heads * head_dim`` features
    (queries, then keys, then values); ``num_kv_heads < num_heads`` is grouped-query attention
    (Ainslie et al., 2023), which shrinks the KV cache by ``num_heads / num_kv_heads``.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, bias: bool = True,
                 attn_dropout: float = 0.0, causal: bool = True, layer_index: int = 0,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"SelfAttention: d_model={d_model} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"SelfAttention: argument 'num_kv_heads' must be a positive divisor of "
                             f"num_heads={num_heads}, got {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.attn_dropout = attn_dropout
        self.causal = causal
        self.layer_index = layer_index
        self.backend = backend
        kv_dim = num_kv_heads * self.head_dim
        self.split_sizes = (d_model, kv_dim, kv_dim)
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=bias, device=device, dtype=dtype)
        self.proj = nn.Linear(d_model, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None, positional=None,
                position_offset: int = 0, kv_cache=None) -> torch.Tensor:
        """x ``(B, T, d_model)`` at absolute positions ``position_offset ..``;
        ``key_padding_mask`` ``(B, T)`` bool, True = padding; ``positional`` a
        :class:`~tformer.nn.positional.PositionalEncoding` whose ``rotate_queries_keys`` is
        applied (the identity except for RoPE); ``kv_cache`` an object with
        ``update(layer_index, k, v, start) -> (k_all, v_all)`` (see ``tformer.models.KVCache``)."""
        batch, length, _ = x.shape
        q, k, v = self.project_qkv(x, positional=positional, position_offset=position_offset)
        dropout_p = self.attn_dropout if self.training else 0.0

        if kv_cache is not None:
            if not self.causal:
                raise ValueError("SelfAttention: a kv_cache is only meaningful for causal attention")
            if key_padding_mask is not None:
                raise ValueError("SelfAttention: key_padding_mask is not supported together with a kv_cache")
            k, v = kv_cache.update(self.layer_index, k, v, position_offset)
        # With a cache, the T new queries are the last T of the S keys: causal aligned at the
        # bottom-right corner (query i sees keys j <= S - T + i), which also covers one-token
        # decoding and chunked prefill. Without one, queries and keys start together.
        alignment = "bottom_right" if kv_cache is not None else "top_left"
        out = ops.attention(q, k, v, causal=self.causal, alignment=alignment, key_padding_mask=key_padding_mask,
                            dropout_p=dropout_p, backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.proj(out)

    def project_qkv(self, x: torch.Tensor, *, positional=None, position_offset: int = 0):
        """x ``(B, T, d_model)`` -> q ``(B, H, T, D)``, k and v ``(B, Hkv, T, D)``, rotated by
        ``positional`` (RoPE) as the attention op receives them."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
        # (B, T, H * D) -> (B, H, T, D)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if positional is not None:
            q, k = positional.rotate_queries_keys(q, k, position_offset)
        return q, k, v
