"""Reference attention: materializes the (Sq, Sk) scores; the definition of correct."""

import torch

from tformer.ops.attention_mask import Band, allowed_keys
from tformer.ops.registry import register

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
              band: Band, softcap: float = 0.0):
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
                     dropout_p, return_lse, band: Band, softcap: float = 0.0):
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
