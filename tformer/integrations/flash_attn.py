"""FlashAttention's Python API on tformer's kernels: switching is one import.

    from tformer.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func

The functions take FlashAttention 2's signatures, its ``(B, S, H, D)`` layout (packed
``(total, H, D)`` for varlen) and its semantics, and call :func:`tformer.ops.attention` /
:func:`tformer.ops.attention_varlen`:

- ``causal=True`` is aligned at the bottom-right corner (``alignment="bottom_right"``): with
  ``seqlen_q = 2, seqlen_k = 5`` the mask is ``[[1 1 1 1 0], [1 1 1 1 1]]``; with
  ``seqlen_q > seqlen_k`` the first rows see no key and return zeros.
- ``window_size=(left, right)``: query ``i`` attends keys
  ``[i + Sk - Sq - left, i + Sk - Sq + right]``, -1 unbounded; ``causal`` sets ``right = 0``.
- ``softcap > 0``: ``softcap * tanh(scores / softcap)`` before the softmax.
- ``softmax_scale`` defaults to ``1 / sqrt(headdim)``; ``dropout_p`` as FlashAttention's.
- ``return_attn_probs=True`` returns ``(out, softmax_lse, attn_probs)``. ``softmax_lse`` is
  float32, ``(B, H, Sq)`` or ``(H, total_q)`` for varlen, and ``+inf`` for a row that sees no
  key, as FlashAttention 2 writes it (tformer's own ops say ``-inf``). ``attn_probs`` are the
  softmax weights ``(B, H, Sq, Sk)`` (``(num_seqs, H, max_seqlen_q, max_seqlen_k)``, zero
  padded, for varlen) from tformer's reference path: for testing, as FlashAttention says of its
  own (they do not show dropout).
- ``deterministic``: as FlashAttention's: ``False`` (default) lets the backward add dQ with
  float32 atomics where that is faster (the CUDA backend on Hopper), ``True`` asks for bitwise
  reproducible gradients (passed on to :func:`tformer.ops.attention`); ``True`` refuses to run
  with the Triton atomic-dQ backward (``TFORMER_ATTENTION_DQ=atomic``).
- ``backend`` (tformer's addition, keyword only): which tformer backend runs, as in
  :func:`tformer.ops.attention`; None takes tformer's default.

Refused by name, never approximated: ``alibi_slopes`` and ``block_table`` (paged KV cache).
"""

from __future__ import annotations

import os

import torch

from tformer import ops
from tformer.backends.reference.attention import attention_weights

_DQ_ENV = "TFORMER_ATTENTION_DQ"  # tformer.kernels.attention_bwd.DQ_ENV, without importing Triton here

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func"]


def _mask_kwargs(fn: str, causal, window_size, softcap, alibi_slopes, deterministic, block_table=None) -> dict:
    """tformer's mask arguments for FlashAttention's, after refusing what tformer lacks."""
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: argument 'alibi_slopes' (ALiBi) is not supported by tformer; "
                                  "pass alibi_slopes=None")
    if block_table is not None:
        raise NotImplementedError(f"{fn}: argument 'block_table' (paged KV cache) is not supported by tformer; "
                                  "pass block_table=None with contiguous k and v")
    if deterministic and os.environ.get(_DQ_ENV) == "atomic":
        raise ValueError(f"{fn}: argument 'deterministic' is True but {_DQ_ENV}=atomic asks for the backward with "
                         "float32 atomic dQ sums; unset it")
    if window_size is None or len(window_size) != 2:
        raise ValueError(f"{fn}: argument 'window_size' must be a pair (left, right), got {window_size!r}")
    left, right = (int(bound) for bound in window_size)
    if causal:
        right = 0  # as FlashAttention: causal bounds the window's right side at the diagonal
    window = None if left < 0 and right < 0 else (max(left, -1), max(right, -1))
    return dict(causal=bool(causal), alignment="bottom_right", window=window,
                softcap=float(softcap) if softcap and softcap > 0 else 0.0)


def _flash_lse(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention 2 writes +inf for a row whose softmax sum is 0 (it sees no key)."""
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend: str | None = None):
    """FlashAttention's ``flash_attn_func``: q ``(B, Sq, H, D)``, k and v ``(B, Sk, Hk, D)``
    with ``H % Hk == 0`` (MQA/GQA). Returns ``out`` ``(B, Sq, H, D)`` (contiguous), or
    ``(out, softmax_lse (B, H, Sq), attn_probs (B, H, Sq, Sk))`` with ``return_attn_probs``.
    See the module docstring for the semantics."""
    fn = "flash_attn_func"
    mask = _mask_kwargs(fn, causal, window_size, softcap, alibi_slopes, deterministic)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: argument '{name}' must be a 4-D tensor (batch, seqlen, nheads, headdim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    # (B, S, H, D) -> (B, H, S, D): strided views, which the kernels read without a copy.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = ops.attention(qt, kt, vt, scale=softmax_scale, dropout_p=dropout_p, return_lse=True,
                             deterministic=bool(deterministic), backend=backend, **mask)
    out = out.transpose(1, 2).contiguous()
    if not return_attn_probs:
        return out
    probs = attention_weights(qt.detach(), kt.detach(), scale=softmax_scale, **mask).to(q.dtype)
    return out, _flash_lse(lse), probs


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              backend: str | None = None):
    """FlashAttention's ``flash_attn_qkvpacked_func``: qkv ``(B, S, 3, H, D)``."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_attn_qkvpacked_func: argument 'qkv' must be (batch, seqlen, 3, nheads, headdim), "
                         f"got {tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs, backend=backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             backend: str | None = None):
    """FlashAttention's ``flash_attn_kvpacked_func``: q ``(B, Sq, H, D)``, kv ``(B, Sk, 2, Hk, D)``."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"flash_attn_kvpacked_func: argument 'kv' must be (batch, seqlen, 2, nheads_k, headdim), "
                         f"got {tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, backend=backend)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *,
                           backend: str | None = None):
    """FlashAttention's ``flash_attn_varlen_func``: q ``(total_q, H, D)``, k and v
    ``(total_k, Hk, D)``, ``cu_seqlens_*`` int32 ``(num_seqs + 1,)``. Causal and windows are
    bottom-right aligned within each sequence (its own lengths). Tokens after
    ``cu_seqlens_*[-1]`` are left out (zero output). Returns ``out`` ``(total_q, H, D)``, or
    ``(out, softmax_lse (H, total_q), attn_probs (num_seqs, H, max_seqlen_q, max_seqlen_k))``."""
    fn = "flash_attn_varlen_func"
    mask = _mask_kwargs(fn, causal, window_size, softcap, alibi_slopes, deterministic, block_table)
    out, lse = ops.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    scale=softmax_scale, dropout_p=dropout_p, return_lse=True, backend=backend,
                                    deterministic=bool(deterministic),
                                    **mask)
    if not return_attn_probs:
        return out
    return out, _flash_lse(lse), _varlen_probs(q, k, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                               int(max_seqlen_k), softmax_scale, mask)


def _varlen_probs(q, k, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, mask) -> torch.Tensor:
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    probs = q.new_zeros(len(starts_q) - 1, q.shape[1], max_q, max_k)
    for i in range(len(starts_q) - 1):
        qi = q[starts_q[i]:starts_q[i + 1]].detach().transpose(0, 1)[None]
        ki = k[starts_k[i]:starts_k[i + 1]].detach().transpose(0, 1)[None]
        weights = attention_weights(qi, ki, scale=scale, **mask)[0]
        probs[i, :, :weights.shape[1], :weights.shape[2]] = weights.to(q.dtype)
    return probs


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, backend: str | None = None):
    """FlashAttention's ``flash_attn_varlen_qkvpacked_func``: qkv ``(total, 3, H, D)``."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError("flash_attn_varlen_qkvpacked_func: argument 'qkv' must be (total, 3, nheads, headdim), "
                         f"got {tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    backend: str | None = None):
    """FlashAttention's ``flash_attn_varlen_kvpacked_func``: kv ``(total_k, 2, Hk, D)``."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError("flash_attn_varlen_kvpacked_func: argument 'kv' must be (total_k, 2, nheads_k, headdim), "
                         f"got {tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)
