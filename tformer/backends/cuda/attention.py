"""CUDA C++ flash attention (kernels in csrc/attention/, ops in csrc/bindings.cpp).

Adds autograd and fake implementations to ``tformer::cuda_attention_{fwd,bwd}``, so the ops
train and trace under ``torch.compile``, and registers ``attention`` and
``attention_varlen`` for the "cuda" backend.

The kernels (FlashAttention-2 forward and backward, Dao 2023) run on the tensor cores with
``mma.sync.m16n8k16`` (fp16/bf16 inputs, float32 accumulation), ``ldmatrix`` and
double-buffered ``cp.async`` tiles: the sm80 path. On an sm_90 GPU (H100/H200) the forward
and the backward at head dims 64 and 128 run Hopper kernels instead (csrc/attention_sm90/: TMA
loads, wgmma, a producer warpgroup and two consumer warpgroups, as in FlashAttention-3) when
tformer._C was built with 9.0 in TORCH_CUDA_ARCH_LIST; both paths share out and lse, so either
backward takes either forward. Each choice is logged once to stderr. ``force_sm80`` keeps both
passes on sm80 (the ``cuda:sm80`` variant, or ``TFORMER_ATTENTION_FORCE_SM80=1``),
``force_sm80_backward`` the backward alone (``TFORMER_ATTENTION_BWD_FORCE_SM80=1``),
``force_sm80_banded`` both passes of the banded calls alone (``TFORMER_ATTENTION_BAND_FORCE_SM80=1``);
the registry passes them, and the compiled ops take the first two as arguments.
``torch.ops.tformer.cuda_attention_fwd_path(q, force_sm80)`` / ``cuda_attention_bwd_path(q,
force_sm80)`` say which kernels q's dtype, head dim and device get ("sm90a" or "sm80: <reason>":
force_sm80, a GPU other than sm_90, a build without 9.0, a dtype other than fp16/bf16, a head
dim other than 64 or 128). A call those allow still stays on sm80, with the reason logged, for a
layout TMA cannot read (zero or unaligned strides, an output not 16-byte aligned row by row),
``scale <= 0``, or grouped-query attention that takes the expanded dK/dV pass.

What they take:
- fp16 and bf16 only (float32 is refused by the registered dtypes: use "triton" or
  "reference" for it);
- head dims that are a multiple of 8 and at most 256 (compiled for 32, 64, 96, 128 and 256;
  a head dim in between runs in the next bucket with zero-filled lanes);
- causal (top-left or bottom-right aligned), sliding windows (``window=(left, right)``; key
  blocks outside every row's band are skipped, not just masked), logit soft-capping
  (``softcap``), key padding mask, packed variable-length sequences, any lengths with
  Sq != Sk, grouped-query attention without repeating k and v;
- strided q, k, v (e.g. views of a fused QKV projection) whose last dim is contiguous;
  others are refused with the reason, so "auto" passes over this backend for them.
- packed sequences: the kernels trust ``cu_seqlens_*`` and ``max_seqlen_*`` (offsets from 0,
  never decreasing, lengths bounded by ``max_seqlen_*``); ``tformer.ops.attention_varlen``
  checks them before dispatch (outside ``torch.compile``).
- shared memory: head dims up to 128 take at most 87 KB a block; the 256 bucket takes 136 KB,
  within sm80/sm90 limits but above the 99 KB of sm86/sm89, where the op raises a clear error.
- the Hopper kernels take sliding windows, bottom-right alignment and ``softcap`` too (padded
  and packed sequences), in a banded variant of each kernel that skips the key blocks outside
  every row's band; full and top-left causal attention without ``softcap`` keep the unbanded
  kernels.
- Dropout is not implemented yet: ``dropout_p > 0`` is refused (the registry's ``supports``
  check names it; calling these functions directly raises ValueError).

Semantics are those of the reference: a fully masked query row gives zeros, lse = -inf and
zero gradients. The sm80 backward is deterministic: dK/dV come from one pass over key blocks that
loops over the group's query heads in a fixed order (or, for grouped-query attention whose
grouped launch would leave SMs idle, per query head into float32 partials summed over each
group in head order), dQ from a second pass over query blocks; no atomics. The Hopper
backward by default computes dQ in the dK/dV pass instead, adding it with float32 atomics
(FlashAttention-3's backward: 5 matrix products a tile instead of 7), so dq may differ in its
last bits from run to run; ``deterministic=True`` (or
``torch.use_deterministic_algorithms(True)``) keeps its two deterministic passes. The float32 log-sum-exp saved by the forward is returned by
``return_lse=True`` (detached). Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch

import tformer._C  # noqa: F401  loads the library that defines torch.ops.tformer.cuda_*
from tformer.ops.registry import register

from .paths import kernel_band, sm80_flags, takes_banded_kernels

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 256)
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]


def _dropout_reason(dropout_p: float) -> Optional[str]:
    if dropout_p > 0.0:
        return (f"backend 'cuda' has no implementation of attention dropout yet (got dropout_p={dropout_p}); "
                f"use backend='triton' or 'reference' for dropout, or dropout_p=0.0")
    return None


def _supports(q, k, v, dropout_p, band=None, softcap: float = 0.0, **_) -> Optional[str]:
    """Why the kernels cannot take these inputs, or None (the registry's ``supports`` check)."""
    reason = _dropout_reason(dropout_p)
    if reason is not None:
        return reason
    head_dim = q.shape[-1]
    if head_dim == 0 or head_dim % 8 != 0 or head_dim > MAX_HEAD_DIM:
        return (f"the CUDA attention kernels take head dims that are a multiple of 8 and at most {MAX_HEAD_DIM}, "
                f"got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            return (f"the CUDA attention kernels need argument '{name}' with a contiguous last dim (stride 1), "
                    f"got strides {tuple(t.stride())}")
    return None


def _check_dropout(dropout_p: float) -> None:
    reason = _dropout_reason(dropout_p)
    if reason is not None:
        raise ValueError(reason)


def _deterministic(deterministic: bool) -> bool:
    """The backward's choice: bitwise reproducible when asked, or under
    ``torch.use_deterministic_algorithms(True)``."""
    return bool(deterministic) or torch.are_deterministic_algorithms_enabled()


@register("attention", "cuda", devices=("cuda",), dtypes=DTYPES, supports=_supports)
def attention(q, k, v, *, causal: bool, key_padding_mask, scale: float, dropout_p: float, return_lse: bool,
              band=None, softcap: float = 0.0, deterministic: bool = False, force_sm80: bool = False,
              force_sm80_backward: bool = False, force_sm80_banded: bool = False):
    _check_dropout(dropout_p)
    band_args = kernel_band(band, q.shape[2] == k.shape[2])
    out, lse = torch.ops.tformer.cuda_attention_fwd(q, k, v, key_padding_mask, None, None, q.shape[2], k.shape[2],
                                                    False, scale, *band_args, float(softcap),
                                                    _deterministic(deterministic),
                                                    *sm80_flags(force_sm80, force_sm80_backward, force_sm80_banded,
                                                            takes_banded_kernels(band_args, softcap)))
    return (out, lse.detach()) if return_lse else out


@register("attention_varlen", "cuda", devices=("cuda",), dtypes=DTYPES, supports=_supports)
def attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
                     return_lse, band=None, softcap: float = 0.0, deterministic: bool = False,
                     force_sm80: bool = False, force_sm80_backward: bool = False, force_sm80_banded: bool = False):
    _check_dropout(dropout_p)
    band_args = kernel_band(band)
    out, lse = torch.ops.tformer.cuda_attention_fwd(q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                    max_seqlen_k, False, scale, *band_args, float(softcap),
                                                    _deterministic(deterministic),
                                                    *sm80_flags(force_sm80, force_sm80_backward, force_sm80_banded,
                                                            takes_banded_kernels(band_args, softcap)))
    return (out, lse.detach()) if return_lse else out


# ---- autograd ------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    (q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
     window_right, bottom_right, softcap, deterministic, _force_sm80, force_sm80_backward) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    ctx.scalars = (max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, bottom_right, softcap,
                   deterministic, force_sm80_backward)


def _backward(ctx, grad_out, _grad_lse):
    # lse is returned detached by the public functions: its gradient carries nothing.
    q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.tformer.cuda_attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q,
                                                      cu_seqlens_k, *ctx.scalars)
    return (dq, dk, dv) + (None,) * 14


torch.library.register_autograd("tformer::cuda_attention_fwd", _backward, setup_context=_setup_context)


# ---- fake implementations (shapes and dtypes only, for torch.compile and meta tensors) ----------

@torch.library.register_fake("tformer::cuda_attention_fwd")
def _attention_fwd_fake(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                        scale, window_left=-1, window_right=-1, bottom_right=False, softcap=0.0,
                        deterministic=False, force_sm80=False, force_sm80_backward=False):
    # Padded batch: lse (B, Hq, Sq); packed: (Hq, total_q).
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else tuple(q.shape[:3])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.register_fake("tformer::cuda_attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, causal, scale, window_left=-1, window_right=-1, bottom_right=False,
                        softcap=0.0, deterministic=False, force_sm80=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
