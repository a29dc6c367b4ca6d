"""Flash attention backward in Triton (FlashAttention-2, Dao 2023, Algorithm 2, with the
dK/dV and dQ passes split as in its Section 3.2 so that, by default, no atomics are needed).

Three kernels, all recomputing the probabilities from q, k and the saved log-sum-exp
(memory O(S), never an (Sq, Sk) matrix in global memory):

1. ``_delta_kernel``: delta_i = sum_d dO_i * O_i, the row term of the softmax backward
   (equal to sum_j P_ij dP_ij, dropout included, because O is computed from the dropped P).
2. ``_dkdv_kernel``: one program per key block and output head, looping over
   ``heads_per_program`` query heads and their query blocks. Its tiles are transposed,
   (BLOCK_N, BLOCK_M): S^T = K Q^T and dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q, so
   every dot has BLOCK_N >= 64 rows (wgmma on sm_90) and P^T, dS^T need no transpose. It runs
   one of two ways:

   - grouped: one program per key/value head, looping over the ``group_size`` query heads of
     its group (grouped-query attention), so dK and dV are summed over the group in registers
     in a fixed order and stored once in the input dtype.
   - expanded (FlashAttention-2's GQA/MQA backward): one program per query head, writing that
     head's float32 partial dK/dV into (B, Hq, Sk, D) buffers ((total_k, Hq, D) packed); a
     torch sum over the group, a fixed-order reduction, then gives dK/dV in the input dtype
     (float32 partials round once, after the sum, as the grouped registers do; 16-bit ones
     would round once per query head).
     It launches ``group_size`` times more programs, for multi-query attention or small
     batches where the grouped launch would leave most SMs idle (e.g. B=1, Hq=32, Hkv=1,
     S=2048: 32 grouped programs on an H100's 132 SMs).

   ``dkdv_expanded`` picks: expanded when group_size > 1, the grouped launch has fewer than
   2 programs per SM and the two float32 buffers fit in 256 MiB; grouped otherwise, and always
   on CPU tensors (the interpreter has no SMs). Both ways are deterministic.
3. ``_dq_kernel``: one program per query block and query head, looping over key blocks.
   With ``TFORMER_ATTENTION_DQ=atomic`` (``resolve_dq_mode``) it does not run: the dK/dV pass
   adds each key block's dQ^T = K^T dS^T into a float32 buffer with atomics, as FA2's default
   backward does (5 matrix products per block pair instead of 7, but not bit-reproducible).

Dropout masks are regenerated from the same seed and element indices as the forward
(``dropout.dropout_keep``; the dK/dV pass transposes the (M, N) mask). Fully masked query rows
(lse = -inf) get zero probabilities, hence zero gradients, never NaN.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from typing import Callable

from tformer.ops.attention_mask import Band

from .attention_tiles import (allowed_scores, band_args, band_key_limits, band_meta, band_offset, block_d, dot_meta, key_block_range,
                              lse_strides, narrow, problem, scores_log2, seqlen_buckets, sequence_bounds, strides4,
                              tanh, tile_dot)
from .dropout import dropout_keep
from .launch import autotuned, check_tile_strides, config, launch


@triton.jit
def _delta_kernel(Out, DOut, Delta, CuSeqlensQ,
                  stride_ob, stride_oh, stride_os, stride_od,
                  stride_gb, stride_gh, stride_gs, stride_gd,
                  stride_lb, stride_lh, stride_ls,
                  max_seqlen_q, head_dim,
                  IS_VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2)
    q_start, q_len, _, _ = sequence_bounds(CuSeqlensQ, CuSeqlensQ, batch, max_seqlen_q, max_seqlen_q, IS_VARLEN)
    if start_m >= q_len:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < q_len)[:, None] & (offs_d < head_dim)[None, :]
    batch64, q_start64 = batch.to(tl.int64), q_start.to(tl.int64)
    o = tl.load(Out + batch64 * stride_ob + head * stride_oh + (q_start64 + rows[:, None]) * stride_os
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + batch64 * stride_gb + head * stride_gh + (q_start64 + rows[:, None]) * stride_gs
                 + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + batch64 * stride_lb + head * stride_lh + (q_start64 + rows) * stride_ls, tl.sum(o * do, 1),
             mask=rows < q_len)


@triton.jit
def _row_stats(Lse, Delta, l_offset, rows, q_len, stride_ls):
    """lse in log2 units and delta for ``rows``. A fully masked row (lse = -inf) has only -inf
    scores; measuring them against 0 gives p = 0 instead of exp2(-inf - -inf) = NaN."""
    row_ok = rows < q_len
    lse = tl.load(Lse + l_offset + rows * stride_ls, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(Delta + l_offset + rows * stride_ls, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def softcap_grad(ds, qk, softcap_in, HAS_SOFTCAP: tl.constexpr):
    """dS carried back through soft-capping to the raw scores: times
    d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2 at the scaled score x (unchanged without)."""
    if HAS_SOFTCAP:
        t = tanh(qk * softcap_in)
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def allowed_scores_t(s_t, rows, cols, q_len, k_len, key_pad_row, stride_ps, offset, window_left, window_right,
                     HAS_BAND: tl.constexpr, HAS_KEY_PADDING: tl.constexpr):
    """s_t with -inf where key ``cols[i]`` may not be attended by query ``rows[j]`` or that
    query is past ``q_len``: the forward's ``allowed_scores`` on the transposed (N, M) tile."""
    if HAS_BAND:  # per key, its band's query rows [first, end): no (N, M) index arithmetic
        first, end = band_key_limits(cols - offset, 0, window_right, window_left)
        allowed = ((cols < k_len)[:, None] & (rows < q_len)[None, :] & (rows[None, :] >= first[:, None])
                   & (rows[None, :] < end[:, None]))
    else:
        allowed = (cols[:, None] < k_len) & (rows[None, :] < q_len)
    if HAS_KEY_PADDING:
        pad = tl.load(key_pad_row + cols.to(tl.int64) * stride_ps, mask=cols < k_len, other=1)
        allowed = allowed & (pad == 0)[:, None]
    return tl.where(allowed, s_t, float("-inf"))


@triton.jit(do_not_specialize=["heads_per_program", "seqlen_q_bucket", "seqlen_k_bucket"])
def _dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, DQAccum, KeyPad, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_ab, stride_ah, stride_as, stride_ad,
    stride_lb, stride_lh, stride_ls,
    stride_pb, stride_ps,
    num_heads, heads_per_program, programs_per_kv_head, max_seqlen_q, max_seqlen_k, head_dim,
    scale, window_left, window_right, softcap, dropout_p, seed, seqlen_q_bucket, seqlen_k_bucket,
    HAS_BAND: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of key block ``program_id(0)`` summed over ``heads_per_program`` consecutive query
    heads, stored at head index ``program_id(1)`` of DK and DV, whose key/value head is that
    index // ``programs_per_kv_head``. Grouped: (group_size, 1), the output head is the key/value
    head. Expanded: (1, group_size), it is the query head. Triton compiles an int argument equal
    to 1 as a constant, so the grouped path drops the division; ``heads_per_program`` is kept a
    runtime loop bound (``do_not_specialize``) even when 1 (expanded, or multi-head attention):
    a loop of one trip, fully unrolled, holds more registers than the loop. The bucket arguments
    only key the autotuner. ``ATOMIC_DQ``: also add this key block's share of dQ, in float32
    atomics, into ``DQAccum`` (q's layout), so no dQ pass runs."""
    start_n = tl.program_id(0) * BLOCK_N
    out_head = tl.program_id(1)
    batch = tl.program_id(2)
    first_head = out_head * heads_per_program
    kv_head = out_head // programs_per_kv_head
    q_start, q_len, k_start, k_len = sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, max_seqlen_q, max_seqlen_k,
                                                     IS_VARLEN)
    if start_n >= k_len:
        return
    offs_n = tl.arange(0, BLOCK_N)
    cols = start_n + offs_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_mask = (cols < k_len)[:, None] & d_ok[None, :]
    # Token indices times strides are 64-bit, offsets inside a tile 32-bit (see the forward).
    batch64, q_start64 = batch.to(tl.int64), q_start.to(tl.int64)
    first_col = k_start.to(tl.int64) + start_n
    kv_head64 = kv_head.to(tl.int64)
    k = tl.load(K + batch64 * stride_kb + kv_head64 * stride_kh + first_col * stride_ks
                + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + batch64 * stride_vb + kv_head64 * stride_vh + first_col * stride_vs
                + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    scale_log2 = scale * 1.4426950408889634
    softcap_in = scale / tl.where(HAS_SOFTCAP, softcap, 1.0)
    softcap_out = softcap * 1.4426950408889634
    key_pad_row = KeyPad + batch64 * stride_pb
    offset = band_offset(q_len, k_len, BOTTOM_RIGHT)

    # Query blocks outside [lo, hi) have no row whose band reaches this key block: skipped.
    # Row i sees key j when j - offset - right <= i <= j - offset + left.
    lo = q_len * 0
    hi = q_len
    if HAS_BAND:
        lo = tl.maximum(start_n - offset - window_right, 0)
        hi = tl.minimum(start_n + BLOCK_N - offset + window_left, q_len)
    lo = (lo // BLOCK_M) * BLOCK_M
    # Transposed tiles (FA2 Alg. 2 with every matrix flipped): S^T = K Q^T and dP^T = V dO^T
    # are (N, M), so all four dots have M = BLOCK_N rows (wgmma's 64-row granularity on sm_90),
    # and P^T, dS^T feed dV += P^T dO and dK += dS^T Q as register operands without a transpose.
    # q is loaded transposed (D, M); dO^T is a view of the shared-memory dO tile.
    qt_tile = offs_m[None, :] * stride_qs + offs_d[:, None] * stride_qd
    do_tile = offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd
    dq_t_tile = offs_m[None, :] * stride_as + offs_d[:, None] * stride_ad
    # Fixed order over the query heads and their query blocks: deterministic sums.
    for g in range(0, heads_per_program):
        head64 = (first_head + g).to(tl.int64)
        q_base = Q + batch64 * stride_qb + head64 * stride_qh
        do_base = DOut + batch64 * stride_gb + head64 * stride_gh
        dq_base = DQAccum + batch64 * stride_ab + head64 * stride_ah
        l_offset = batch64 * stride_lb + head64 * stride_lh + q_start64 * stride_ls
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            first_row = q_start64 + start_m
            row_ok = rows < q_len
            q_t = tl.load(q_base + first_row * stride_qs + qt_tile, mask=d_ok[:, None] & row_ok[None, :], other=0.0)
            do = tl.load(do_base + first_row * stride_gs + do_tile, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse2, delta = _row_stats(Lse, Delta, l_offset, rows, q_len, stride_ls)
            # Rows past q_len are masked like disallowed keys: their p is 0.
            qk_t = tile_dot(k, q_t, None, DOT_PRECISION, UPCAST)
            s_t = scores_log2(qk_t, scale_log2, softcap_in, softcap_out, HAS_SOFTCAP)
            s_t = allowed_scores_t(s_t, rows, cols, q_len, k_len, key_pad_row, stride_ps, offset, window_left,
                                   window_right, HAS_BAND, HAS_KEY_PADDING)
            p_t = tl.exp2(s_t - lse2[None, :])  # (N, M) probabilities, recomputed
            dp_t = tile_dot(v, tl.trans(do), None, DOT_PRECISION, UPCAST)
            if HAS_DROPOUT:
                keep_t = tl.trans(dropout_keep(seed, dropout_p, batch64 * num_heads + head64, rows, cols))
                inv_keep = 1.0 / (1.0 - dropout_p)
                p_dropped_t = tl.where(keep_t, p_t * inv_keep, 0.0)
                dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
            else:
                p_dropped_t = p_t
            dv = tile_dot(narrow(p_dropped_t, do.dtype, UPCAST), do, dv, DOT_PRECISION, UPCAST)
            ds_t = p_t * (dp_t - delta[None, :])  # softmax backward: dS = P * (dP - rowsum(dO * O))
            ds_t = narrow(softcap_grad(ds_t, qk_t, softcap_in, HAS_SOFTCAP), q_t.dtype, UPCAST)
            dk = tile_dot(ds_t, tl.trans(q_t), dk, DOT_PRECISION, UPCAST)
            if ATOMIC_DQ:
                # dQ^T += K^T dS^T: D rows (wgmma on sm_90 from head dim 64), added where the
                # rows' other key blocks add theirs (FA2's default backward, Section 3.2).
                dq_t = tile_dot(tl.trans(k), ds_t, None, DOT_PRECISION, UPCAST) * scale
                tl.atomic_add(dq_base + first_row * stride_as + dq_t_tile, dq_t,
                              mask=d_ok[:, None] & row_ok[None, :], sem="relaxed")

    dk = dk * scale
    out_head64 = out_head.to(tl.int64)
    tl.store(DK + batch64 * stride_dkb + out_head64 * stride_dkh + first_col * stride_dks
             + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
             narrow(dk, DK.dtype.element_ty, UPCAST), mask=kv_mask)
    tl.store(DV + batch64 * stride_dvb + out_head64 * stride_dvh + first_col * stride_dvs
             + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
             narrow(dv, DV.dtype.element_ty, UPCAST), mask=kv_mask)


@triton.jit(do_not_specialize=["seqlen_q_bucket", "seqlen_k_bucket"])
def _dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, KeyPad, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_lb, stride_lh, stride_ls,
    stride_pb, stride_ps,
    num_heads, group_size, max_seqlen_q, max_seqlen_k, head_dim,
    scale, window_left, window_right, softcap, dropout_p, seed, seqlen_q_bucket, seqlen_k_bucket,
    HAS_BAND: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head64 = (head // group_size).to(tl.int64)
    q_start, q_len, k_start, k_len = sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, max_seqlen_q, max_seqlen_k,
                                                     IS_VARLEN)
    if start_m >= q_len:
        return
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_mask = (rows < q_len)[:, None] & d_ok[None, :]
    # Token indices times strides are 64-bit, offsets inside a tile 32-bit (see the forward).
    batch64, head64 = batch.to(tl.int64), head.to(tl.int64)
    q_start64, k_start64 = q_start.to(tl.int64), k_start.to(tl.int64)
    first_row = q_start64 + start_m
    q = tl.load(Q + batch64 * stride_qb + head64 * stride_qh + first_row * stride_qs
                + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DOut + batch64 * stride_gb + head64 * stride_gh + first_row * stride_gs
                 + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=q_mask, other=0.0)
    lse2, delta = _row_stats(Lse, Delta, batch64 * stride_lb + head64 * stride_lh + q_start64 * stride_ls, rows,
                             q_len, stride_ls)
    k_base = K + batch64 * stride_kb + kv_head64 * stride_kh
    v_base = V + batch64 * stride_vb + kv_head64 * stride_vh
    k_tile = offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_tile = offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    key_pad_row = KeyPad + batch64 * stride_pb
    scale_log2 = scale * 1.4426950408889634
    softcap_in = scale / tl.where(HAS_SOFTCAP, softcap, 1.0)
    softcap_out = softcap * 1.4426950408889634
    offset = band_offset(q_len, k_len, BOTTOM_RIGHT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Only the key blocks the forward visited (every one masked here: the backward's cost is in the dots).
    lo, _, _, hi = key_block_range(start_m, k_len, offset, window_left, window_right, HAS_BAND, HAS_KEY_PADDING,
                                   BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < k_len)[:, None] & d_ok[None, :]
        first_col = k_start64 + start_n
        k = tl.load(k_base + first_col * stride_ks + k_tile, mask=kv_mask, other=0.0)
        v = tl.load(v_base + first_col * stride_vs + v_tile, mask=kv_mask, other=0.0)
        qk = tile_dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST)
        s = scores_log2(qk, scale_log2, softcap_in, softcap_out, HAS_SOFTCAP)
        s = allowed_scores(s, rows, cols, k_len, key_pad_row, stride_ps, offset, window_left, window_right, HAS_BAND,
                           HAS_KEY_PADDING)
        p = tl.exp2(s - lse2[:, None])
        dp = tile_dot(do, tl.trans(v), None, DOT_PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, dropout_p, batch64 * num_heads + head64, rows, cols)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = softcap_grad(p * (dp - delta[:, None]), qk, softcap_in, HAS_SOFTCAP)
        dq = tile_dot(narrow(ds, k.dtype, UPCAST), k, dq, DOT_PRECISION, UPCAST)

    dq = dq * scale
    tl.store(DQ + batch64 * stride_dqb + head64 * stride_dqh + first_row * stride_dqs
             + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             narrow(dq, DQ.dtype.element_ty, UPCAST), mask=q_mask)


# Backward candidates (see the forward's), from `python -m bench.compile_audit --only attention_bwd`
# under Triton 3.6 and 3.8: no spills on the plain, causal and grouped paths, every 16-bit dot a
# wgmma (dK/dV: BLOCK_N >= 64 rows; dQ: BLOCK_M >= 64). The dK/dV program keeps its two float32
# (BLOCK_N, D) accumulators in registers (2 x BLOCK_N x D / 256 per thread with 8 warps: 128 at
# 128 x 128), which caps BLOCK_N x D at 128 x 128; at hd 256, BLOCK_N = 64 leaves room for
# BLOCK_M = 16 only. With dropout several candidates spill (the mask and Philox state on top):
# HAS_DROPOUT is in the tuning key, so the tuner picks among them separately.
DKDV_CONFIGS = {
    64: [config(64, 128, 8, 3), config(32, 128, 8, 4), config(64, 64, 8, 3)],
    128: [config(32, 128, 8, 3), config(32, 64, 8, 3), config(16, 128, 8, 3)],
    256: [config(16, 64, 8, 2), config(16, 64, 8, 3), config(16, 64, 8, 4)],
}
DKDV_CONFIGS_FP32 = {
    64: [config(32, 32, 8, 1), config(16, 64, 8, 1), config(32, 16, 8, 1)],
    128: [config(32, 32, 8, 1), config(32, 16, 4, 1), config(16, 16, 8, 1)],
    256: [config(16, 16, 8, 1), config(32, 16, 8, 1), config(16, 16, 4, 1)],
}
# dK/dV with the atomic dQ (TFORMER_ATTENTION_DQ=atomic), 16-bit: the dQ^T tile, its float32
# partial and its pointers (D x BLOCK_M each) join the two accumulators, so the largest blocks of
# DKDV_CONFIGS spill (Triton 3.6, hd 128: 72 bytes at 32 x 128 with 2 stages, 160 at 64 x 64).
# These do not, up to hd 128; at hd 256 every candidate tried spills (52 bytes at 16 x 64, 2
# stages, the least; 256+ with 1 stage or 4 warps), so it keeps the split pass's shape.
DKDV_ATOMIC_DQ_CONFIGS = {
    64: [config(32, 128, 8, 4), config(64, 64, 8, 3), config(32, 128, 8, 3)],
    128: [config(32, 64, 8, 3), config(16, 128, 8, 3), config(32, 64, 8, 2)],
    256: [config(16, 64, 8, 2)],
}
DQ_CONFIGS = {
    64: [config(128, 64, 8, 3), config(64, 128, 4, 3), config(128, 32, 4, 3)],
    128: [config(128, 64, 8, 3), config(64, 128, 8, 2), config(128, 32, 8, 3)],
    256: [config(64, 32, 8, 3), config(64, 64, 8, 2), config(128, 32, 8, 2)],
}
DQ_CONFIGS_FP32 = {
    64: [config(64, 32, 8, 1), config(32, 64, 8, 1), config(32, 32, 8, 1)],
    128: [config(32, 16, 8, 1), config(16, 32, 8, 1), config(16, 64, 8, 1)],
    256: [config(16, 16, 8, 1), config(16, 32, 8, 1), config(32, 16, 8, 1)],
}
_dkdv_tuned = autotuned(_dkdv_kernel, DKDV_CONFIGS, DKDV_CONFIGS_FP32, DKDV_ATOMIC_DQ_CONFIGS)
_dq_tuned = autotuned(_dq_kernel, DQ_CONFIGS, DQ_CONFIGS_FP32)
DELTA_BLOCK_M = 64


# How dQ is computed: "split" (the default) is FA2's deterministic two-pass backward, whose dQ
# pass recomputes S and dP (7 matrix products per block pair); "atomic" adds each key block's
# share of dQ in float32 atomics from the dK/dV pass (5 products, plus a (Sq, D) float32 buffer
# that many programs add into, in an order that varies between runs on a GPU).
DQ_ENV = "TFORMER_ATTENTION_DQ"
DQ_MODES = ("split", "atomic")
log = logging.getLogger(__name__)
_logged: set = set()


def resolve_dq_mode(mode: str | None = None) -> str:
    """``mode``, "split" when None (the backend passes the registry's choice; the environment is
    read in ``tformer.ops.overrides``, never here).

    Raises:
        ValueError: not one of ``DQ_MODES``.
        RuntimeError: "atomic" while ``torch.use_deterministic_algorithms(True)`` is in force.
    """
    chosen = mode if mode is not None else "split"
    source = "argument 'dq_mode'"
    if chosen not in DQ_MODES:
        raise ValueError(f"attention backward: {source} is {chosen!r}; expected one of {', '.join(DQ_MODES)}")
    if chosen == "atomic" and torch.are_deterministic_algorithms_enabled():
        raise RuntimeError(f"attention backward: {source} is 'atomic', whose float32 atomic dQ sums are not "
                           "reproducible, but torch.use_deterministic_algorithms(True) is set; use 'split'")
    if chosen == "atomic" and chosen not in _logged:
        _logged.add(chosen)
        log.info("attention backward: dQ by float32 atomics in the dK/dV pass (not bit-reproducible)")
    return chosen


# Expanded dK/dV (see the module docstring): worth its float32 buffers only when the grouped
# launch leaves SMs idle. Below ~2 programs per SM an H100 cannot hide one program's latency
# behind another's, and each of the few programs does group_size times the work.
EXPANDED_PROGRAMS_PER_SM = 2
# Cap on the two float32 buffers (dK and dV per query head): the backward should not surprise
# a nearly full GPU with a large allocation. Problems small enough to qualify rarely come near
# it: B=1, Hq=32, Hkv=1, Sk=2048, D=128 takes 64 MiB.
EXPANDED_MAX_BYTES = 256 << 20


def dkdv_expanded(grouped_programs: int, group_size: int, expanded_bytes: int, sm_count: int | None) -> bool:
    """True to compute dK/dV per query head and sum over the group afterwards, False to sum
    over the group inside one program per key/value head. ``sm_count`` is None on CPU tensors
    (the interpreter has no SMs): grouped."""
    if group_size == 1 or sm_count is None:
        return False
    return grouped_programs < EXPANDED_PROGRAMS_PER_SM * sm_count and expanded_bytes <= EXPANDED_MAX_BYTES


def _sm_count(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, dropout_p: float,
                       seed: int, launcher: Callable = launch, expanded: bool | None = None,
                       dq_mode: str | None = None, band: Band | None = None, softcap: float = 0.0):
    """Returns (dq, dk, dv), contiguous, in the dtypes of q, k and v.

    ``launcher`` runs each kernel (see ``attention_forward``); ``expanded`` forces one dK/dV
    way (None: ``dkdv_expanded`` picks); ``dq_mode`` "split" or "atomic" (None: see ``dq_mode``);
    ``band`` and ``softcap`` as the forward's.

    Raises:
        ValueError: too many heads or sequences for a grid, or a token or head-dim stride above 2^23 elements.
    """
    atomic_dq = resolve_dq_mode(dq_mode) == "atomic"
    varlen, num_seqs, num_heads, group_size, max_q, max_k = problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    check_tile_strides(**{name: strides4(t, varlen)[2:]
                          for name, t in dict(grad_out=grad_out, q=q, k=k, v=v, out=out).items()})
    alloc = torch.zeros if varlen else torch.empty  # packed tokens outside every sequence get 0
    if q.numel() == 0 or k.numel() == 0:  # nothing attends or nothing to attend: zero gradients
        return (torch.zeros(q.shape, dtype=q.dtype, device=q.device), torch.zeros(k.shape, dtype=k.dtype, device=k.device),
                torch.zeros(v.shape, dtype=v.dtype, device=v.device))
    head_dim = q.shape[-1]
    num_kv_heads = num_heads // group_size
    has_pad = key_padding_mask is not None
    key_pad = key_padding_mask.view(torch.uint8) if has_pad else q
    pad_strides = key_padding_mask.stride() if has_pad else (0, 0)
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    bd = block_d(head_dim)
    lse_s = lse_strides(lse, varlen)

    delta = torch.empty_like(lse)
    launcher(_delta_kernel, None, lambda b: (triton.cdiv(max_q, b["BLOCK_M"]), num_heads, num_seqs),
             (out, grad_out, delta, cu_q, *strides4(out, varlen), *strides4(grad_out, varlen), *lse_s, max_q, head_dim),
             dict(IS_VARLEN=varlen, BLOCK_D=bd, BLOCK_M=DELTA_BLOCK_M), q.device)

    common = (*strides4(q, varlen), *strides4(k, varlen), *strides4(v, varlen), *strides4(grad_out, varlen))
    buckets = seqlen_buckets(max_q, max_k)
    band, (window_left, window_right) = band_args(causal, band)
    mask_scalars = (scale, window_left, window_right, softcap, dropout_p, seed)
    scalars = (num_heads, group_size, max_q, max_k, head_dim, *mask_scalars, *buckets)
    meta = dict(**band_meta(band, softcap), HAS_KEY_PADDING=has_pad, IS_VARLEN=varlen, HAS_DROPOUT=dropout_p > 0.0,
                **dot_meta(q), BLOCK_D=bd)
    # Atomic dQ: a float32 buffer in q's layout that every key block adds into (zeros: rows
    # no key reaches get none); split: unused, q stands in for the pointer.
    dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq else q

    # The grouped launch's fewest programs: at the largest BLOCK_N its autotuner may pick.
    largest_block_n = max(c.kwargs["BLOCK_N"] for c in _dkdv_tuned.candidates(dict(meta, ATOMIC_DQ=atomic_dq)))
    grouped_programs = triton.cdiv(max_k, largest_block_n) * num_kv_heads * num_seqs
    dk_shape, dv_shape = list(k.shape), list(v.shape)
    expanded_bytes = 4 * num_heads * (k.numel() + v.numel()) // num_kv_heads
    if expanded is None:
        expanded = dkdv_expanded(grouped_programs, group_size, expanded_bytes, _sm_count(q.device))
    if expanded:
        # Per query head (axis 1 in both layouts), in float32: 16-bit partials would round
        # group_size times before the sum instead of once after it, as the grouped registers do.
        dk_shape[1] = dv_shape[1] = num_heads
        dk = alloc(dk_shape, dtype=torch.float32, device=k.device)
        dv = alloc(dv_shape, dtype=torch.float32, device=v.device)
    else:
        dk = alloc(dk_shape, dtype=k.dtype, device=k.device)
        dv = alloc(dv_shape, dtype=v.dtype, device=v.device)
    heads_per_program, programs_per_kv_head = (1, group_size) if expanded else (group_size, 1)
    dkdv_args = (q, k, v, grad_out, lse, delta, dk, dv, dq_accum, key_pad, cu_q, cu_k, *common, *strides4(dk, varlen),
                 *strides4(dv, varlen), *strides4(dq_accum, varlen), *lse_s, *pad_strides, num_heads, heads_per_program, programs_per_kv_head,
                 max_q, max_k, head_dim, *mask_scalars, *buckets)
    launcher(_dkdv_kernel, _dkdv_tuned, lambda b: (triton.cdiv(max_k, b["BLOCK_N"]), dk_shape[1], num_seqs),
             dkdv_args, dict(meta, ATOMIC_DQ=atomic_dq), q.device)
    if expanded:  # fixed-order sum over each group's query heads (head h = kv_head * group_size + g)
        dk = dk.unflatten(1, (num_kv_heads, group_size)).sum(2).to(k.dtype)
        dv = dv.unflatten(1, (num_kv_heads, group_size)).sum(2).to(v.dtype)

    if atomic_dq:
        return dq_accum.to(q.dtype), dk, dv
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    dq_args = (q, k, v, grad_out, lse, delta, dq, key_pad, cu_q, cu_k, *common, *strides4(dq, varlen), *lse_s,
               *pad_strides, *scalars)
    launcher(_dq_kernel, _dq_tuned, lambda b: (triton.cdiv(max_q, b["BLOCK_M"]), num_heads, num_seqs),
             dq_args, meta, q.device)
    return dq, dk, dv
