"""What the LayerNorm and softmax benchmarks share: their anchors, and one row's body (the
float64 correctness gate, then the timed pass and its GB/s)."""

from __future__ import annotations

from typing import Callable

import torch

from bench.candidates import Candidate, compiled, cuda_only, first_call_or_skip, needs_package
from bench.checks import check_against_reference
from bench.metrics import describe, record_throughput, row_bytes
from bench.timing import time_pass


def row_anchors(torch_call: Callable, liger_call: Callable, liger_module: str) -> list[Candidate]:
    """Eager PyTorch, the same under torch.compile, and Liger-Kernel (``liger_module`` is what
    must be importable)."""
    return [
        Candidate("torch", "anchor", torch_call),
        # Compiling on the CPU needs a C++ toolchain and seconds per shape: GPU only.
        Candidate("torch-compile", "anchor", compiled(torch_call), why_not=cuda_only),
        Candidate("liger", "anchor", liger_call, why_not=needs_package(liger_module, "pip install liger-kernel")),
    ]


def _reference64(reference_call: Callable, leaves: list[torch.Tensor], grad_names: list[str],
                 grad_out: torch.Tensor, with_grads: bool) -> dict[str, torch.Tensor]:
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    out = reference_call(*leaves64)
    expected = {"out": out.detach()}
    if with_grads:
        out.backward(grad_out.double())
        expected.update(zip(grad_names, (leaf.grad for leaf in leaves64)))
    return expected


def check_then_time(benchmark, *, op: str, pass_name: str, candidate: Candidate, case, leaves: list[torch.Tensor],
                    grad_names: list[str], grad_out: torch.Tensor, reference_call: Callable, device: torch.device,
                    ceilings, flusher, device_info: dict) -> None:
    """One benchmark row of a row op called as ``candidate.call(*leaves)``: fail unless its output
    (and, for "bwd", the gradients of ``leaves``, named ``grad_names``) match ``reference_call``
    in float64, then time ``pass_name`` and record GB/s."""
    suite, shape, dtype = case
    # Correctness gate: the benchmark fails here if the candidate is wrong.
    out = first_call_or_skip(candidate, device, dtype, *leaves)
    with_grads = pass_name == "bwd"
    expected = _reference64(reference_call, leaves, grad_names, grad_out, with_grads)
    what = f"{op} {candidate.name} {shape}"
    error = check_against_reference({"out": out}, {"out": expected.pop("out")}, dtype, "forward", what)
    if with_grads:
        out.backward(grad_out)
        grads = dict(zip(grad_names, (leaf.grad for leaf in leaves)))
        error = max(error, check_against_reference(grads, expected, dtype, "grad", what))
    del out

    describe(benchmark, op=op, pass_name=pass_name, candidate=candidate, suite=suite, shape=shape,
             dtype=dtype, device_info=device_info, ceilings=ceilings, check="float64 reference, whole output",
             max_abs_error=error)
    seconds = time_pass(benchmark, pass_name, lambda: candidate.call(*leaves), leaves, grad_out, device, flusher)
    record_throughput(benchmark, seconds, ceilings, bytes_moved=row_bytes(shape, dtype, pass_name))
