"""LayerNorm and RMSNorm over the last dimension, forward and backward, with the fused
pre-LN residual add (``residual_out = x + residual``, ``y = norm(residual_out)``).

One kernel pair serves both norms: RMSNorm is LayerNorm with the mean fixed at 0 (and no
bias), so ``IS_RMS`` is a ``tl.constexpr``, not a copied kernel. Statistics are float32 for
every input dtype; weight and bias may be float32 beside a half-precision x (autocast).

Rows up to ``MAX_BLOCK_N`` wide are held in registers (one read of x). Wider rows loop over
chunks: the forward combines per-chunk (count, mean, M2) with Chan et al.'s pairwise update
(one pass for the statistics, a second to normalize); the backward takes one pass for the
two row reductions and a second for dx.

dweight and dbias are reduced in two stages, as in the Triton tutorial 05 (layer-norm): each
backward program sums ``dy * xhat`` over the rows it owns into its own row of a float32
partial buffer, then a small reduction sums the partial rows. The number of programs depends
only on the device and the shape, and no atomics are used, so the gradients are bitwise
reproducible.

Launchers take tensors of shape ``(..., N)`` whose last dimension has stride 1 after
``reshape(-1, N)`` (anything else is copied once by :func:`as_rows`).
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from .rows import MAX_BLOCK_N, as_rows, block_config, launch_kernel

# Under the interpreter (CPU) a handful of backward programs keeps the Python loop short.
INTERPRETER_BWD_PROGRAMS = 4


def _contiguous_or_none(param: torch.Tensor | None) -> torch.Tensor | None:
    # weight and bias are read with unit stride; a strided (N,) parameter is copied (N elements).
    return None if param is None else param.contiguous()


def _backward_programs(device: torch.device, n_rows: int) -> int:
    # Depends only on the device and the shape: the partial sums, and so dweight, are
    # reproducible run to run.
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_BWD_PROGRAMS
    return max(1, min(n_rows, target))


@triton.jit
def _load_summed(x_ptr, res_ptr, res_out_ptr, cols, in_row, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """One chunk of the normalized input in float32: x, or x + residual rounded to x's dtype
    (the reference keeps the residual stream in x's dtype), optionally writing residual_out."""
    x = tl.load(x_ptr + cols, mask=in_row, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + cols, mask=in_row, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        if STORE_SUM:
            tl.store(res_out_ptr + cols, x, mask=in_row)
    return x.to(tl.float32)


@triton.jit
def _store_normalized(y_ptr, weight_ptr, bias_ptr, cols, in_row, xhat,
                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = xhat
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _norm_fwd_kernel(X, RESIDUAL, WEIGHT, BIAS, Y, RESIDUAL_OUT, MEAN, RSTD,
                     stride_x_row, stride_res_row, stride_y_row, stride_res_out_row,
                     n_cols, eps,
                     IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * stride_x_row
    res_ptr = RESIDUAL + row * stride_res_row
    res_out_ptr = RESIDUAL_OUT + row * stride_res_out_row
    y_ptr = Y + row * stride_y_row

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        in_row = cols < n_cols
        x = _load_summed(x_ptr, res_ptr, res_out_ptr, cols, in_row, HAS_RESIDUAL, True)
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.sum(x, axis=0) / n_cols
        centered = tl.where(in_row, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
        _store_normalized(y_ptr, WEIGHT, BIAS, cols, in_row, centered * rstd, HAS_WEIGHT, HAS_BIAS)
    else:
        # Pass 1: Chan, Golub & LeVeque's pairwise combine of per-chunk (count, mean, M2); it
        # avoids the cancellation of sum(x^2) - N*mean^2 for large-magnitude rows.
        count = tl.zeros([], dtype=tl.float32)
        mean = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_row = cols < n_cols
            x = _load_summed(x_ptr, res_ptr, res_out_ptr, cols, in_row, HAS_RESIDUAL, True)
            chunk_count = tl.minimum(n_cols - start, BLOCK_N).to(tl.float32)
            if IS_RMS:
                chunk_mean = 0.0
            else:
                chunk_mean = tl.sum(x, axis=0) / chunk_count
            centered = tl.where(in_row, x - chunk_mean, 0.0)
            total = count + chunk_count
            delta = chunk_mean - mean
            mean = mean + delta * (chunk_count / total)
            m2 = m2 + tl.sum(centered * centered, axis=0) + delta * delta * (count * chunk_count / total)
            count = total
        rstd = tl.rsqrt(m2 / n_cols + eps)
        # Pass 2: x + residual is recomputed (bitwise the same rounding) rather than read
        # back from residual_out, so no pass reads what this program just wrote.
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_row = cols < n_cols
            x = _load_summed(x_ptr, res_ptr, res_out_ptr, cols, in_row, HAS_RESIDUAL, False)
            _store_normalized(y_ptr, WEIGHT, BIAS, cols, in_row, (x - mean) * rstd, HAS_WEIGHT, HAS_BIAS)

    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd_chunk(dy_ptr, x_ptr, weight_ptr, cols, in_row, mean, rstd, HAS_WEIGHT: tl.constexpr):
    """(dy, xhat, w * dy) of one chunk in float32; zero outside the row."""
    dy = tl.load(dy_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    xhat = tl.where(in_row, (x - mean) * rstd, 0.0)
    if HAS_WEIGHT:
        wdy = dy * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    else:
        wdy = dy
    return dy, xhat, wdy


@triton.jit
def _store_dx(dx_ptr, dres_ptr, dres_out_ptr, cols, in_row, xhat, wdy, c1, c2, rstd,
              HAS_RESIDUAL: tl.constexpr, HAS_DRES_OUT: tl.constexpr):
    # d/dx of (x - mean) * rstd: rstd * (wdy - xhat * mean(xhat * wdy) - mean(wdy)); c2 = 0 for RMSNorm.
    dx = (wdy - (xhat * c1 + c2)) * rstd
    if HAS_DRES_OUT:
        # residual_out = x + residual is also used later; its gradient joins here.
        dx += tl.load(dres_out_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_row)
    if HAS_RESIDUAL:
        tl.store(dres_ptr + cols, dx.to(dres_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _norm_bwd_kernel(DY, X, WEIGHT, MEAN, RSTD, DRES_OUT, DX, DRES, DW_PARTIAL, DB_PARTIAL,
                     stride_dy_row, stride_x_row, stride_dres_out_row, stride_dx_row, stride_dres_row,
                     n_rows, n_cols,
                     IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, HAS_DRES_OUT: tl.constexpr,
                     BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    """Program ``pid`` owns rows pid, pid + P, pid + 2P, ... and row ``pid`` of the partial buffers."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    dw_partial_ptr = DW_PARTIAL + pid.to(tl.int64) * n_cols
    db_partial_ptr = DB_PARTIAL + pid.to(tl.int64) * n_cols
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        in_row = cols < n_cols
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_i32 in range(pid, n_rows, n_programs):
        row = tl.cast(row_i32, tl.int64)  # 64-bit offsets: rows * stride may pass 2**31
        dy_ptr = DY + row * stride_dy_row
        x_ptr = X + row * stride_x_row
        dres_out_ptr = DRES_OUT + row * stride_dres_out_row
        dx_ptr = DX + row * stride_dx_row
        dres_ptr = DRES + row * stride_dres_row
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.load(MEAN + row)
        if SINGLE_BLOCK:
            dy, xhat, wdy = _norm_bwd_chunk(dy_ptr, x_ptr, WEIGHT, cols, in_row, mean, rstd, HAS_WEIGHT)
            c1 = tl.sum(xhat * wdy, axis=0) / n_cols
            if IS_RMS:
                c2 = 0.0
            else:
                c2 = tl.sum(wdy, axis=0) / n_cols
            _store_dx(dx_ptr, dres_ptr, dres_out_ptr, cols, in_row, xhat, wdy, c1, c2, rstd,
                      HAS_RESIDUAL, HAS_DRES_OUT)
            dw_acc += dy * xhat
            db_acc += dy
        else:
            sum_xhat_wdy = tl.zeros([], dtype=tl.float32)
            sum_wdy = tl.zeros([], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                in_row = cols < n_cols
                dy, xhat, wdy = _norm_bwd_chunk(dy_ptr, x_ptr, WEIGHT, cols, in_row, mean, rstd, HAS_WEIGHT)
                sum_xhat_wdy += tl.sum(xhat * wdy, axis=0)
                sum_wdy += tl.sum(wdy, axis=0)
            c1 = sum_xhat_wdy / n_cols
            if IS_RMS:
                c2 = 0.0
            else:
                c2 = sum_wdy / n_cols
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                in_row = cols < n_cols
                dy, xhat, wdy = _norm_bwd_chunk(dy_ptr, x_ptr, WEIGHT, cols, in_row, mean, rstd, HAS_WEIGHT)
                _store_dx(dx_ptr, dres_ptr, dres_out_ptr, cols, in_row, xhat, wdy, c1, c2, rstd,
                          HAS_RESIDUAL, HAS_DRES_OUT)
                # Read-modify-write of this program's own partial row (zero-initialized): the
                # load and the store use the same layout, so each element is written and read
                # back by the same thread, which sees its own writes in program order.
                if HAS_WEIGHT:
                    partial = tl.load(dw_partial_ptr + cols, mask=in_row, other=0.0)
                    tl.store(dw_partial_ptr + cols, partial + dy * xhat, mask=in_row)
                if HAS_BIAS:
                    partial = tl.load(db_partial_ptr + cols, mask=in_row, other=0.0)
                    tl.store(db_partial_ptr + cols, partial + dy, mask=in_row)
    if SINGLE_BLOCK:
        if HAS_WEIGHT:
            tl.store(dw_partial_ptr + cols, dw_acc, mask=in_row)
        if HAS_BIAS:
            tl.store(db_partial_ptr + cols, db_acc, mask=in_row)


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   residual: torch.Tensor | None, eps: float, *, is_rms: bool = False,
                   max_block_n: int = MAX_BLOCK_N, launcher: Callable = launch_kernel):
    """Forward of LayerNorm (or RMSNorm with ``is_rms``) over the last dim of x ``(..., N)``.

    Returns ``(y, residual_out, mean, rstd)``: y in x's shape and dtype; residual_out = x +
    residual in x's dtype, or None without residual; mean float32 (None for
    RMSNorm) and rstd float32, both of shape ``x.shape[:-1]``: what the backward needs.
    """
    if is_rms and bias is not None:
        raise ValueError("layer_norm_fwd: RMSNorm takes no 'bias', got a tensor")
    shape, n_cols = x.shape, x.shape[-1]
    x_rows = as_rows(x)
    n_rows = x_rows.shape[0]
    weight, bias = _contiguous_or_none(weight), _contiguous_or_none(bias)
    res_rows = None if residual is None else as_rows(residual)
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    residual_out = None if residual is None else torch.empty_like(y)
    mean = None if is_rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0 and n_cols > 0:
        block_n, num_warps = block_config(n_cols, max_block_n)
        dummy = x_rows  # stands in for absent tensors; the constexpr flags keep it unread
        res_arg = dummy if res_rows is None else res_rows
        res_out_arg = dummy if residual_out is None else residual_out
        launcher(_norm_fwd_kernel, (n_rows,), (
            x_rows, res_arg, dummy if weight is None else weight, dummy if bias is None else bias,
            y, res_out_arg, rstd if mean is None else mean, rstd,
            x_rows.stride(0), res_arg.stride(0), y.stride(0), res_out_arg.stride(0),
            n_cols, eps), dict(
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, BLOCK_N=block_n, SINGLE_BLOCK=n_cols <= block_n, num_warps=num_warps))
    elif n_cols == 0:
        rstd.fill_(float("nan"))  # the mean of no elements, as torch.nn.functional.layer_norm
        if mean is not None:
            mean.fill_(float("nan"))
    y = y.view(shape)
    residual_out = None if residual_out is None else residual_out.view(shape)
    mean = None if mean is None else mean.view(shape[:-1])
    return y, residual_out, mean, rstd.view(shape[:-1])


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   mean: torch.Tensor | None, rstd: torch.Tensor, d_residual_out: torch.Tensor | None,
                   has_residual: bool, *, is_rms: bool = False, max_block_n: int = MAX_BLOCK_N,
                   launcher: Callable = launch_kernel):
    """Backward of :func:`layer_norm_fwd`.

    ``x`` is the tensor that was normalized (residual_out when there was a residual);
    ``d_residual_out`` the gradient that residual_out received from its later uses, or None.
    ``bias`` is only looked at for its dtype and presence. Returns ``(dx, d_residual, dweight,
    dbias)``: dx and d_residual (None without residual) in x's dtype, dweight and dbias in
    their parameter's dtype (None when that parameter is None).
    """
    shape, n_cols = x.shape, x.shape[-1]
    x_rows, dy_rows = as_rows(x), as_rows(dy)
    weight = _contiguous_or_none(weight)
    rstd = rstd.reshape(-1)
    mean = None if mean is None else mean.reshape(-1)
    n_rows = x_rows.shape[0]
    dres_out_rows = None if d_residual_out is None else as_rows(d_residual_out)
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    d_residual = torch.empty_like(dx) if has_residual else None
    n_programs = _backward_programs(x.device, n_rows)
    # dy, x, x-hat, the weight and the two partial-sum accumulators are live per element. 16 per
    # thread (16 warps at N = 8192) stays within 128 registers under Triton 3.6 and 3.8; 8 per
    # thread (32 warps) caps a thread at 64 registers, and 3.6 spills there (bench.compile_audit).
    block_n, num_warps = block_config(n_cols, max_block_n)
    single_block = n_cols <= block_n
    # The chunked path accumulates into the partial buffers in place, so they start at zero.
    make_partial = torch.empty if single_block else torch.zeros
    dw_partial = None if weight is None else make_partial((n_programs, n_cols), dtype=torch.float32,
                                                          device=x.device)
    db_partial = None if bias is None else make_partial((n_programs, n_cols), dtype=torch.float32,
                                                        device=x.device)
    if n_rows > 0 and n_cols > 0:
        dummy = x_rows
        dres_out_arg = dummy if dres_out_rows is None else dres_out_rows
        dres_arg = dx if d_residual is None else d_residual
        launcher(_norm_bwd_kernel, (n_programs,), (
            dy_rows, x_rows, dummy if weight is None else weight, rstd if mean is None else mean, rstd,
            dres_out_arg, dx, dres_arg, dx if dw_partial is None else dw_partial,
            dx if db_partial is None else db_partial,
            dy_rows.stride(0), x_rows.stride(0), dres_out_arg.stride(0), dx.stride(0), dres_arg.stride(0),
            n_rows, n_cols), dict(
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=has_residual, HAS_DRES_OUT=d_residual_out is not None,
            BLOCK_N=block_n, SINGLE_BLOCK=single_block, num_warps=num_warps))
    elif n_rows == 0:
        for partial in (dw_partial, db_partial):
            if partial is not None:
                partial.zero_()
    # Stage 2 of the dweight/dbias reduction: a fixed-order sum over the program rows.
    dweight = None if weight is None else dw_partial.sum(dim=0).to(weight.dtype)
    dbias = None if bias is None else db_partial.sum(dim=0).to(bias.dtype)
    dx = dx.view(shape)
    d_residual = None if d_residual is None else d_residual.view(shape)
    return dx, d_residual, dweight, dbias


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float, *,
                 max_block_n: int = MAX_BLOCK_N):
    """RMSNorm forward: ``(y, residual_out, rstd)``; see :func:`layer_norm_fwd`."""
    y, residual_out, _, rstd = layer_norm_fwd(x, weight, None, residual, eps, is_rms=True,
                                              max_block_n=max_block_n)
    return y, residual_out, rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                 d_residual_out: torch.Tensor | None, has_residual: bool, *, max_block_n: int = MAX_BLOCK_N):
    """RMSNorm backward: ``(dx, d_residual, dweight)``; see :func:`layer_norm_bwd`."""
    dx, d_residual, dweight, _ = layer_norm_bwd(dy, x, weight, None, None, rstd, d_residual_out, has_residual,
                                                is_rms=True, max_block_n=max_block_n)
    return dx, d_residual, dweight
