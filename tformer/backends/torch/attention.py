"""Attention through ``F.scaled_dot_product_attention`` (cuDNN / FlashAttention / memory-efficient
kernels on a GPU, the fused CPU kernel or the math path on a CPU, as torch picks).

tformer's semantics on top of SDPA:
- The allowed-keys mask comes from :func:`tformer.ops.attention_mask.allowed_keys` (one
  function, shared with the reference: causal alignment, sliding windows, key padding). A plain
  top-left causal call without a key padding mask passes ``is_causal=True`` instead, which SDPA
  aligns top-left as tformer does and which lets it keep its fastest kernels.
- ``softcap`` (tanh capping of the scores) has no SDPA equivalent: refused, so ``auto`` takes the
  reference; so is a bottom-right band on packed sequences (the padded batch would align it to
  the longest sequence, not to each).
- A query row that may see no key returns zeros and gets zero gradients. SDPA gives NaN there;
  such rows are given every key (so the softmax stays finite) and their output is then zeroed,
  which also zeroes the gradient flowing back through them.
- Packed sequences (``attention_varlen``) are scattered into a padded batch with a key padding
  mask and gathered back: exact, and built from the offsets on the device without a host sync.
"""


import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tformer.backends.reference.attention import attention_probabilities
from tformer.ops.attention_mask import TOP_LEFT_CAUSAL, Band, allowed_keys
from tformer.ops.registry import register

from .softmax import ALL_DEVICES, ALL_DTYPES


def _lse(q, k, band: Band, key_padding_mask, scale: float) -> torch.Tensor:
    """float32 log-sum-exp (B, Hq, Sq): -inf for a row with no key. Only for return_lse=True,
    which SDPA does not offer: the reference backend, the one place that builds the (Sq, Sk)
    scores, computes it."""
    with torch.no_grad():
        return attention_probabilities(q, k, band=band, key_padding_mask=key_padding_mask, scale=scale)[1].float()


def _softcap_reason(softcap: float = 0.0, **_) -> str | None:
    if softcap > 0.0:
        return f"SDPA has no score soft-capping (got softcap={softcap}); use backend='reference'"
    return None


def _varlen_reason(band: Band, softcap: float = 0.0, **_) -> str | None:
    if band.bottom_right and not band.is_full:
        return ("packed sequences with a bottom-right aligned band are not supported by the torch backend (its "
                "padded batch aligns to the longest sequence); use backend='reference'")
    return _softcap_reason(softcap)


@register("attention", "torch", devices=ALL_DEVICES, dtypes=ALL_DTYPES, supports=_softcap_reason)
def attention(q, k, v, *, causal: bool, key_padding_mask, scale: float, dropout_p: float, return_lse: bool,
              band: Band, softcap: float = 0.0, deterministic: bool = False):
    if deterministic and q.device.type != "cpu":
        # SDPA's fused GPU backward kernels make no reproducibility promise; its math kernel is
        # plain matrix products.
        with sdpa_kernel(SDPBackend.MATH):
            return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                             dropout_p=dropout_p, return_lse=return_lse, band=band, softcap=softcap)
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        # torch's CPU SDPA kernels compute half-precision gradients less exactly than the rule
        # every backend is held to (FlashAttention's: at most a few times the error of plain
        # same-precision math); on the CPU, half inputs attend in float32 and are cast back.
        result = _attention(q.float(), k.float(), v.float(), key_padding_mask=key_padding_mask, scale=scale,
                            dropout_p=dropout_p, return_lse=return_lse, band=band)
        return (result[0].to(q.dtype), result[1]) if return_lse else result.to(q.dtype)
    return _attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                      return_lse=return_lse, band=band)


def _attention(q, k, v, *, key_padding_mask, scale: float, dropout_p: float, return_lse: bool, band: Band):
    seq_q, seq_k = q.shape[2], k.shape[2]
    if seq_k == 0:  # no keys: every row is empty; the sums keep k and v in the graph (zero grads)
        out = q * 0.0 + (k.sum() + v.sum()) * 0.0
        return (out, q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)) if return_lse else out
    if scale < 0:  # SDPA's fused CPU kernel returns NaN under is_causal with a negative scale
        q, scale = -q, -scale
    mask, has_key, is_causal = None, None, False
    if key_padding_mask is None and (band is TOP_LEFT_CAUSAL or band == TOP_LEFT_CAUSAL):
        is_causal = True  # with Sk > 0 every row sees key 0
    elif key_padding_mask is not None or not band.is_full:
        mask = allowed_keys(seq_q, seq_k, band, key_padding_mask, q.device)
        has_key = mask.any(dim=-1, keepdim=True)  # (B or 1, 1, Sq, 1)
        mask = mask | ~has_key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if has_key is not None:
        out = out.masked_fill(~has_key, 0.0)
    if not return_lse:
        return out
    lse = _lse(q, k, band, key_padding_mask, scale)
    return out, lse


def _padded_index(cu_seqlens: torch.Tensor, total: int, max_len: int):
    """((sequence, position) of each packed token, bool valid), computed on the device from the
    offsets. Tokens past ``cu_seqlens[-1]`` belong to no sequence: they go to a spare slot at
    position ``max_len`` (one past the longest sequence), which no query attends, and their
    output is zeroed."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    valid = tokens < cu_seqlens[-1]
    seq = torch.searchsorted(cu_seqlens[1:], tokens, right=True).clamp(max=cu_seqlens.numel() - 2)
    position = torch.where(valid, (tokens - cu_seqlens[seq]).long(), max_len)
    return (torch.where(valid, seq, 0), position), valid


def _to_padded(x: torch.Tensor, index, num_seqs: int, max_len: int) -> torch.Tensor:
    """(total, H, D) packed -> (B, H, max_len + 1, D) zero-padded (the last slot takes spare tokens)."""
    padded = x.new_zeros(num_seqs, max_len + 1, *x.shape[1:])
    return padded.index_put(index, x).transpose(1, 2)


@register("attention_varlen", "torch", devices=ALL_DEVICES, dtypes=ALL_DTYPES, supports=_varlen_reason)
def attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
                     return_lse, band: Band, softcap: float = 0.0, deterministic: bool = False):
    num_seqs, max_q, max_k = cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k)
    index_q, valid_q = _padded_index(cu_seqlens_q, q.shape[0], max_q)
    index_k, _ = _padded_index(cu_seqlens_k, k.shape[0], max_k)
    lengths_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    key_padding_mask = torch.arange(max_k + 1, device=q.device)[None, :] >= lengths_k[:, None]
    result = attention(_to_padded(q, index_q, num_seqs, max_q), _to_padded(k, index_k, num_seqs, max_k),
                       _to_padded(v, index_k, num_seqs, max_k), causal=causal, key_padding_mask=key_padding_mask,
                       scale=scale, dropout_p=dropout_p, return_lse=return_lse, band=band, softcap=softcap,
                       deterministic=deterministic)
    out, lse = result if return_lse else (result, None)
    out = out.transpose(1, 2)[index_q].masked_fill(~valid_q[:, None, None], 0.0)  # (total_q, Hq, D)
    if not return_lse:
        return out
    lse = lse.permute(1, 0, 2)[:, index_q[0], index_q[1]]  # (Hq, total_q)
    return out, lse.masked_fill(~valid_q[None, :], float("-inf"))
