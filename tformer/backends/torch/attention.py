"""Attention through ``F.scaled_dot_product_attention`` (cuDNN / FlashAttention / memory-efficient
kernels on a GPU, the fused CPU kernel or the math path on a CPU, as torch picks).

tformer's semantics on top of SDPA:
- The allowed-keys mask comes from :func:`allowed_keys` (one function, shared with the
  reference, so a new mask feature lands in both at once). Without a key padding mask a causal
  call passes ``is_causal=True`` instead, which SDPA aligns top-left as tformer does and which
  lets it keep its fastest kernels.
- A query row that may see no key returns zeros and gets zero gradients. SDPA gives NaN there;
  such rows are given every key (so the softmax stays finite) and their output is then zeroed,
  which also zeroes the gradient flowing back through them.
- Packed sequences (``attention_varlen``) are scattered into a padded batch with a key padding
  mask and gathered back: exact, and built from the offsets on the device without a host sync.
"""

import torch
import torch.nn.functional as F

from tformer.backends.reference.attention import allowed_keys
from tformer.ops.registry import register

from .softmax import ALL_DEVICES, ALL_DTYPES


def _lse(q, k, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """float32 log-sum-exp (B, Hq, Sq) of the scaled, masked scores: -inf for a row with no key.
    Only for return_lse=True; it builds the (Sq, Sk) scores SDPA avoids."""
    with torch.no_grad():
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        keys = k.to(dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = torch.matmul(q.to(dtype), keys.transpose(-1, -2)) * scale
        if is_causal:
            mask = allowed_keys(q.shape[2], k.shape[2], True, None, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.logsumexp(scores, dim=-1).float()


@register("attention", "torch", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def attention(q, k, v, *, causal: bool, key_padding_mask, scale: float, dropout_p: float, return_lse: bool):
    seq_q, seq_k = q.shape[2], k.shape[2]
    if seq_k == 0:  # no keys: every row is empty; the sums keep k and v in the graph (zero grads)
        out = q * 0.0 + (k.sum() + v.sum()) * 0.0
        return (out, q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)) if return_lse else out
    if scale < 0:  # SDPA's fused CPU kernel returns NaN under is_causal with a negative scale
        q, scale = -q, -scale
    mask, has_key, is_causal = None, None, False
    if key_padding_mask is None:
        is_causal = causal  # top-left: with Sk > 0 every row sees key 0
    else:
        mask = allowed_keys(seq_q, seq_k, causal, key_padding_mask, q.device)
        has_key = mask.any(dim=-1, keepdim=True)  # (B, 1, Sq, 1)
        mask = mask | ~has_key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if has_key is not None:
        out = out.masked_fill(~has_key, 0.0)
    if not return_lse:
        return out
    lse = _lse(q, k, mask if has_key is None else mask & has_key, is_causal, scale)
    return out, lse


def _padded_index(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position) of each packed token, computed on the device from the offsets."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:], tokens, right=True)
    return seq, (tokens - cu_seqlens[seq]).long()


def _to_padded(x: torch.Tensor, index, num_seqs: int, max_len: int) -> torch.Tensor:
    """(total, H, D) packed -> (B, H, max_len, D) zero-padded."""
    padded = x.new_zeros(num_seqs, max_len, *x.shape[1:])
    return padded.index_put(index, x).transpose(1, 2)


@register("attention_varlen", "torch", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
                     return_lse):
    num_seqs = cu_seqlens_q.numel() - 1
    index_q = _padded_index(cu_seqlens_q, q.shape[0])
    index_k = _padded_index(cu_seqlens_k, k.shape[0])
    lengths_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    key_padding_mask = torch.arange(max_seqlen_k, device=q.device)[None, :] >= lengths_k[:, None]
    result = attention(_to_padded(q, index_q, num_seqs, max_seqlen_q), _to_padded(k, index_k, num_seqs, max_seqlen_k),
                       _to_padded(v, index_k, num_seqs, max_seqlen_k), causal=causal,
                       key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p, return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    out = out.transpose(1, 2)[index_q]  # (total_q, Hq, D)
    if not return_lse:
        return out
    return out, lse.permute(1, 0, 2)[:, index_q[0], index_q[1]]  # (Hq, total_q)
