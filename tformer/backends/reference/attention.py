"""Reference attention: materializes the (Sq, Sk) scores; the definition of correct.

The only place in tformer that builds a score matrix: the fused kernels never do, and the
paths that must (attention weights for a visualizer or ``need_weights=True``, masks of any
shape that SDPA accepts) call :func:`attention_weights` or :func:`masked_attention` here.
"""

import torch
import torch.nn.functional as F

from tformer.ops.attention import resolve_scale
from tformer.ops.attention_mask import Band, allowed_keys, resolve_band, softcap_value
from tformer.ops.registry import register
from tformer.ops.validation import check_same, check_tensor

from .softmax import ALL_DEVICES, ALL_DTYPES, apply_mask, compute_dtype, safe_softmax


def attention_probabilities(q, k, *, band: Band, key_padding_mask, scale: float, softcap: float = 0.0):
    """The attention weights and log-sum-exp the reference attention uses (before dropout).

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` -> probabilities ``(B, Hq, Sq, Sk)`` in the
    compute dtype (float32, or float64 for float64 input) and lse ``(B, Hq, Sq)``. Exposed so
    that tools looking inside a model (``tformer.visualization``, ``tformer.ops.attention_weights``)
    read exactly these numbers. Soft-capping (Gemma 2) acts on the scaled scores, before the mask.
    """
    dtype = compute_dtype(q.dtype)
    # Grouped-query: query head h reads key/value head h // group.
    keys = k.to(dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q.to(dtype), keys.transpose(-1, -2)) * scale
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = apply_mask(scores, allowed_keys(q.shape[2], k.shape[2], band, key_padding_mask, q.device))
    return safe_softmax(scores)


@register("attention", "reference", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def attention(q, k, v, *, causal: bool, key_padding_mask, scale: float, dropout_p: float, return_lse: bool,
              band: Band, softcap: float = 0.0, deterministic: bool = False):
    # deterministic: always (autograd through plain matrix products, no atomics of its own).
    dtype = compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    values = v.to(dtype).repeat_interleave(group, dim=1)
    probs, lse = attention_probabilities(q, k, band=band, key_padding_mask=key_padding_mask, scale=scale,
                                         softcap=softcap)
    if dropout_p > 0.0:
        keep = torch.rand_like(probs) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    out = torch.matmul(probs, values).to(q.dtype)
    return (out, lse.float()) if return_lse else out


@register("attention_varlen", "reference", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                     dropout_p, return_lse, band: Band, softcap: float = 0.0, deterministic: bool = False):
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    # Spare tokens after the last offset belong to no sequence: zero outputs, lse -inf (and,
    # through the index_put below, zero gradients).
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    pieces, lses = [], []
    for i in range(len(starts_q) - 1):
        # (tokens, H, D) -> (1, H, tokens, D) for one sequence; bottom-right uses its own lengths.
        qi = q[starts_q[i]:starts_q[i + 1]].transpose(0, 1)[None]
        ki = k[starts_k[i]:starts_k[i + 1]].transpose(0, 1)[None]
        vi = v[starts_k[i]:starts_k[i + 1]].transpose(0, 1)[None]
        out_i, lse_i = attention(qi, ki, vi, causal=causal, key_padding_mask=None, scale=scale, dropout_p=dropout_p,
                                 return_lse=True, band=band, softcap=softcap)
        pieces.append(out_i[0].transpose(0, 1))
        lses.append(lse_i[0])
    used = starts_q[-1]
    out = torch.cat([*pieces, out[used:]], dim=0) if pieces else out
    lse = torch.cat([*lses, lse[:, used:]], dim=1) if lses else lse
    return (out, lse) if return_lse else out


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, alignment: str = "top_left",
                      window: tuple[int, int] | None = None, softcap: float = 0.0,
                      key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The attention probabilities ``(B, Hq, Sq, Sk)`` that ``tformer.ops.attention`` applies to v
    (before dropout), with the same arguments, in float32 (float64 for float64 inputs). Fully
    masked rows are zeros. For looking inside a model (``tformer.visualization``) and for tests."""
    op = "attention_weights"
    check_tensor(op, "q", q, ndim=4)
    check_tensor(op, "k", k, ndim=4)
    check_same(op, "q", q, k=k)
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{op}: q has {q.shape[1]} heads and k has {k.shape[1]}; the number of query heads must be "
                         f"a multiple of the number of key heads")
    band = resolve_band(op, causal, window, alignment)
    probs, _ = attention_probabilities(q, k, band=band, softcap=softcap_value(op, softcap),
                                       key_padding_mask=key_padding_mask, scale=resolve_scale(op, scale, q.shape[-1]))
    return probs


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, *,
                     scale: float, dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(query @ key^T * scale + mask) @ value, weights)`` for any mask SDPA takes: bool
    (True = takes part) or float (added to the scaled scores), broadcast to ``(..., Sq, Sk)``;
    key/value heads already repeated to the query's. The softmax is the reference softmax
    (float32 inside; fully masked rows give zeros). The weights are returned after dropout, as
    ``torch.nn.MultiheadAttention`` returns them."""
    from .softmax import softmax

    scores = torch.matmul(query, key.transpose(-1, -2))
    weights = softmax(scores, scale=scale, mask=None if mask is None else mask.expand_as(scores))
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, value), weights
