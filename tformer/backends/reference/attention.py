"""Reference attention: materializes the (Sq, Sk) scores; the definition of correct."""

import torch

from tformer.ops.registry import register

from .softmax import ALL_DEVICES, ALL_DTYPES, apply_mask, compute_dtype, safe_softmax


def allowed_keys(seq_q: int, seq_k: int, causal: bool, key_padding_mask, device) -> torch.Tensor | None:
    """Bool (B or 1, 1, Sq, Sk): True where query i may attend key j, or None for all."""
    allowed = None
    if causal:  # top-left aligned, as SDPA's is_causal
        allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return allowed


def attention_probabilities(q, k, *, causal: bool, key_padding_mask, scale: float):
    """The attention weights and log-sum-exp the reference attention uses (before dropout).

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` -> probabilities ``(B, Hq, Sq, Sk)`` in the
    compute dtype (float32, or float64 for float64 input) and lse ``(B, Hq, Sq)``. Exposed so
    that tools looking inside a model (``tformer.visualization``) read exactly these numbers.
    """
    dtype = compute_dtype(q.dtype)
    # Grouped-query: query head h reads key/value head h // group.
    keys = k.to(dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q.to(dtype), keys.transpose(-1, -2)) * scale
    scores = apply_mask(scores, allowed_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device))
    return safe_softmax(scores)


@register("attention", "reference", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def attention(q, k, v, *, causal: bool, key_padding_mask, scale: float, dropout_p: float, return_lse: bool):
    dtype = compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    values = v.to(dtype).repeat_interleave(group, dim=1)
    probs, lse = attention_probabilities(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if dropout_p > 0.0:
        keep = torch.rand_like(probs) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    out = torch.matmul(probs, values).to(q.dtype)
    return (out, lse.float()) if return_lse else out


@register("attention_varlen", "reference", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                     dropout_p, return_lse):
    outs, lses = [], []
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        # (tokens, H, D) -> (1, H, tokens, D) for one sequence.
        qi = q[starts_q[i]:starts_q[i + 1]].transpose(0, 1)[None]
        ki = k[starts_k[i]:starts_k[i + 1]].transpose(0, 1)[None]
        vi = v[starts_k[i]:starts_k[i + 1]].transpose(0, 1)[None]
        out, lse = attention(qi, ki, vi, causal=causal, key_padding_mask=None, scale=scale, dropout_p=dropout_p,
                             return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=1)) if return_lse else out
