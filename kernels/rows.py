"""What the row kernels (LayerNorm/RMSNorm and softmax, one program per row of the last
dimension) share on the host side: the block size and warp heuristic, and the 2-D row view
their launchers hand to the kernels."""

from __future__ import annotations

import torch
import triton

# Widest row held in registers; wider rows loop over chunks of this many columns.
MAX_BLOCK_N = 8192


def block_config(n_cols: int, max_block_n: int = MAX_BLOCK_N, per_thread: int = 16) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of ``n_cols``: the heuristic that replaces autotuning.

    BLOCK_N is the next power of two of the row (at least 16), capped at ``max_block_n``;
    the warps (4 to 32) grow with the block so each thread holds at most ``per_thread``
    elements per tensor. Kernels with many row-long tensors live at once take a smaller
    ``per_thread``: more threads, fewer registers each (``python -m bench.compile_audit``).
    """
    if max_block_n < 16 or max_block_n & (max_block_n - 1):
        raise ValueError(f"block_config: argument 'max_block_n' must be a power of two >= 16, got {max_block_n}")
    block_n = min(max(triton.next_power_of_2(n_cols), 16), max_block_n)
    num_warps = min(32, max(4, block_n // (32 * per_thread)))
    return block_n, num_warps


def launch_kernel(kernel, grid: tuple, args: tuple, meta: dict) -> None:
    """``kernel[grid](*args, **meta)``: the default ``launcher`` of the row launchers.
    ``bench.compile_audit`` passes a recording one, to lower each kernel with the arguments (and
    so the specialization) of a real launch."""
    kernel[grid](*args, **meta)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, N)`` view with unit column stride; copies only when no such view
    exists (e.g. a transposed tensor). A sliced tensor such as ``x[:, :N]`` is not copied."""
    # The row count is explicit: reshape(-1, 0) is ambiguous for an empty last dimension.
    rows = t.reshape(t.shape[:-1].numel(), t.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows
