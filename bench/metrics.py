"""How work is counted (as /work/shared/ANCHORS.md counts it) and what each row records in
pytest-benchmark's ``extra_info``."""

from __future__ import annotations

import math

import torch

from .ceilings import Ceilings

# Attention: the forward is 4·B·H·Sq·Sk·D FLOPs (two matmuls), halved when causal; the
# backward counts as 2.5 forwards (five matmuls against two).
ATTENTION_PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# LayerNorm and softmax, in units of M·N elements moved: forward reads x and writes y;
# backward reads x (or y) and dy and writes dx.
ROW_PASS_TENSORS = {"fwd": 2, "bwd": 3}


def attention_flops(shape: tuple[int, int, int, int], causal: bool, pass_name: str) -> float:
    batch, heads, seq, head_dim = shape
    forward = 4.0 * batch * heads * seq * seq * head_dim
    return forward * (0.5 if causal else 1.0) * ATTENTION_PASS_FACTOR[pass_name]


def row_bytes(shape: tuple[int, int], dtype: torch.dtype, pass_name: str) -> float:
    rows, features = shape
    return float(ROW_PASS_TENSORS[pass_name] * rows * features * dtype.itemsize)


def describe(benchmark, *, op: str, pass_name: str, candidate, suite: str, shape, dtype: torch.dtype,
             device_info: dict, ceilings: Ceilings, check: str, max_abs_error: float, **extra) -> None:
    benchmark.extra_info.update({
        "op": op, "pass": pass_name, "impl": candidate.name, "kind": candidate.kind, "suite": suite,
        "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "check": check,
        "max_abs_error": max_abs_error, **device_info, **ceilings.as_extra_info(), **extra})


def record_throughput(benchmark, seconds: float, ceilings: Ceilings, *, flops: float | None = None,
                      bytes_moved: float | None = None) -> None:
    """TFLOP/s or GB/s of the median time, and its fraction of the matching ceiling."""
    info = benchmark.extra_info
    if not math.isfinite(seconds) or seconds <= 0:
        return
    info["median_s"] = seconds
    if flops is not None:
        info["flops"] = flops
        info["tflops"] = flops / seconds / 1e12
        info["fraction_of_matmul_ceiling"] = info["tflops"] / ceilings.matmul_tflops
    if bytes_moved is not None:
        info["bytes"] = bytes_moved
        info["gbps"] = bytes_moved / seconds / 1e9
        info["fraction_of_copy_ceiling"] = info["gbps"] / ceilings.copy_gbps
