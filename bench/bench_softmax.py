"""Softmax forward and backward over the last dimension: tformer's backends against
torch.softmax, the same under torch.compile, and Liger-Kernel's softmax when installed."""

from __future__ import annotations

import pytest
import torch

import tformer

from .candidates import (Candidate, candidate_params, compiled, cuda_only, first_call_or_skip, needs_package,
                         tformer_candidates)
from .checks import check_against_reference
from .metrics import describe, record_throughput, row_bytes
from .shapes import DEVICE, case_id, row_cases
from .timing import time_pass


def _torch(x):
    return torch.softmax(x, dim=-1)


def _liger(x):
    from liger_kernel.ops.softmax import LigerSoftmaxFunction

    return LigerSoftmaxFunction.apply(x)


def _tformer(x, *, backend: str):
    return tformer.ops.softmax(x, dim=-1, backend=backend)


CANDIDATES = tformer_candidates(_tformer) + [
    Candidate("torch", "anchor", _torch),
    # Compiling on the CPU needs a C++ toolchain and seconds per shape: GPU only.
    Candidate("torch-compile", "anchor", compiled(_torch), why_not=cuda_only),
    Candidate("liger", "anchor", _liger, why_not=needs_package("liger_kernel.ops.softmax", "pip install liger-kernel")),
]


def _make_inputs(shape, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    # Spread 4: rows with both near-zero and dominant entries, as attention scores have.
    x = (4 * torch.randn(shape, generator=generator, device=device)).to(dtype).requires_grad_()
    grad_out = torch.randn(shape, generator=generator, device=device).to(dtype)
    return x, grad_out


def _reference64(x, grad_out, with_grads):
    x64 = x.detach().double().requires_grad_()
    out = tformer.ops.softmax(x64, dim=-1, backend="reference")
    expected = {"out": out.detach()}
    if with_grads:
        out.backward(grad_out.double())
        expected["dx"] = x64.grad
    return expected


@pytest.mark.parametrize("case", row_cases(), ids=case_id)
@pytest.mark.parametrize("candidate", candidate_params(CANDIDATES, DEVICE))
@pytest.mark.parametrize("pass_name", ["fwd", "bwd"])
def test_softmax(benchmark, pass_name, candidate, case, device, ceilings, flusher, device_info):
    suite, shape, dtype = case
    x, grad_out = _make_inputs(shape, dtype, device)

    # Correctness gate: the benchmark fails here if the candidate is wrong.
    out = first_call_or_skip(candidate, device, dtype, x)
    with_grads = pass_name == "bwd"
    expected = _reference64(x, grad_out, with_grads)
    what = f"softmax {candidate.name} {shape}"
    error = check_against_reference({"out": out}, {"out": expected.pop("out")}, dtype, "forward", what)
    if with_grads:
        out.backward(grad_out)
        error = max(error, check_against_reference({"dx": x.grad}, expected, dtype, "grad", what))
    del out

    describe(benchmark, op="softmax", pass_name=pass_name, candidate=candidate, suite=suite, shape=shape,
             dtype=dtype, device_info=device_info, ceilings=ceilings, check="float64 reference, whole output",
             max_abs_error=error)
    seconds = time_pass(benchmark, pass_name, lambda: candidate.call(x), [x], grad_out, device, flusher)
    record_throughput(benchmark, seconds, ceilings, bytes_moved=row_bytes(shape, dtype, pass_name))
