"""``scaled_dot_product_attention``: a drop-in for ``torch.nn.functional.scaled_dot_product_attention``
that runs tformer's attention kernels (``tformer.ops.attention``).

The kernels take no mask, a causal mask, a key-padding mask, or causal and key-padding together.
SDPA's ``attn_mask`` is recognized as a key-padding mask from its shape and strides alone
(never by reading its values, which would cost a device sync): a bool mask that broadcasts as
``(B, 1, 1, Sk)`` (size 1 or stride 0 over heads and queries). Every other input runs a
general reference path with the same semantics as torch, after a warning that says why
(once per reason): a float (additive) mask, another bool mask, inputs that are not 4-D,
``Hq != Hkv`` without ``enable_gqa``, or a value head dim that differs from the query's.

Differences from torch:

- A query row whose keys are all masked returns zeros and zero gradients, on every path.
  torch's math backend does the same since 2.5, but its fused CUDA kernels may return NaN.
- Dropout draws its own random numbers: with ``dropout_p > 0`` the result has the same
  distribution as torch's, not the same values for the same seed.
- ``backend=`` (keyword-only, an addition) picks tformer's backend; None takes the default.
"""

from __future__ import annotations

import math
import warnings

import torch

from tformer import ops
from tformer.backends.reference.attention import masked_attention

_warned_reasons: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason in _warned_reasons:
        return
    _warned_reasons.add(reason)
    warnings.warn(f"tformer.nn.functional.scaled_dot_product_attention: {reason}; running the general (unfused) "
                  f"reference path, which materializes the (Sq, Sk) scores", stacklevel=3)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                                 *, backend: str | None = None) -> torch.Tensor:
    """``softmax(query @ key^T * scale + mask) @ value`` with torch's SDPA conventions.

    query ``(B, Hq, Sq, D)``, key ``(B, Hkv, Sk, D)``, value ``(B, Hkv, Sk, Dv)``.
    ``attn_mask``: bool (True = the key TAKES PART, the opposite of ``key_padding_mask``) or
    float (added to the scaled scores); it broadcasts to ``(B, Hq, Sq, Sk)``.
    ``is_causal``: top-left aligned causal mask; not allowed together with ``attn_mask``.
    ``enable_gqa``: allow ``Hq`` to be a multiple of ``Hkv`` (grouped-query attention).
    """
    if attn_mask is not None and is_causal:
        raise ValueError("scaled_dot_product_attention: pass either 'attn_mask' or 'is_causal=True', not both "
                         "(as torch); fold the causal pattern into the mask instead")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"scaled_dot_product_attention: argument 'dropout_p' must be a float in [0, 1], "
                         f"got {dropout_p!r}")
    reason = _unfused_reason(query, key, value, enable_gqa)
    if reason is None and dropout_p == 1.0:
        reason = "dropout_p=1.0 (every probability dropped) is outside the kernels' [0, 1)"
    key_padding_mask = None
    if reason is None and attn_mask is not None:
        key_padding_mask, reason = _as_key_padding_mask(attn_mask, query.shape[0], key.shape[-2])
    if reason is not None:
        _warn_once(reason)
        return reference_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return ops.attention(query, key, value, causal=bool(is_causal), key_padding_mask=key_padding_mask,
                         scale=scale, dropout_p=float(dropout_p), backend=backend)


def _unfused_reason(query, key, value, enable_gqa: bool) -> str | None:
    """Why the kernels cannot take these q/k/v, or None."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return (f"query/key/value have {query.dim()}/{key.dim()}/{value.dim()} dimensions; the kernels take "
                f"(B, H, S, D)")
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return (f"head dims differ (query {query.shape[-1]}, key {key.shape[-1]}, value {value.shape[-1]}); "
                f"the kernels need them equal")
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3]:
        return "query/key/value batch sizes or key/value shapes differ (broadcasting is not fused)"
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if num_heads != num_kv_heads:
        if not enable_gqa:
            return (f"query has {num_heads} heads and key/value {num_kv_heads} without enable_gqa=True "
                    f"(torch broadcasts the heads)")
        if num_kv_heads == 0 or num_heads % num_kv_heads:
            return f"query heads {num_heads} are not a multiple of key/value heads {num_kv_heads}"
    return None


def _as_key_padding_mask(attn_mask: torch.Tensor, batch: int, seq_k: int):
    """``(key_padding_mask (B, Sk) bool with True = padding, None)`` when ``attn_mask`` is a
    bool mask that only depends on the batch and the key, else ``(None, reason)``."""
    if attn_mask.dtype != torch.bool:
        return None, "a float (additive) attn_mask is not fused"
    if attn_mask.dim() > 4:
        return None, f"attn_mask has {attn_mask.dim()} dimensions"
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    # Size 1 or stride 0 (an expanded view) over heads and queries: the same keys for every row.
    if any(mask.shape[d] != 1 and mask.stride(d) != 0 for d in (1, 2)):
        return None, ("a bool attn_mask that varies over heads or queries (not a (B, 1, 1, Sk) key-padding "
                      "pattern) is not fused")
    if mask.shape[0] not in (1, batch) or mask.shape[3] not in (1, seq_k):
        return None, f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast over (B, Sk)"
    keep = mask[:, 0, 0, :].expand(batch, seq_k)
    return (~keep).contiguous(), None


def reference_sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """The general path: any mask torch takes, any leading dims, torch's broadcasting.

    Runs :func:`tformer.backends.reference.attention.masked_attention` (the reference softmax,
    float32 math inside, fully masked rows give zeros), where tformer keeps all score-matrix math.
    """
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(group, dim=-3)
        value = value.repeat_interleave(group, dim=-3)
    seq_q, seq_k = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    mask = attn_mask
    if is_causal:
        mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=query.device).tril()
    out, _ = masked_attention(query, key, value, mask, scale=scale, dropout_p=dropout_p)
    return out
