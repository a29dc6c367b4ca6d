"""Benchmark shapes: the rows of /work/shared/ANCHORS.md and a sequence-length sweep on a GPU;
small shapes on a CPU, where the rows are a correctness smoke run, not a speed measurement."""

from __future__ import annotations

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = (torch.bfloat16, torch.float16) if ON_GPU else (torch.float32,)

# (B, H, S, D), each causal and not.
ATTENTION_ANCHOR_SHAPES = [(4, 16, 4096, 128), (8, 16, 2048, 64), (16, 8, 1024, 64), (32, 8, 512, 64)]
# 16k tokens per batch at every length (B * S = 16384), H = 16, D = 128: the FlashAttention-2
# paper's sweep; bf16 only.
ATTENTION_SWEEP_SHAPES = [(16384 // seq, 16, seq, 128) for seq in (512, 1024, 2048, 4096, 8192, 16384)]
CPU_ATTENTION_SHAPES = [(2, 2, 64, 32), (1, 2, 77, 48)]

ROW_SHAPES = [(65536, 512), (65536, 1024), (16384, 4096), (16384, 8192)]  # (M, N) of LayerNorm and softmax
CPU_ROW_SHAPES = [(256, 512), (100, 1000)]


def attention_cases() -> list[tuple[str, tuple, torch.dtype]]:
    """(suite, (B, H, S, D), dtype) for this device; suite is "anchors", "seq_sweep" or "cpu"."""
    if not ON_GPU:
        return [("cpu", shape, dtype) for shape in CPU_ATTENTION_SHAPES for dtype in DTYPES]
    cases = [("anchors", shape, dtype) for shape in ATTENTION_ANCHOR_SHAPES for dtype in DTYPES]
    return cases + [("seq_sweep", shape, torch.bfloat16) for shape in ATTENTION_SWEEP_SHAPES]


def row_cases() -> list[tuple[str, tuple, torch.dtype]]:
    """(suite, (M, N), dtype) for LayerNorm and softmax."""
    if not ON_GPU:
        return [("cpu", shape, dtype) for shape in CPU_ROW_SHAPES for dtype in DTYPES]
    return [("anchors", shape, dtype) for shape in ROW_SHAPES for dtype in DTYPES]


def case_id(case) -> str:
    suite, shape, dtype = case
    return f"{suite}-{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}"
