"""Triton attention: the flash kernels of ``tformer.kernels.attention`` (forward) and
``tformer.kernels.attention_bwd`` (backward) as ``torch.library`` custom ops
``tformer::triton_attention_fwd`` / ``tformer::triton_attention_bwd``, with fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` traces through them.

The backward is deterministic (FA2's split into a dK/dV pass and a dQ pass, no atomics), unless
``dq_mode="atomic"`` (the ``triton:atomic_dq`` variant, or ``TFORMER_ATTENTION_DQ=atomic``) asks for
dQ by float32 atomics from the dK/dV pass. ``fwd_path`` picks the Hopper or the FA2 forward
(``triton:fa2``; ``auto`` takes Hopper on sm_90). The registry passes both, and ``autotune``.
Dropout draws its seed from torch's default CPU generator, so ``torch.manual_seed`` controls
it; the seed is saved for the backward, which regenerates the same mask in-kernel.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from tformer.kernels.attention import MAX_HEAD_DIM, attention_forward
from tformer.kernels.attention_bwd import attention_backward
from tformer.kernels.launch import launch
from tformer.ops.attention_mask import Band
from tformer.ops.registry import register

from . import devices

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _seed_value(seed: Optional[torch.Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


@torch.library.custom_op("tformer::triton_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                  cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
                  max_seqlen_k: int, window_left: int, window_right: int, bottom_right: bool, softcap: float,
                  scale: float, dropout_p: float, seed: Optional[torch.Tensor], fwd_path: str, dq_mode: str,
                  autotune: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse). Padded batch: q (B, Hq, Sq, D), lse (B, Hq, Sq). Packed (cu_seqlens given):
    q (total_q, Hq, D), lse (Hq, total_q). ``seed``: int64 CPU tensor of one element, or None.
    ``window_left``, ``window_right``, ``bottom_right``: the fields of ``ops.attention_mask.Band``
    (causal is ``window_right = 0``); ``softcap``: 0 for none. ``fwd_path``, ``dq_mode`` (carried to the
    backward) and ``autotune`` come from the registry (a variant, or an override)."""
    band = Band(window_left, window_right, bottom_right)
    return attention_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             False, scale, dropout_p, _seed_value(seed), band=band, softcap=softcap,
                             launcher=_launcher(autotune), fwd_path=fwd_path)


def _launcher(autotune: bool):
    return launch if autotune else functools.partial(launch, autotune=False)


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right,
      bottom_right, softcap, scale, dropout_p, seed, fwd_path, dq_mode, autotune):
    varlen = cu_seqlens_q is not None
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[1], q.shape[2])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("tformer::triton_attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, window_left: int,
                  window_right: int, bottom_right: bool, softcap: float, scale: float, dropout_p: float,
                  seed: Optional[torch.Tensor], dq_mode: str,
                  autotune: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, False, scale, dropout_p, _seed_value(seed),
                              band=Band(window_left, window_right, bottom_right), softcap=softcap,
                              launcher=_launcher(autotune), dq_mode=dq_mode)


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      window_left, window_right, bottom_right, softcap, scale, dropout_p, seed, dq_mode, autotune):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, *scalars, seed, _fwd_path, dq_mode, autotune = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.scalars = scalars  # max_seqlen_q, max_seqlen_k, the band, softcap, scale, dropout_p
    ctx.options = (dq_mode, autotune)


def _backward(ctx, grad_out, grad_lse):
    # lse is returned detached by the public op: grad_lse carries nothing.
    q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.tformer.triton_attention_bwd(
        grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, *ctx.scalars, seed, *ctx.options)
    # None for key_padding_mask, the offsets, the scalars, seed, fwd_path, dq_mode and autotune.
    return dq, dk, dv, *([None] * (len(ctx.scalars) + 7))


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _draw_seed(dropout_p: float) -> Optional[torch.Tensor]:
    """The dropout seed, from torch's default CPU generator (so torch.manual_seed fixes it)."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cpu")


def _head_dim_reason(head_dim: int) -> Optional[str]:
    if head_dim > MAX_HEAD_DIM:
        return f"the Triton attention kernels take head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    return None


def _supports_attention(q, **_) -> Optional[str]:
    return _head_dim_reason(q.shape[-1])


def _check_deterministic(deterministic: bool, dq_mode: str) -> None:
    if deterministic and dq_mode == "atomic":
        raise ValueError("attention: argument 'deterministic' is True but the Triton backend was asked for dq_mode="
                         "'atomic' (the triton:atomic_dq variant or TFORMER_ATTENTION_DQ=atomic), whose float32 atomic "
                         "dQ sums are not bitwise reproducible; use backend='triton' with the split dQ pass")


@register("attention", "triton", devices=devices(), dtypes=DTYPES, supports=_supports_attention)
def attention(q, k, v, *, causal: bool, key_padding_mask, scale: float, dropout_p: float, return_lse: bool,
              band: Band, softcap: float = 0.0, deterministic: bool = False, fwd_path: str = "auto",
              dq_mode: str = "split", autotune: bool = True):
    _check_deterministic(deterministic, dq_mode)
    out, lse = torch.ops.tformer.triton_attention_fwd(q, k, v, key_padding_mask, None, None, q.shape[2], k.shape[2],
                                                      band.left, band.right, band.bottom_right, softcap, scale,
                                                      dropout_p, _draw_seed(dropout_p), fwd_path, dq_mode,
                                                      autotune)
    return (out, lse.detach()) if return_lse else out


@register("attention_varlen", "triton", devices=devices(), dtypes=DTYPES, supports=_supports_attention)
def attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
                     return_lse, band: Band, softcap: float = 0.0, deterministic: bool = False, fwd_path: str = "auto",
                     dq_mode: str = "split", autotune: bool = True):
    _check_deterministic(deterministic, dq_mode)
    out, lse = torch.ops.tformer.triton_attention_fwd(q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, band.left, band.right, band.bottom_right, softcap,
                                                      scale, dropout_p, _draw_seed(dropout_p), fwd_path, dq_mode,
                                                      autotune)
    return (out, lse.detach()) if return_lse else out
