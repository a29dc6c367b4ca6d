"""Attention forward, backward and forward+backward: tformer's backends against SDPA's
FlashAttention-2, cuDNN, memory-efficient and math backends, and flash-attn when installed."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tformer

from bench.candidates import (Candidate, candidate_params, cuda_only, first_call_or_skip, needs_package,
                         tformer_candidates)
from bench.checks import check_against_reference
from bench.environment import environment
from bench.metrics import attention_flops, describe, record_throughput
from bench.shapes import DEVICE, attention_cases, case_id
from bench.timing import time_pass

# The float64 reference checks the whole output when it holds at most this many scores, else
# the first batch element and first two heads (heads are independent, so a slice is exact).
FULL_CHECK_SCORES = 1 << 24
# Candidates that materialize the (B, H, Sq, Sk) scores in float32 are skipped above this
# size; the 16k-token rows would need tens of GB for their autograd graph.
MATERIALIZED_SCORES_LIMIT_BYTES = 8 << 30
MATERIALIZING = ("tformer-reference", "sdpa-math")
# Variants that differ from their backend in the backward only (no forward row of their own),
# and the environment their backward reads, set for the whole test: the backward runs outside
# the candidate's call.
BACKWARD_VARIANTS = {"tformer-triton-atomic-dq": {"TFORMER_ATTENTION_DQ": "atomic"}}


def _sdpa(backend: SDPBackend):
    def call(q, k, v, *, causal: bool):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def _flash_attn(q, k, v, *, causal: bool):
    from flash_attn import flash_attn_func

    # flash-attn takes (B, S, H, D); the transposes are views.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


def _tformer(q, k, v, *, causal: bool, backend: str):
    return tformer.ops.attention(q, k, v, causal=causal, backend=backend)


def _tformer_cuda_sm80(q, k, v, *, causal: bool):
    """tformer-cuda on its sm_80 kernels (the registry's cuda:sm80 variant): the A/B row for the
    sm_90a kernels on Hopper."""
    return _tformer(q, k, v, causal=causal, backend="cuda:sm80")


def _tformer_triton_fa2(q, k, v, *, causal: bool):
    """tformer-triton with its FlashAttention-2 forward forced: the A/B row for the Hopper
    (TMA) forward, kernels/attention_hopper.py."""
    with environment(TFORMER_ATTENTION_FWD="fa2"):
        return _tformer(q, k, v, causal=causal, backend="triton")


def _triton_on_cuda(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "an A/B row of tformer-triton's backward: timed on a GPU only"
    if tformer.available_backends().get("triton", "missing") is not None:
        return "backend 'triton' is not available"
    return None


def _hopper_variant(backend: str):
    def why_not(device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
            return f"an A/B row for tformer-{backend}'s Hopper forward: needs an sm_90 GPU (H100/H200)"
        if tformer.available_backends().get(backend, "missing") is not None:
            return f"backend {backend!r} is not available"
        return None
    return why_not


_hopper_only, _hopper_triton_only = _hopper_variant("cuda"), _hopper_variant("triton")


CANDIDATES = tformer_candidates(_tformer) + [
    # kind "variant": an A/B row of a tformer backend, kept out of backend="auto"'s table.
    Candidate("tformer-cuda-sm80", "variant", _tformer_cuda_sm80, why_not=_hopper_only),
    Candidate("tformer-triton-fa2", "variant", _tformer_triton_fa2, why_not=_hopper_triton_only),
    # tformer-triton with dQ added by float32 atomics in the dK/dV pass: the A/B row for its
    # default (split, deterministic) backward; BACKWARD_VARIANTS sets its environment.
    Candidate("tformer-triton-atomic-dq", "variant", lambda q, k, v, *, causal: _tformer(
        q, k, v, causal=causal, backend="triton"), why_not=_triton_on_cuda),
    Candidate("sdpa-flash", "anchor", _sdpa(SDPBackend.FLASH_ATTENTION)),
    Candidate("sdpa-cudnn", "anchor", _sdpa(SDPBackend.CUDNN_ATTENTION), why_not=cuda_only),
    Candidate("sdpa-efficient", "anchor", _sdpa(SDPBackend.EFFICIENT_ATTENTION), why_not=cuda_only),
    Candidate("sdpa-math", "anchor", _sdpa(SDPBackend.MATH)),
    Candidate("flash-attn", "anchor", _flash_attn, why_not=needs_package("flash_attn", "pip install flash-attn")),
]


def _make_inputs(shape, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad_out = (torch.randn(shape, generator=generator, device=device).to(dtype) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], grad_out


def _check_region(shape) -> tuple[tuple[slice, slice], str]:
    batch, heads, seq, _ = shape
    if batch * heads * seq * seq <= FULL_CHECK_SCORES:
        return (slice(None), slice(None)), "float64 reference, whole output"
    return (slice(0, 1), slice(0, min(heads, 2))), "float64 reference on batch 0, heads 0-1"


def _reference64(leaves, grad_out, causal, region, with_grads):
    q, k, v = (t.detach()[region].double().requires_grad_() for t in leaves)
    out = tformer.ops.attention(q, k, v, causal=causal, backend="reference")
    expected = {"out": out.detach()}
    if with_grads:
        out.backward(grad_out[region].double())
        expected.update(dq=q.grad, dk=k.grad, dv=v.grad)
    return expected


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", attention_cases(), ids=case_id)
@pytest.mark.parametrize("candidate", candidate_params(CANDIDATES, DEVICE))
@pytest.mark.parametrize("pass_name", ["fwd", "bwd", "fwd+bwd"])
def test_attention(benchmark, pass_name, candidate, case, causal, device, ceilings, flusher, device_info,
                   monkeypatch):
    suite, shape, dtype = case
    batch, heads, seq, _ = shape
    if candidate.name in BACKWARD_VARIANTS:
        if pass_name == "fwd":
            pytest.skip(f"{candidate.name} runs tformer-triton's forward: its rows are bwd and fwd+bwd")
        for name, value in BACKWARD_VARIANTS[candidate.name].items():
            monkeypatch.setenv(name, value)
    if candidate.name in MATERIALIZING and batch * heads * seq * seq * 4 > MATERIALIZED_SCORES_LIMIT_BYTES:
        pytest.skip(f"{candidate.name} materializes {batch * heads * seq * seq * 4 / 2**30:.0f} GiB of float32 "
                    f"scores at {shape}; over the {MATERIALIZED_SCORES_LIMIT_BYTES >> 30} GiB limit")
    leaves, grad_out = _make_inputs(shape, dtype, device)
    q, k, v = leaves

    # Correctness gate: the benchmark fails here if the candidate is wrong.
    out = first_call_or_skip(candidate, device, dtype, q, k, v, causal=causal)
    region, check = _check_region(shape)
    with_grads = pass_name != "fwd"
    expected = _reference64(leaves, grad_out, causal, region, with_grads)
    what = f"attention {candidate.name} {shape} causal={causal}"
    error = check_against_reference({"out": out[region]}, {"out": expected.pop("out")}, dtype, "forward", what)
    if with_grads:
        out.backward(grad_out)
        grads = {"dq": q.grad[region], "dk": k.grad[region], "dv": v.grad[region]}
        error = max(error, check_against_reference(grads, expected, dtype, "grad", what))
    del out

    describe(benchmark, op="attention", pass_name=pass_name, candidate=candidate, suite=suite, shape=shape,
             dtype=dtype, device_info=device_info, ceilings=ceilings, check=check, max_abs_error=error,
             causal=causal, seq_len=seq)
    seconds = time_pass(benchmark, pass_name, lambda: candidate.call(q, k, v, causal=causal), leaves, grad_out,
                        device, flusher)
    record_throughput(benchmark, seconds, ceilings, flops=attention_flops(shape, causal, pass_name))
