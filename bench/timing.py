"""Clocks and the timing loop shared by every benchmark.

On a GPU a host clock would time the kernel launch, not the kernel, so the clock records CUDA
events instead (as ``triton.testing.do_bench`` does), and the L2 cache is cleared before every
timed call so a memory-bound kernel cannot read its input from the previous repeat.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

# H100 and H200 have 50 MB of L2; writing 256 MB evicts all of it.
L2_FLUSH_BYTES = 256 * 1024 * 1024
GPU_WARMUP_SECONDS = 0.025  # do_bench's defaults: 25 ms of warm-up, about 100 ms of repeats
# TFORMER_BENCH_MEASURE_SECONDS shortens the repeats where a session's minutes are few (gpu_session.sh first).
GPU_MEASURE_SECONDS = float(os.environ.get("TFORMER_BENCH_MEASURE_SECONDS", "0.1"))
GPU_ROUNDS = (10, 1000)
CPU_ROUNDS = 3  # CPU rows are correctness smoke runs; a few rounds keep the suite in budget


class _CudaEventStamp:
    """What :func:`cuda_event_clock` returns: ``end - start`` waits for ``end`` and gives the
    GPU time between the two events in seconds, which is all pytest-benchmark asks of a timer."""

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, start: "_CudaEventStamp") -> float:
        self.event.synchronize()
        return start.event.elapsed_time(self.event) / 1e3


def cuda_event_clock() -> _CudaEventStamp:
    """A pytest-benchmark timer (``@pytest.mark.benchmark(timer=...)``) that measures GPU time."""
    return _CudaEventStamp()


def clock_for(device: torch.device) -> Callable:
    return cuda_event_clock if device.type == "cuda" else time.perf_counter


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class L2Flusher:
    """Evicts the L2 cache by writing a 256 MB buffer; a no-op on the CPU, whose caches a
    small smoke-run shape fits anyway."""

    def __init__(self, device: torch.device):
        self.buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` (CUDA events on a GPU); used for ceilings and to size rounds."""
    clock = clock_for(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def run_benchmark(benchmark, target: Callable[[], object], device: torch.device,
                  setup: Callable[[], None] | None = None, flusher: L2Flusher | None = None) -> float:
    """Time ``target`` with pytest-benchmark and return its median in seconds.

    ``setup`` (e.g. clearing gradients) and the L2 flush run before every round, untimed.
    On a GPU the number of rounds is sized like do_bench: about 100 ms of repeats after
    about 25 ms of warm-up.
    """

    def before_round():
        if setup is not None:
            setup()
        if flusher is not None:
            flusher()

    if device.type == "cuda":
        def one_call():
            before_round()
            target()

        estimate = median_seconds(one_call, device, repeats=3)
        warmup_rounds = max(1, int(GPU_WARMUP_SECONDS / max(estimate, 1e-6)))
        rounds = int(min(max(GPU_MEASURE_SECONDS / max(estimate, 1e-6), GPU_ROUNDS[0]), GPU_ROUNDS[1]))
    else:
        warmup_rounds, rounds = 1, CPU_ROUNDS
    benchmark.pedantic(target, setup=before_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else float("nan")


def time_pass(benchmark, pass_name: str, forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor],
              grad_out: torch.Tensor, device: torch.device, flusher: L2Flusher) -> float:
    """Time one pass of a differentiable op and return the median seconds.

    ``forward()`` computes the output from the ``leaves`` (inputs that require grad).
    "fwd" times the forward (as in training: the graph is recorded); "bwd" times
    ``backward`` alone on a graph recorded once (retain_graph); "fwd+bwd" times both.
    Gradients are cleared before every round so none is accumulated into.
    """
    def clear_grads():
        for leaf in leaves:
            leaf.grad = None

    if pass_name == "fwd":
        return run_benchmark(benchmark, forward, device, flusher=flusher)
    if pass_name == "bwd":
        out = forward()
        return run_benchmark(benchmark, lambda: out.backward(grad_out, retain_graph=True), device,
                             setup=clear_grads, flusher=flusher)
    if pass_name == "fwd+bwd":
        return run_benchmark(benchmark, lambda: forward().backward(grad_out), device, setup=clear_grads,
                             flusher=flusher)
    raise ValueError(f"time_pass: argument 'pass_name' must be 'fwd', 'bwd' or 'fwd+bwd', got {pass_name!r}")
