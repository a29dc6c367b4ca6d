"""What a benchmark row times: one of tformer's backends, or an anchor a user would pick
instead. Every candidate runs on the same inputs and passes the same correctness gate."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import tformer

TRITON_ON_CPU_REASON = ("Triton interpreter: not a speed measurement (no CUDA GPU; tests/ prove the Triton kernels "
                        "under TRITON_INTERPRET=1)")


def _always(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


@dataclass(frozen=True)
class Candidate:
    name: str  # "tformer-triton", "sdpa-flash", "torch", ...
    kind: str  # "tformer" (ours), "anchor" (what users already have) or "variant" (an A/B row of ours)
    call: Callable
    # None when the candidate can run on this device and dtype, else why not.
    why_not: Callable[[torch.device, torch.dtype], str | None] = _always


def tformer_candidates(op_call: Callable) -> list[Candidate]:
    """One candidate per tformer backend; ``op_call(..., backend=name)`` runs it."""
    def bind(name):
        return lambda *args, **kwargs: op_call(*args, backend=name, **kwargs)

    return [Candidate(f"tformer-{name}", "tformer", bind(name)) for name in (*tformer.available_backends(), "auto")]


def cuda_only(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if device.type == "cuda" else "runs on CUDA tensors only (no GPU in this session)"


def needs_package(module: str, install: str) -> Callable[[torch.device, torch.dtype], str | None]:
    """importorskip-style: the anchor is skipped with a reason when its package is absent."""
    def why_not(device, dtype):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package of a dotted name is missing
            found = False
        if not found:
            return f"{module} is not installed ({install})"
        return cuda_only(device, dtype)

    return why_not


# Every (shape, dtype, requires_grad) of a compiled anchor is its own graph; dynamo's default of
# 8 recompiles per function would silently fall back to eager for the later rows.
COMPILED_ANCHOR_RECOMPILE_LIMIT = 64


def compiled(fn: Callable) -> Callable:
    """``fn`` under torch.compile, specialized to each shape (dynamic=False, as a user with fixed
    shapes gets), compiled on first use."""
    compiled_fn = None

    def call(*args, **kwargs):
        nonlocal compiled_fn
        if compiled_fn is None:
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       COMPILED_ANCHOR_RECOMPILE_LIMIT)
            compiled_fn = torch.compile(fn, dynamic=False)
        return compiled_fn(*args, **kwargs)

    return call


def candidate_params(candidates: list[Candidate], device: torch.device) -> list:
    """pytest params, one per candidate; a tformer backend that cannot run here is skipped
    at collection with the registry's reason."""
    backends = tformer.available_backends()
    params = []
    for candidate in candidates:
        reason = None
        if candidate.kind == "tformer":
            name = candidate.name.removeprefix("tformer-")
            reason = backends.get(name) and f"backend {name!r} is not available: {backends[name]}"
            if name.split(":")[0] == "triton" and device.type == "cpu":
                reason = TRITON_ON_CPU_REASON
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(candidate, marks=marks, id=candidate.name))
    return params


def first_call_or_skip(candidate: Candidate, device: torch.device, dtype: torch.dtype, *args, **kwargs):
    """Run the candidate once, skipping (with the reason) when it refuses this input: a tformer
    backend raises BackendError, an SDPA backend 'No available kernel'. Anything else fails."""
    reason = candidate.why_not(device, dtype)
    if reason:
        pytest.skip(f"{candidate.name}: {reason}")
    try:
        return candidate.call(*args, **kwargs)
    except tformer.BackendError as error:
        pytest.skip(f"{candidate.name} refuses this input: {error}")
    except RuntimeError as error:
        if "No available kernel" in str(error):
            pytest.skip(f"{candidate.name} refuses this input: {str(error).splitlines()[0]}")
        raise
