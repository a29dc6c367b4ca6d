"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` over ``tformer.ops``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tformer import ops
from tformer.backends.reference.attention import masked_attention


class MultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention``: the same constructor, parameters,
    state_dict keys (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
    ``out_proj.bias``; ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when ``kdim`` or
    ``vdim`` differ from ``embed_dim``), initialization and ``forward`` contract. A torch
    state_dict loads with ``strict=True``.

    Extras (keyword-only): ``backend`` (passed to the ops; None takes the default) and
    ``num_kv_heads`` (grouped-query attention: k and v get ``num_kv_heads`` heads, so
    ``in_proj_weight`` is ``(E + 2 * E * num_kv_heads / num_heads, E)``).

    Two paths:

    - fast: ``need_weights=False`` and no ``attn_mask`` (or one flagged as the causal mask by
      ``is_causal=True``, which is trusted, as torch does) runs ``tformer.ops.attention``,
      which never materializes the ``(L, S)`` weights.
    - weights: ``need_weights=True`` (torch's default!) or an explicit ``attn_mask``
      materializes the weights with the reference math
      (``tformer.backends.reference.attention.masked_attention``), since they must be returned
      or the mask is arbitrary.
      Pass ``need_weights=False`` to get the fused kernels.

    Differences from torch: ``is_causal=True`` with ``attn_mask=None`` means a causal mask
    (torch requires the mask); a query whose keys are all masked gives zeros, not NaN;
    ``key_padding_mask`` must be bool (True = padding); ``add_bias_kv`` and
    ``add_zero_attn`` are not supported.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: str | None = None, num_kv_heads: int | None = None):
        super().__init__()
        if add_bias_kv:
            raise NotImplementedError("MultiheadAttention: add_bias_kv=True is not supported by tformer "
                                      "(use torch.nn.MultiheadAttention for it)")
        if add_zero_attn:
            raise NotImplementedError("MultiheadAttention: add_zero_attn=True is not supported by tformer "
                                      "(use torch.nn.MultiheadAttention for it)")
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"MultiheadAttention: argument 'embed_dim' must be a positive int, got {embed_dim!r}")
        if not isinstance(num_heads, int) or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"MultiheadAttention: argument 'num_heads' must be a positive divisor of "
                             f"embed_dim={embed_dim}, got {num_heads!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"MultiheadAttention: argument 'num_kv_heads' must be a positive divisor of "
                             f"num_heads={num_heads}, got {num_kv_heads!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadAttention: argument 'dropout' must be a float in [0, 1), got {dropout!r}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kv_dim = self.head_dim * num_kv_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.backend = backend
        # torch keeps these attributes; code that inspects them keeps working.
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(embed_dim + 2 * self.kv_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(self.kv_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(self.kv_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * self.kv_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialization: Xavier-uniform projections, zero biases;
        # out_proj keeps nn.Linear's default weight init.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    # ----------------------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """query ``(L, N, E)`` (``(N, L, E)`` with batch_first, ``(L, E)`` unbatched), key
        ``(S, N, kdim)``, value ``(S, N, vdim)``; ``key_padding_mask`` ``(N, S)`` bool, True =
        padding; ``attn_mask`` ``(L, S)`` or ``(N * num_heads, L, S)``, bool (True = not
        allowed, as torch) or float (added to the scores).

        Returns ``(output, weights)``: output shaped like query; weights ``(N, L, S)`` averaged
        over heads, or ``(N, num_heads, L, S)`` with ``average_attn_weights=False``, or None when
        ``need_weights=False``.
        """
        unbatched = query.dim() == 2
        if query.dim() not in (2, 3):
            raise ValueError(f"MultiheadAttention: argument 'query' must have 2 (unbatched) or 3 dimensions, got "
                             f"shape {tuple(query.shape)}")
        for name, tensor in (("key", key), ("value", value)):
            if tensor.dim() != query.dim():
                raise ValueError(f"MultiheadAttention: argument '{name}' has shape {tuple(tensor.shape)}, expected "
                                 f"{query.dim()} dimensions like query {tuple(query.shape)}")
        if key_padding_mask is not None and key_padding_mask.is_floating_point():
            key_padding_mask = _float_padding_to_bool(key_padding_mask)
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # From here: (L, N, E), the layout torch's functional path uses.
        seq_q, batch, _ = query.shape
        seq_k = key.shape[0]
        self._check_inputs(query, key, value, key_padding_mask, attn_mask, batch, seq_q, seq_k)

        q, k, v = self._project(query, key, value)
        # (L, N, H * D) -> (N, H, L, D)
        q = q.view(seq_q, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        k = k.view(seq_k, batch, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        v = v.view(seq_k, batch, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if not need_weights and (attn_mask is None or is_causal):
            out = ops.attention(q, k, v, causal=is_causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                backend=self.backend)
        else:
            out, weights = self._attention_with_weights(q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p)
            if need_weights:
                weights = weights.mean(dim=1) if average_attn_weights else weights
                weights = weights.squeeze(0) if unbatched else weights
            else:
                weights = None

        out = out.permute(2, 0, 1, 3).reshape(seq_q, batch, self.embed_dim)  # (N, H, L, D) -> (L, N, E)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask, batch, seq_q, seq_k) -> None:
        for name, tensor, features in (("query", query, self.embed_dim), ("key", key, self.kdim),
                                       ("value", value, self.vdim)):
            if tensor.shape[-1] != features or tensor.shape[1] != batch:
                raise ValueError(f"MultiheadAttention: argument '{name}' has shape {tuple(tensor.shape)} "
                                 f"(as (L, N, E) after batch_first handling); expected batch {batch} and "
                                 f"{features} features")
        if value.shape[0] != seq_k:
            raise ValueError(f"MultiheadAttention: 'key' has {seq_k} positions but 'value' has {value.shape[0]}")
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(f"MultiheadAttention: argument 'key_padding_mask' must be bool (True = padding) or "
                                f"float (0 = keep, -inf = padding), got dtype {key_padding_mask.dtype}")
            if tuple(key_padding_mask.shape) != (batch, seq_k):
                raise ValueError(f"MultiheadAttention: argument 'key_padding_mask' must have shape (N, S) = "
                                 f"{(batch, seq_k)}, got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            allowed = ((seq_q, seq_k), (batch * self.num_heads, seq_q, seq_k))
            if tuple(attn_mask.shape) not in allowed:
                raise ValueError(f"MultiheadAttention: argument 'attn_mask' must have shape (L, S) = {allowed[0]} "
                                 f"or (N * num_heads, L, S) = {allowed[1]}, got {tuple(attn_mask.shape)}")
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(f"MultiheadAttention: argument 'attn_mask' must be bool or floating point, got "
                                f"dtype {attn_mask.dtype}")

    def _project(self, query, key, value):
        bias_q = bias_k = bias_v = None
        if self.in_proj_bias is not None:
            bias_q, bias_k, bias_v = self.in_proj_bias.split([self.embed_dim, self.kv_dim, self.kv_dim])
        if self._qkv_same_embed_dim:
            weight_q, weight_k, weight_v = self.in_proj_weight.split([self.embed_dim, self.kv_dim, self.kv_dim])
        else:
            weight_q, weight_k, weight_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, weight_q, bias_q), F.linear(key, weight_k, bias_k), F.linear(value, weight_v, bias_v)

    def _attention_with_weights(self, q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p):
        """Materialized attention: returns out ``(N, H, L, D)`` and weights ``(N, H, L, S)``
        (after dropout, as torch returns them)."""
        batch, _, seq_q, _ = q.shape
        seq_k = k.shape[2]
        group = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        allowed = None  # bool, True = takes part, broadcasts to (N, H, L, S)
        additive = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, self.num_heads, seq_q, seq_k)
            if attn_mask.dtype == torch.bool:
                allowed = ~attn_mask  # torch's MHA bool mask is True where NOT allowed
            else:
                additive = attn_mask.to(q.dtype)
        elif is_causal:
            allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
        if key_padding_mask is not None:
            keep = ~key_padding_mask[:, None, None, :]
            allowed = keep if allowed is None else allowed & keep
        mask = allowed
        if additive is not None:
            mask = additive if allowed is None else additive.masked_fill(~allowed, float("-inf"))
        return masked_attention(q, k, v, mask, scale=1.0 / math.sqrt(self.head_dim), dropout_p=dropout_p)


def _float_padding_to_bool(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """torch's float padding mask (0 = keep, -inf = padding; what nn.TransformerEncoderLayer
    passes after ``F._canonical_mask``) as tformer's bool mask (True = padding)."""
    padding = torch.isneginf(key_padding_mask)
    if not bool((key_padding_mask[~padding] == 0).all()):
        raise ValueError("MultiheadAttention: a float 'key_padding_mask' must hold only 0 (keep) and -inf (padding); "
                         "other additive values are not supported: pass attn_mask for them")
    return padding
