"""Softmax along the last dimension, ``softmax(x * scale + mask)``, forward and backward.

The mask is bool (True takes part) or float (added to the scaled scores; ``-inf`` removes an
entry). It arrives expanded to x's shape as a view whose broadcast dims have stride 0, and is
read through its strides, never materialized: the rows' leading dims are collapsed to at most
three (size, stride) pairs (see :func:`mask_row_layout`).

Rows up to ``MAX_BLOCK_N`` are held in registers. Longer rows take the online softmax
(Milakov & Gimelshein, 2018): one pass keeps a running max ``m`` and a running sum ``l``
rescaled by ``exp(m_old - m_new)`` whenever the max grows, a second pass writes
``exp(s - m) / l``. A row where nothing takes part (all ``-inf``) gets zeros, never NaN: its
max is taken as 0 and its sum ``l`` (0) as 1.

Backward: ``d_scores = y * (dy - sum(y * dy))``; ``dx = scale * d_scores``, and the gradient
of an additive mask is ``d_scores`` itself.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from .rows import MAX_BLOCK_N, as_rows, block_config, launch_kernel

NO_MASK, BOOL_MASK, ADDITIVE_MASK = 0, 1, 2


def mask_row_layout(mask: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int, int]]:
    """``(mask, (D0, D1, D2), (s0, s1, s2))``: row ``r`` of x viewed as ``(rows, N)`` reads the
    mask at ``i0 * s0 + i1 * s1 + i2 * s2`` with ``(i0, i1, i2)`` the row-major digits of ``r``.

    Leading dims of size 1 are dropped and neighbours merged where their strides allow (a
    broadcast pair, stride 0 and 0, always merges). A mask that still needs more than three
    leading dims (rare: e.g. 5-D with alternating broadcast) is copied once with
    ``.contiguous()``, which always merges to one dim.
    """
    merged: list[list[int]] = []
    for size, stride in zip(mask.shape[:-1], mask.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 3:
        return mask_row_layout(mask.contiguous())
    merged = [[1, 0]] * (3 - len(merged)) + merged
    sizes = tuple(size for size, _ in merged)
    strides = tuple(stride for _, stride in merged)
    return mask, sizes, strides


@triton.jit
def _scores(x_ptr, mask_ptr, cols, in_row, scale, stride_mask_col, MASK_MODE: tl.constexpr):
    """One chunk of ``x * scale + mask`` in float32, ``-inf`` outside the row and where masked out."""
    s = tl.load(x_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * scale
    if MASK_MODE == 1:
        keep = tl.load(mask_ptr + cols * stride_mask_col, mask=in_row, other=0) != 0
        s = tl.where(keep, s, float("-inf"))
    elif MASK_MODE == 2:
        s += tl.load(mask_ptr + cols * stride_mask_col, mask=in_row, other=0.0).to(tl.float32)
    return tl.where(in_row, s, float("-inf"))


@triton.jit
def _finite_max(m):
    # exp(s - m) with m = -inf would be exp(-inf + inf) = NaN; a fully masked row uses 0 instead.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _softmax_fwd_kernel(X, MASK, Y, stride_x_row, stride_y_row,
                        mask_size1, mask_size2, stride_mask0, stride_mask1, stride_mask2, stride_mask_col,
                        n_cols, scale,
                        MASK_MODE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * stride_x_row
    y_ptr = Y + row * stride_y_row
    # Row-major digits of the row over the mask's (collapsed) leading dims.
    i2 = row % mask_size2
    i1 = (row // mask_size2) % mask_size1
    i0 = row // mask_size2 // mask_size1
    mask_ptr = MASK + i0 * stride_mask0 + i1 * stride_mask1 + i2 * stride_mask2

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        in_row = cols < n_cols
        s = _scores(x_ptr, mask_ptr, cols, in_row, scale, stride_mask_col, MASK_MODE)
        p = tl.exp(s - _finite_max(tl.max(s, axis=0)))
        total = tl.sum(p, axis=0)
        # A fully masked row has p == 0 everywhere and total == 0: dividing by 1 keeps it 0.
        y = p / tl.where(total > 0, total, 1.0)
        tl.store(y_ptr + cols, y.to(Y.dtype.element_ty), mask=in_row)
    else:
        # Online softmax: running max and running sum, rescaled when the max grows.
        running_max = tl.full([], float("-inf"), dtype=tl.float32)
        total = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_row = cols < n_cols
            s = _scores(x_ptr, mask_ptr, cols, in_row, scale, stride_mask_col, MASK_MODE)
            new_max = tl.maximum(running_max, tl.max(s, axis=0))
            # The true max stays -inf until something takes part, so a later finite max is
            # not compared against a stand-in 0 (exp(-1e4 - 0) would underflow the sum).
            reference = _finite_max(new_max)
            total = total * tl.exp(running_max - reference) + tl.sum(tl.exp(s - reference), axis=0)
            running_max = new_max
        inv_total = 1.0 / tl.where(total > 0, total, 1.0)  # total == 0 only where every exp is 0
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_row = cols < n_cols
            s = _scores(x_ptr, mask_ptr, cols, in_row, scale, stride_mask_col, MASK_MODE)
            y = tl.exp(s - _finite_max(running_max)) * inv_total
            tl.store(y_ptr + cols, y.to(Y.dtype.element_ty), mask=in_row)


@triton.jit
def _store_grads(dx_ptr, dmask_ptr, cols, in_row, y, dy, y_dot_dy, scale, HAS_DMASK: tl.constexpr):
    d_scores = y * (dy - y_dot_dy)
    tl.store(dx_ptr + cols, (d_scores * scale).to(dx_ptr.dtype.element_ty), mask=in_row)
    if HAS_DMASK:
        tl.store(dmask_ptr + cols, d_scores.to(dmask_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _softmax_bwd_kernel(DY, Y, DX, DMASK, stride_dy_row, stride_y_row, stride_dx_row, stride_dmask_row,
                        n_cols, scale,
                        HAS_DMASK: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dy_ptr = DY + row * stride_dy_row
    y_ptr = Y + row * stride_y_row
    dx_ptr = DX + row * stride_dx_row
    dmask_ptr = DMASK + row * stride_dmask_row
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        in_row = cols < n_cols
        y = tl.load(y_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        _store_grads(dx_ptr, dmask_ptr, cols, in_row, y, dy, tl.sum(y * dy, axis=0), scale, HAS_DMASK)
    else:
        y_dot_dy = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_row = cols < n_cols
            y = tl.load(y_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            y_dot_dy += tl.sum(y * dy, axis=0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_row = cols < n_cols
            y = tl.load(y_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            _store_grads(dx_ptr, dmask_ptr, cols, in_row, y, dy, y_dot_dy, scale, HAS_DMASK)


def softmax_fwd(x: torch.Tensor, mask: torch.Tensor | None, scale: float, *,
                max_block_n: int = MAX_BLOCK_N, launcher: Callable = launch_kernel) -> torch.Tensor:
    """``softmax(x * scale + mask)`` over the last dim of x ``(..., N)``, in x's dtype.

    ``mask`` is None or has x's shape (a broadcast view is fine: it is read by strides); bool
    means True takes part, a float mask is added to the scaled scores.
    """
    shape, n_cols = x.shape, x.shape[-1]
    x_rows = as_rows(x)
    n_rows = x_rows.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if mask is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"softmax_fwd: argument 'mask' must have x's shape {tuple(shape)} (expand it), "
                         f"got {tuple(mask.shape)}")
    if n_rows > 0 and n_cols > 0:
        if mask is None:
            mask_mode, mask_arg, sizes, strides, stride_col = NO_MASK, x_rows, (1, 1, 1), (0, 0, 0), 0
        else:
            # Triton has no bool pointer loads we rely on; the bytes are the same as uint8.
            mask_mode = BOOL_MASK if mask.dtype == torch.bool else ADDITIVE_MASK
            mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
            mask_arg, sizes, strides = mask_row_layout(mask_arg)
            stride_col = mask_arg.stride(-1)
        block_n, num_warps = block_config(n_cols, max_block_n)
        launcher(_softmax_fwd_kernel, (n_rows,), (
            x_rows, mask_arg, y, x_rows.stride(0), y.stride(0),
            sizes[1], sizes[2], strides[0], strides[1], strides[2], stride_col,
            n_cols, scale), dict(
            MASK_MODE=mask_mode, BLOCK_N=block_n, SINGLE_BLOCK=n_cols <= block_n, num_warps=num_warps))
    return y.view(shape)


def softmax_bwd(dy: torch.Tensor, y: torch.Tensor, scale: float, need_mask_grad: bool, *,
                max_block_n: int = MAX_BLOCK_N,
                launcher: Callable = launch_kernel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dx, d_mask)`` from the forward's output ``y``: dx in y's dtype; d_mask (the gradient
    of an additive mask, x's shape, float32) only when ``need_mask_grad``, else None."""
    shape, n_cols = y.shape, y.shape[-1]
    y_rows, dy_rows = as_rows(y), as_rows(dy)
    n_rows = y_rows.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=y.dtype, device=y.device)
    d_mask = torch.empty((n_rows, n_cols), dtype=torch.float32, device=y.device) if need_mask_grad else None
    if n_rows > 0 and n_cols > 0:
        block_n, num_warps = block_config(n_cols, max_block_n)
        dmask_arg = dx if d_mask is None else d_mask
        launcher(_softmax_bwd_kernel, (n_rows,), (
            dy_rows, y_rows, dx, dmask_arg, dy_rows.stride(0), y_rows.stride(0), dx.stride(0), dmask_arg.stride(0),
            n_cols, scale), dict(
            HAS_DMASK=need_mask_grad, BLOCK_N=block_n, SINGLE_BLOCK=n_cols <= block_n, num_warps=num_warps))
    return dx.view(shape), None if d_mask is None else d_mask.view(shape)
