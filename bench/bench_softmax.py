"""Softmax forward and backward over the last dimension: tformer's backends against
torch.softmax, the same under torch.compile, and Liger-Kernel's softmax when installed."""

from __future__ import annotations

import functools

import pytest
import torch

import tformer

from bench.candidates import candidate_params, tformer_candidates
from bench.row_ops import check_then_time, row_anchors
from bench.shapes import DEVICE, case_id, row_cases


def _torch(x):
    return torch.softmax(x, dim=-1)


def _liger(x):
    from liger_kernel.ops.softmax import LigerSoftmaxFunction

    return LigerSoftmaxFunction.apply(x)


def _tformer(x, *, backend: str):
    return tformer.ops.softmax(x, dim=-1, backend=backend)


CANDIDATES = tformer_candidates(_tformer) + row_anchors(_torch, _liger, liger_module="liger_kernel.ops.softmax")


def _make_inputs(shape, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    # Spread 4: rows with both near-zero and dominant entries, as attention scores have.
    x = (4 * torch.randn(shape, generator=generator, device=device)).to(dtype).requires_grad_()
    grad_out = torch.randn(shape, generator=generator, device=device).to(dtype)
    return x, grad_out


@pytest.mark.parametrize("case", row_cases(), ids=case_id)
@pytest.mark.parametrize("candidate", candidate_params(CANDIDATES, DEVICE))
@pytest.mark.parametrize("pass_name", ["fwd", "bwd"])
def test_softmax(benchmark, pass_name, candidate, case, device, ceilings, flusher, device_info):
    _, shape, dtype = case
    x, grad_out = _make_inputs(shape, dtype, device)
    check_then_time(benchmark, op="softmax", pass_name=pass_name, candidate=candidate, case=case, leaves=[x],
                    grad_names=["dx"], grad_out=grad_out,
                    reference_call=functools.partial(_tformer, backend="reference"), device=device,
                    ceilings=ceilings, flusher=flusher, device_info=device_info)
