"""Triton LayerNorm and RMSNorm: the kernels of ``tformer.kernels.layer_norm`` registered as
``torch.library`` custom ops (``tformer::triton_layer_norm_fwd/_bwd``,
``tformer::triton_rms_norm_fwd/_bwd``) with fake implementations and autograd, so
``torch.compile(fullgraph=True)`` traces through them without a graph break.

Custom ops return tensors only, never None: an absent result (residual_out without a
residual, dweight without a weight) is an empty tensor here and None at the registry API.

Non-contiguous inputs: the kernels read rows by stride, so a tensor whose rows are evenly
strided with a unit column stride (e.g. ``x[:, :N]``) is read in place; any other layout
(e.g. a transposed x) is copied once to contiguous memory by ``as_rows``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tformer.kernels import layer_norm as kernels
from tformer.ops.registry import register

from . import devices

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


# ---- LayerNorm ---------------------------------------------------------------------------

@torch.library.custom_op("tformer::triton_layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (y, residual_out or empty, mean, rstd)."""
    y, residual_out, mean, rstd = kernels.layer_norm_fwd(x, weight, bias, residual, eps)
    return y, _empty_if_none(residual_out, x), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    residual_out = x.new_empty(0) if residual is None else x.new_empty(x.shape)
    return x.new_empty(x.shape), residual_out, stats, torch.empty_like(stats)


@torch.library.custom_op("tformer::triton_layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
                   d_residual_out: Tensor | None, has_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, d_residual or empty, dweight or empty, dbias or empty); ``x`` is the tensor that was
    normalized (residual_out with a residual); bias is read for its presence and dtype only."""
    dx, d_residual, dweight, dbias = kernels.layer_norm_bwd(dy, x, weight, bias, mean, rstd, d_residual_out,
                                                            has_residual)
    return dx, _empty_if_none(d_residual, x), _empty_if_none(dweight, x), _empty_if_none(dbias, x)


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, d_residual_out, has_residual):
    return (x.new_empty(x.shape), x.new_empty(x.shape) if has_residual else x.new_empty(0),
            x.new_empty(0) if weight is None else weight.new_empty(weight.shape),
            x.new_empty(0) if bias is None else bias.new_empty(bias.shape))


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, residual_out, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    # The backward needs the tensor that was normalized: x + residual when fused.
    ctx.save_for_backward(residual_out if ctx.has_residual else x, weight, bias, mean, rstd)


def _layer_norm_backward(ctx, dy, d_residual_out, _d_mean, _d_rstd):
    normalized, weight, bias, mean, rstd = ctx.saved_tensors
    d_residual_out = d_residual_out if ctx.has_residual else None
    dx, d_residual, dweight, dbias = torch.ops.tformer.triton_layer_norm_bwd(
        dy, normalized, weight, bias, mean, rstd, d_residual_out, ctx.has_residual)
    return (dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None,
            d_residual if ctx.has_residual else None, None)


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


@register("layer_norm", "triton", devices=devices(), dtypes=DTYPES)
def layer_norm(x, weight, bias, *, eps: float, residual):
    y, residual_out, _, _ = torch.ops.tformer.triton_layer_norm_fwd(x, weight, bias, residual, eps)
    return y if residual is None else (y, residual_out)


# ---- RMSNorm -----------------------------------------------------------------------------

@torch.library.custom_op("tformer::triton_rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor | None, residual: Tensor | None,
                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (y, residual_out or empty, rstd)."""
    y, residual_out, rstd = kernels.rms_norm_fwd(x, weight, residual, eps)
    return y, _empty_if_none(residual_out, x), rstd


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    residual_out = x.new_empty(0) if residual is None else x.new_empty(x.shape)
    return x.new_empty(x.shape), residual_out, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tformer::triton_rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, d_residual_out: Tensor | None,
                 has_residual: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx, d_residual or empty, dweight or empty)."""
    dx, d_residual, dweight = kernels.rms_norm_bwd(dy, x, weight, rstd, d_residual_out, has_residual)
    return dx, _empty_if_none(d_residual, x), _empty_if_none(dweight, x)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, d_residual_out, has_residual):
    return (x.new_empty(x.shape), x.new_empty(x.shape) if has_residual else x.new_empty(0),
            x.new_empty(0) if weight is None else weight.new_empty(weight.shape))


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, residual, eps = inputs
    _, residual_out, rstd = output
    ctx.has_residual, ctx.has_weight = residual is not None, weight is not None
    ctx.save_for_backward(residual_out if ctx.has_residual else x, weight, rstd)


def _rms_norm_backward(ctx, dy, d_residual_out, _d_rstd):
    normalized, weight, rstd = ctx.saved_tensors
    d_residual_out = d_residual_out if ctx.has_residual else None
    dx, d_residual, dweight = torch.ops.tformer.triton_rms_norm_bwd(
        dy, normalized, weight, rstd, d_residual_out, ctx.has_residual)
    return dx, dweight if ctx.has_weight else None, d_residual if ctx.has_residual else None, None


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


@register("rms_norm", "triton", devices=devices(), dtypes=DTYPES)
def rms_norm(x, weight, *, eps: float, residual):
    y, residual_out, _ = torch.ops.tformer.triton_rms_norm_fwd(x, weight, residual, eps)
    return y if residual is None else (y, residual_out)
