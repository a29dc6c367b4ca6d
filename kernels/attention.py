"""Flash attention forward in Triton (FlashAttention-2, Dao 2023, Algorithm 1).

One kernel serves every variant through ``tl.constexpr`` parameters: a causal/sliding-window
band (``HAS_BAND``: top-left or bottom-right aligned, ``tformer.ops.attention_mask``; key blocks
outside the band are skipped, not masked), logit soft-capping (``HAS_SOFTCAP``), key padding
mask, packed variable-length sequences (``IS_VARLEN``: per-sequence offsets read from
``cu_seqlens``), grouped-query attention (query head ``h`` reads key/value
head ``h // group_size``; k and v are never repeated in memory) and dropout (``dropout.py``:
Philox keyed by seed and the element's (batch, head, row, col) index, so the backward
regenerates the same mask and the result does not depend on the block sizes).

Memory is O(S): a program holds one block of query rows and streams key/value blocks through
an online softmax; only the output and the float32 log-sum-exp (for the backward) are written.

Any sequence lengths and head dims up to 256: rows, columns and the head dim are masked
(``BLOCK_D`` is the next power of two of the head dim; padding lanes are loaded as zeros,
never copied). Tensors are read through their strides, so views (e.g. q/k/v split from a
fused QKV projection and transposed) are taken without a copy.

Precision: fp16/bf16 inputs go through the tensor cores with float32 accumulation; fp32
inputs use ``tl.dot(..., input_precision="ieee")`` (full fp32, no TF32), chosen for
correctness over speed. Softmax state (running max, sum, accumulator) is float32.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from tformer.ops.attention_mask import Band

from . import attention_hopper
from .attention_tiles import (allowed_scores, band_args, band_meta, band_offset, block_d, dot_meta, key_block_range,
                              lse_strides, narrow, problem, scores_log2, seqlen_buckets, sequence_bounds, strides4,
                              tile_dot)
from .dropout import dropout_keep
from .launch import autotuned, check_tile_strides, config, launch

MAX_HEAD_DIM = 256
# Inside kernels, exp(x) is computed as exp2(x * log2(e)) (the cheaper instruction) and the
# constants log2(e) = 1.4426950408889634 and ln(2) = 0.6931471805599453 are written as literals.


@triton.jit
def attend_key_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, rows, cols, k_len, d_ok, key_pad_row, stride_ps, scale_log2,
                     offset, window_left, window_right, softcap_in, softcap_out, seed, dropout_p, batch_head,
                     HAS_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KEY_PADDING: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     MASKED: tl.constexpr):
    """One step of the online softmax (FA2 Alg. 1, lines 8-10) over the key block ``cols``:
    returns the updated (acc, l_i, m_i). ``MASKED=False`` for blocks every row of the query
    block may attend in full (inside the band and the key length, no padding): no column mask
    on the loads, no score mask, and (without soft-capping) the scale folded into the
    exponent's FMA. ``scale_log2`` >= 0 (the launcher's q carries the sign of a negative scale)."""
    if MASKED:
        col_ok = cols < k_len
        k_t = tl.load(k_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = scores_log2(tile_dot(q, k_t, None, DOT_PRECISION, UPCAST), scale_log2, softcap_in, softcap_out,
                        HAS_SOFTCAP)
        s = allowed_scores(s, rows, cols, k_len, key_pad_row, stride_ps, offset, window_left, window_right, HAS_BAND,
                           HAS_KEY_PADDING)
        # A row with no allowed key so far has m = -inf; exponentiating against 0 instead
        # keeps exp2(-inf - -inf) = NaN out.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        k_t = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        qk = tile_dot(q, k_t, None, DOT_PRECISION, UPCAST)
        if HAS_SOFTCAP:
            s = scores_log2(qk, scale_log2, softcap_in, softcap_out, HAS_SOFTCAP)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = m_new
            p = tl.exp2(s - m_safe[:, None])
        else:
            # Every score is finite here, so m_new is too; max(qk) * c == max(qk * c) for c >= 0.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_safe = m_new
            p = tl.exp2(qk * scale_log2 - m_safe[:, None])  # one FMA per score
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:  # dropped after the normalizer: the softmax sum counts every key
        keep = dropout_keep(seed, dropout_p, batch_head, rows, cols)
        p = tl.where(keep, p, 0.0)
    acc = tile_dot(narrow(p, v.dtype, UPCAST), v, acc, DOT_PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seqlen_q_bucket", "seqlen_k_bucket"])
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, KeyPad, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_pb, stride_ps,
    num_heads, group_size, max_seqlen_q, max_seqlen_k, head_dim,
    scale, window_left, window_right, softcap, dropout_p, seed, seqlen_q_bucket, seqlen_k_bucket,
    HAS_BAND: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``seqlen_q_bucket`` / ``seqlen_k_bucket`` are unused here: they key the autotuner.
    ``window_left`` / ``window_right``: the band's bounds (``UNBOUNDED`` for none; causal is
    ``window_right = 0``), read when ``HAS_BAND``; ``softcap`` > 0 when ``HAS_SOFTCAP``."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // group_size
    q_start, q_len, k_start, k_len = sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, max_seqlen_q, max_seqlen_k,
                                                     IS_VARLEN)
    if start_m >= q_len:  # varlen: this sequence is shorter than max_seqlen_q
        return

    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = offs_d < head_dim
    # Token indices times strides are 64-bit (a 12,288-element fused-QKV token stride passes
    # 2^31 after 174,762 tokens); offsets inside a tile are 32-bit (launch.MAX_STRIDE).
    batch64 = batch.to(tl.int64)
    first_row = q_start.to(tl.int64) + start_m
    k_start64 = k_start.to(tl.int64)
    q_base = Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + first_row * stride_qs
    k_base = K + batch64 * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch64 * stride_vb + kv_head.to(tl.int64) * stride_vh
    key_pad_row = KeyPad + batch64 * stride_pb
    k_tile = offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd  # (D, N): k transposed
    v_tile = offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd

    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # Scores kept in log2 units: s2 = (q . k) * scale * log2(e), so p = exp2(s2 - m2). A
    # negative scale moves its sign onto q (exact), so the multiplier is >= 0 (attend_key_block).
    # Negated in float32: the interpreter holds bf16 as raw 16-bit integers, which a bf16
    # negation wraps (on a GPU both cost the same).
    q = tl.where(scale < 0, (-(q.to(tl.float32))).to(q.dtype), q)
    scale_log2 = tl.abs(scale) * 1.4426950408889634
    softcap_in = tl.abs(scale) / tl.where(HAS_SOFTCAP, softcap, 1.0)
    softcap_out = softcap * 1.4426950408889634
    offset = band_offset(q_len, k_len, BOTTOM_RIGHT)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    batch_head = batch64 * num_heads + head  # int64: B x H may pass 2^31

    # Key blocks outside [lo, hi) hold no key this query block may attend: skipped. Blocks in
    # [full_lo, full_hi) are attended in full by every row: no masks there; the band's edges,
    # the last partial block and padded keys go through the masked loops.
    lo, full_lo, full_hi, hi = key_block_range(start_m, k_len, offset, window_left, window_right, HAS_BAND,
                                               HAS_KEY_PADDING, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        first_col = k_start64 + start_n
        acc, l_i, m_i = attend_key_block(
            acc, l_i, m_i, q, k_base + first_col * stride_ks + k_tile, v_base + first_col * stride_vs + v_tile, rows,
            start_n + offs_n, k_len, d_ok, key_pad_row, stride_ps, scale_log2, offset, window_left, window_right,
            softcap_in, softcap_out, seed, dropout_p, batch_head,
            HAS_BAND, HAS_SOFTCAP, HAS_KEY_PADDING, HAS_DROPOUT, DOT_PRECISION, UPCAST, True)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        first_col = k_start64 + start_n
        acc, l_i, m_i = attend_key_block(
            acc, l_i, m_i, q, k_base + first_col * stride_ks + k_tile, v_base + first_col * stride_vs + v_tile, rows,
            start_n + offs_n, k_len, d_ok, key_pad_row, stride_ps, scale_log2, offset, window_left, window_right,
            softcap_in, softcap_out, seed, dropout_p, batch_head,
            HAS_BAND, HAS_SOFTCAP, HAS_KEY_PADDING, HAS_DROPOUT, DOT_PRECISION, UPCAST, False)
    for start_n in range(full_hi, hi, BLOCK_N):
        first_col = k_start64 + start_n
        acc, l_i, m_i = attend_key_block(
            acc, l_i, m_i, q, k_base + first_col * stride_ks + k_tile, v_base + first_col * stride_vs + v_tile, rows,
            start_n + offs_n, k_len, d_ok, key_pad_row, stride_ps, scale_log2, offset, window_left, window_right,
            softcap_in, softcap_out, seed, dropout_p, batch_head,
            HAS_BAND, HAS_SOFTCAP, HAS_KEY_PADDING, HAS_DROPOUT, DOT_PRECISION, UPCAST, True)

    # Fully masked rows have l = 0: output 0 and lse = -inf, as the reference's safe_softmax.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    o_base = Out + batch64 * stride_ob + head.to(tl.int64) * stride_oh + first_row * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             narrow(out, Out.dtype.element_ty, UPCAST),
             mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    l_base = Lse + batch64 * stride_lb + head.to(tl.int64) * stride_lh + first_row * stride_ls
    tl.store(l_base + offs_m * stride_ls, lse, mask=row_ok)


# Candidates per head-dim bucket (kernels/launch.py tunes among them). Chosen from
# `python -m bench.compile_audit`, which lowers them for sm_90 specialized as a launch is. fp32
# inputs use full-precision dots on the CUDA cores, whose operand tiles live in registers:
# only small blocks fit there.
FWD_CONFIGS = {  # 16-bit inputs: BLOCK_D upper bound -> candidates
    64: [config(128, 64, 8, 3), config(128, 128, 8, 3), config(64, 64, 4, 3)],
    128: [config(128, 64, 8, 3), config(64, 128, 8, 3), config(128, 32, 8, 3)],
    256: [config(64, 32, 8, 2), config(64, 64, 8, 2), config(64, 32, 8, 3)],
}
FWD_CONFIGS_FP32 = {
    64: [config(32, 32, 8, 1), config(64, 16, 8, 1), config(16, 64, 8, 1)],
    128: [config(32, 16, 8, 1), config(16, 32, 8, 1), config(16, 16, 8, 1)],
    256: [config(16, 16, 8, 1), config(16, 32, 8, 1), config(32, 16, 8, 1)],
}
_attention_fwd_tuned = autotuned(_attention_fwd_kernel, FWD_CONFIGS, FWD_CONFIGS_FP32)


def attention_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                      causal: bool, scale: float, dropout_p: float, seed: int, launcher: Callable = launch,
                      fwd_path: str | None = None, band: Band | None = None, softcap: float = 0.0):
    """Returns (out like q but contiguous, lse float32 (B, Hq, Sq) or (Hq, total_q) when packed).

    ``launcher`` runs the kernel (``launch.launch``'s signature); bench.compile_audit passes one
    that records the launch, to compile exactly what would run. ``fwd_path``: "hopper", "fa2"
    (this file's kernel) or "auto"; None reads $TFORMER_ATTENTION_FWD (see
    ``attention_hopper.forward_path``). ``band``: the causal/window band (None: ``causal``
    top-left); ``softcap``: > 0 soft-caps the scores.

    Raises:
        ValueError: too many heads or sequences for a grid, a token or head-dim stride above 2^23 elements,
            or an unknown or impossible ``fwd_path``.
    """
    band, (window_left, window_right) = band_args(causal, band)
    if attention_hopper.forward_path(q, k, v, cu_seqlens_q is not None, dropout_p, fwd_path) == "hopper":
        return attention_hopper.attention_forward_hopper(q, k, v, key_padding_mask, max_seqlen_q, max_seqlen_k,
                                                         causal, scale, launcher, band, softcap)
    varlen, num_seqs, num_heads, group_size, max_q, max_k = problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    check_tile_strides(**{name: strides4(t, varlen)[2:] for name, t in dict(q=q, k=k, v=v).items()})
    # Packed tokens past cu_seqlens_q[-1] belong to no sequence: zeros, not garbage.
    out = (torch.zeros if varlen else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (num_heads, q.shape[0]) if varlen else (q.shape[0], num_heads, q.shape[2])
    lse = (torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device) if varlen
           else torch.empty(lse_shape, dtype=torch.float32, device=q.device))
    if out.numel() == 0:
        return out, lse
    head_dim = q.shape[-1]
    has_pad = key_padding_mask is not None
    # bool and uint8 share a byte layout: a view, not a copy, that every Triton version loads.
    key_pad = key_padding_mask.view(torch.uint8) if has_pad else q
    pad_strides = key_padding_mask.stride() if has_pad else (0, 0)
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    args = (q, k, v, out, lse, key_pad, cu_q, cu_k,
            *strides4(q, varlen), *strides4(k, varlen), *strides4(v, varlen), *strides4(out, varlen),
            *lse_strides(lse, varlen), *pad_strides,
            num_heads, group_size, max_q, max_k, head_dim, scale, window_left, window_right, softcap, dropout_p, seed,
            *seqlen_buckets(max_q, max_k))
    meta = dict(**band_meta(band, softcap), HAS_KEY_PADDING=has_pad, IS_VARLEN=varlen, HAS_DROPOUT=dropout_p > 0.0,
                **dot_meta(q), BLOCK_D=block_d(head_dim))

    def grid_of(blocks):
        return (triton.cdiv(max_q, blocks["BLOCK_M"]), num_heads, num_seqs)

    launcher(_attention_fwd_kernel, _attention_fwd_tuned, grid_of, args, meta, q.device)
    return out, lse
