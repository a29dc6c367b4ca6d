"""``Attention``: the one attention sublayer of :class:`~tformer.nn.TransformerBlock`, self-attention
(fused qkv projection, grouped-query heads, optional rotary positions, optional KV cache) or
cross-attention (queries from one sequence, keys and values from another: the decoder reading
the encoder's output). Both run ``tformer.ops.attention``; neither builds a score matrix."""

from __future__ import annotations

import torch
from torch import nn

from tformer import ops


class Attention(nn.Module):
    """Multi-head attention on ``(B, T, d_model)``, batch first.

    Self-attention (``cross=False``): one ``qkv`` linear layer projects to ``d_model + 2 *
    num_kv_heads * head_dim`` features (queries, then keys, then values); ``num_kv_heads <
    num_heads`` is grouped-query attention (Ainslie et al., 2023), which shrinks the KV cache by
    ``num_heads / num_kv_heads``.

    Cross-attention (``cross=True``): ``q`` projects the queries and one fused ``kv`` layer
    projects the memory (the encoder output) to keys then values. At inference the memory is
    fixed, so :meth:`project_memory` runs once per input and every decoding step reuses its
    ``(k, v)`` (the "cached encoder projection"). It has no causal order.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, cross: bool = False,
                 bias: bool = True, attn_dropout: float = 0.0, causal: bool = False, layer_index: int = 0,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"Attention: d_model={d_model} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"Attention: argument 'num_kv_heads' must be a positive divisor of "
                             f"num_heads={num_heads}, got {num_kv_heads}")
        if cross and causal:
            raise ValueError("Attention: cross-attention (cross=True) has no causal order; pass causal=False")
        self.cross = cross
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.attn_dropout = attn_dropout
        self.causal = causal
        self.layer_index = layer_index
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        kv_dim = num_kv_heads * self.head_dim
        # The parameter names (qkv; q and kv) are the state-dict keys of saved checkpoints.
        if cross:
            self.q = nn.Linear(d_model, d_model, bias=bias, **factory)
            self.kv = nn.Linear(d_model, 2 * kv_dim, bias=bias, **factory)
        else:
            self.split_sizes = (d_model, kv_dim, kv_dim)
            self.qkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=bias, **factory)
        self.proj = nn.Linear(d_model, d_model, bias=bias, **factory)

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                key_padding_mask: torch.Tensor | None = None, memory_padding_mask: torch.Tensor | None = None,
                positional=None, position_offset: int = 0, kv_cache=None) -> torch.Tensor:
        """x ``(B, T, d_model)`` -> ``(B, T, d_model)``.

        Self-attention: x at absolute positions ``position_offset ..``; ``key_padding_mask``
        ``(B, T)`` bool, True = padding; ``positional`` a
        :class:`~tformer.nn.positional.PositionalEncoding` whose ``rotate_queries_keys`` is
        applied (the identity except for RoPE); ``kv_cache`` an object with
        ``update(layer_index, k, v, start) -> (k_all, v_all)`` (see ``tformer.models.KVCache``).

        Cross-attention: ``memory_kv`` from :meth:`project_memory`; ``memory_padding_mask``
        ``(B, Sk)`` bool, True = padding frame of the memory.
        """
        if self.cross:
            return self._cross_forward(x, memory_kv, memory_padding_mask, key_padding_mask, kv_cache)
        if memory_kv is not None or memory_padding_mask is not None:
            raise ValueError("Attention: 'memory_kv' and 'memory_padding_mask' are for cross-attention "
                             "(cross=True); this layer is self-attention")
        batch, length, _ = x.shape
        q, k, v = self.project_qkv(x, positional=positional, position_offset=position_offset)
        if kv_cache is not None:
            if not self.causal:
                raise ValueError("Attention: a kv_cache is only meaningful for causal attention")
            if key_padding_mask is not None:
                raise ValueError("Attention: key_padding_mask is not supported together with a kv_cache")
            k, v = kv_cache.update(self.layer_index, k, v, position_offset)
        # With a cache, the T new queries are the last T of the S keys: causal aligned at the
        # bottom-right corner (query i sees keys j <= S - T + i), which also covers one-token
        # decoding and chunked prefill. Without one, queries and keys start together.
        alignment = "bottom_right" if kv_cache is not None else "top_left"
        out = ops.attention(q, k, v, causal=self.causal, alignment=alignment, key_padding_mask=key_padding_mask,
                            dropout_p=self._dropout_p(), backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _cross_forward(self, x, memory_kv, memory_padding_mask, key_padding_mask, kv_cache) -> torch.Tensor:
        if memory_kv is None:
            raise ValueError("Attention: cross-attention needs argument 'memory_kv' (from project_memory)")
        if key_padding_mask is not None or kv_cache is not None:
            raise ValueError("Attention: cross-attention takes 'memory_padding_mask' for the memory's padding; "
                             "'key_padding_mask' and 'kv_cache' are for self-attention")
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = memory_kv
        out = ops.attention(q, k, v, key_padding_mask=memory_padding_mask, dropout_p=self._dropout_p(),
                            backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _dropout_p(self) -> float:
        return self.attn_dropout if self.training else 0.0

    def project_qkv(self, x: torch.Tensor, *, positional=None, position_offset: int = 0):
        """Self-attention: x ``(B, T, d_model)`` -> q ``(B, H, T, D)``, k and v ``(B, Hkv, T, D)``,
        rotated by ``positional`` (RoPE) as the attention op receives them."""
        if self.cross:
            raise ValueError("Attention: project_qkv is for self-attention; cross-attention projects its "
                             "memory with project_memory")
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split_with_sizes(self.split_sizes, dim=-1)
        # (B, T, H * D) -> (B, H, T, D)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if positional is not None:
            q, k = positional.rotate_queries_keys(q, k, position_offset)
        return q, k, v

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention: memory ``(B, Sk, d_model)`` -> ``(k, v)``, each ``(B, Hkv, Sk, D)``."""
        if not self.cross:
            raise ValueError("Attention: project_memory is for cross-attention (cross=True)")
        batch, length, _ = memory.shape
        k, v = self.kv(memory).chunk(2, dim=-1)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v
