"""LayerNorm forward and backward: tformer's backends against torch.nn.functional.layer_norm,
the same under torch.compile, and Liger-Kernel's Triton LayerNorm when installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tformer

from .candidates import (Candidate, candidate_params, compiled, cuda_only, first_call_or_skip, needs_package,
                         tformer_candidates)
from .checks import check_against_reference
from .metrics import describe, record_throughput, row_bytes
from .shapes import DEVICE, case_id, row_cases
from .timing import time_pass

EPS = 1e-5


def _torch(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def _liger(x, weight, bias):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return LigerLayerNormFunction.apply(x, weight, bias, EPS)


def _tformer(x, weight, bias, *, backend: str):
    return tformer.ops.layer_norm(x, weight, bias, EPS, backend=backend)


CANDIDATES = tformer_candidates(_tformer) + [
    Candidate("torch", "anchor", _torch),
    # Compiling on the CPU needs a C++ toolchain and seconds per shape: GPU only.
    Candidate("torch-compile", "anchor", compiled(_torch), why_not=cuda_only),
    Candidate("liger", "anchor", _liger, why_not=needs_package("liger_kernel", "pip install liger-kernel")),
]


def _make_inputs(shape, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    features = shape[-1]
    x = torch.randn(shape, generator=generator, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(features, generator=generator, device=device)).to(dtype)
    bias = (0.1 * torch.randn(features, generator=generator, device=device)).to(dtype)
    grad_out = torch.randn(shape, generator=generator, device=device).to(dtype)
    return [t.requires_grad_() for t in (x, weight, bias)], grad_out


def _reference64(leaves, grad_out, with_grads):
    x, weight, bias = (t.detach().double().requires_grad_() for t in leaves)
    out = tformer.ops.layer_norm(x, weight, bias, EPS, backend="reference")
    expected = {"out": out.detach()}
    if with_grads:
        out.backward(grad_out.double())
        expected.update(dx=x.grad, dweight=weight.grad, dbias=bias.grad)
    return expected


@pytest.mark.parametrize("case", row_cases(), ids=case_id)
@pytest.mark.parametrize("candidate", candidate_params(CANDIDATES, DEVICE))
@pytest.mark.parametrize("pass_name", ["fwd", "bwd"])
def test_layer_norm(benchmark, pass_name, candidate, case, device, ceilings, flusher, device_info):
    suite, shape, dtype = case
    leaves, grad_out = _make_inputs(shape, dtype, device)
    x, weight, bias = leaves

    # Correctness gate: the benchmark fails here if the candidate is wrong.
    out = first_call_or_skip(candidate, device, dtype, x, weight, bias)
    with_grads = pass_name == "bwd"
    expected = _reference64(leaves, grad_out, with_grads)
    what = f"layer_norm {candidate.name} {shape}"
    error = check_against_reference({"out": out}, {"out": expected.pop("out")}, dtype, "forward", what)
    if with_grads:
        out.backward(grad_out)
        grads = {"dx": x.grad, "dweight": weight.grad, "dbias": bias.grad}
        error = max(error, check_against_reference(grads, expected, dtype, "grad", what))
    del out

    describe(benchmark, op="layer_norm", pass_name=pass_name, candidate=candidate, suite=suite, shape=shape,
             dtype=dtype, device_info=device_info, ceilings=ceilings, check="float64 reference, whole output",
             max_abs_error=error)
    seconds = time_pass(benchmark, pass_name, lambda: candidate.call(x, weight, bias), leaves, grad_out, device,
                        flusher)
    record_throughput(benchmark, seconds, ceilings, bytes_moved=row_bytes(shape, dtype, pass_name))
