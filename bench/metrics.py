"""How work is counted (as /work/shared/ANCHORS.md counts it) and what each row records in
pytest-benchmark's ``extra_info``."""

from __future__ import annotations

import math

import torch

from bench.ceilings import Ceilings
from tformer.training.device_peak import device_peak_flops

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


def check_training_works(name: str, losses: list[float]) -> None:
    """The correctness gate of a timed training step: finite warm-up losses that go down on
    the fixed batch."""
    assert all(map(math.isfinite, losses)), f"{name}: non-finite loss {losses}"
    assert losses[-1] < losses[0], f"{name}: loss did not decrease over {len(losses)} steps: {losses}"


def record_train_step(benchmark, seconds: float, tokens: int, flops_per_token: float, ceilings: Ceilings,
                      device: torch.device) -> None:
    """tokens/s, TFLOP/s, MFU, fraction of the matmul ceiling and peak memory of a step that
    took ``seconds`` for ``tokens`` tokens."""
    tokens_per_s = tokens / seconds
    achieved_flops = tokens_per_s * flops_per_token
    benchmark.extra_info.update(
        median_s=seconds, tokens_per_s=tokens_per_s, flops_per_token=flops_per_token,
        # MFU against the measured device's datasheet peak (989 TFLOP/s on an H100 SXM, as
        # ANCHORS.md uses); None where the device has no known peak (a CPU).
        tflops=achieved_flops / 1e12, mfu=achieved_flops / peak if (peak := device_peak_flops(device)) else None,
        fraction_of_matmul_ceiling=achieved_flops / 1e12 / ceilings.matmul_tflops,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
