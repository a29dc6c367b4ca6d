"""LayerNorm forward and backward: tformer's backends against torch.nn.functional.layer_norm,
the same under torch.compile, and Liger-Kernel's Triton LayerNorm when installed."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import tformer

from bench.candidates import candidate_params, tformer_candidates
from bench.row_ops import check_then_time, row_anchors
from bench.shapes import DEVICE, case_id, row_cases

EPS = 1e-5


def _torch(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def _liger(x, weight, bias):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return LigerLayerNormFunction.apply(x, weight, bias, EPS)


def _tformer(x, weight, bias, *, backend: str):
    return tformer.ops.layer_norm(x, weight, bias, EPS, backend=backend)


CANDIDATES = tformer_candidates(_tformer) + row_anchors(_torch, _liger, liger_module="liger_kernel")


def _make_inputs(shape, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    features = shape[-1]
    x = torch.randn(shape, generator=generator, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(features, generator=generator, device=device)).to(dtype)
    bias = (0.1 * torch.randn(features, generator=generator, device=device)).to(dtype)
    grad_out = torch.randn(shape, generator=generator, device=device).to(dtype)
    return [t.requires_grad_() for t in (x, weight, bias)], grad_out


@pytest.mark.parametrize("case", row_cases(), ids=case_id)
@pytest.mark.parametrize("candidate", candidate_params(CANDIDATES, DEVICE))
@pytest.mark.parametrize("pass_name", ["fwd", "bwd"])
def test_layer_norm(benchmark, pass_name, candidate, case, device, ceilings, flusher, device_info):
    _, shape, dtype = case
    leaves, grad_out = _make_inputs(shape, dtype, device)
    check_then_time(benchmark, op="layer_norm", pass_name=pass_name, candidate=candidate, case=case, leaves=leaves,
                    grad_names=["dx", "dweight", "dbias"], grad_out=grad_out,
                    reference_call=functools.partial(_tformer, backend="reference"), device=device,
                    ceilings=ceilings, flusher=flusher, device_info=device_info)
