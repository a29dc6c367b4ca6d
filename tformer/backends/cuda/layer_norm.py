"""CUDA C++ layer_norm and rms_norm (kernels in csrc/layer_norm/, ops in csrc/bindings.cpp).

Adds autograd and fake implementations to the ``tformer::cuda_{layer,rms}_norm_{fwd,bwd}``
ops, so they train and trace under ``torch.compile``, and registers the public functions.

Conventions at this layer:
- weight and bias go to the kernels as float32 (a no-op for float32 parameters, an (N,)
  copy otherwise); autograd of that ``.to()`` returns their gradients in their own dtype.
- x and residual are made contiguous (a copy only if they are not).
- The op returns ``residual_out`` as an empty tensor when there is no residual, and the
  weight/bias gradients as empty tensors when not asked for: custom ops cannot return None.
- Double backward is not supported (the backward ops have no autograd formula).
"""

import torch

import tformer._C  # noqa: F401  loads the library that defines torch.ops.tformer.cuda_*
from tformer.ops.registry import register

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _as_float32(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.to(torch.float32).contiguous()


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.contiguous()


@register("layer_norm", "cuda", devices=("cuda",), dtypes=DTYPES)
def layer_norm(x, weight, bias, *, eps: float, residual):
    y, residual_out, _, _ = torch.ops.tformer.cuda_layer_norm_fwd(
        x.contiguous(), _as_float32(weight), _as_float32(bias), _contiguous(residual), eps)
    return y if residual is None else (y, residual_out)


@register("rms_norm", "cuda", devices=("cuda",), dtypes=DTYPES)
def rms_norm(x, weight, *, eps: float, residual):
    y, residual_out, _ = torch.ops.tformer.cuda_rms_norm_fwd(
        x.contiguous(), _as_float32(weight), _contiguous(residual), eps)
    return y if residual is None else (y, residual_out)


# ---- autograd ------------------------------------------------------------------------------
# The backward kernels recompute xhat from the normalized tensor (residual_out when there is
# a residual, else x) and the saved per-row float32 statistics. With a residual, x and
# residual get the same gradient: that of residual_out, through the norm and directly.

def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, residual, _eps = inputs
    _y, residual_out, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(residual_out if ctx.has_residual else x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward_layer_norm(ctx, dy, dresidual_out, _dmean, _drstd):
    normalized, weight, mean, rstd = ctx.saved_tensors
    need_x, need_weight, need_bias, need_residual, _ = ctx.needs_input_grad
    dx, dweight, dbias = torch.ops.tformer.cuda_layer_norm_bwd(
        dy.contiguous(), dresidual_out.contiguous() if ctx.has_residual else None, normalized, weight, mean, rstd,
        need_weight, need_bias)
    return (dx if need_x else None, dweight if need_weight else None, dbias if need_bias else None,
            dx if need_residual else None, None)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, residual, _eps = inputs
    _y, residual_out, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(residual_out if ctx.has_residual else x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _backward_rms_norm(ctx, dy, dresidual_out, _drstd):
    normalized, weight, rstd = ctx.saved_tensors
    need_x, need_weight, need_residual, _ = ctx.needs_input_grad
    dx, dweight = torch.ops.tformer.cuda_rms_norm_bwd(
        dy.contiguous(), dresidual_out.contiguous() if ctx.has_residual else None, normalized, weight, rstd,
        need_weight)
    return dx if need_x else None, dweight if need_weight else None, dx if need_residual else None, None


torch.library.register_autograd("tformer::cuda_layer_norm_fwd", _backward_layer_norm,
                                setup_context=_setup_layer_norm)
torch.library.register_autograd("tformer::cuda_rms_norm_fwd", _backward_rms_norm, setup_context=_setup_rms_norm)


# ---- fake implementations (shapes and dtypes only, for torch.compile and meta tensors) ----------

def _row_statistic(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


def _param_grad(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    return x.new_empty((x.shape[-1] if wanted else 0,), dtype=torch.float32)


@torch.library.register_fake("tformer::cuda_layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, residual, eps):
    residual_out = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    return torch.empty_like(x), residual_out, _row_statistic(x), _row_statistic(x)


@torch.library.register_fake("tformer::cuda_layer_norm_bwd")
def _layer_norm_bwd_fake(dy, dresidual_out, input, weight, mean, rstd, weight_grad, bias_grad):
    return torch.empty_like(input), _param_grad(input, weight_grad), _param_grad(input, bias_grad)


@torch.library.register_fake("tformer::cuda_rms_norm_fwd")
def _rms_norm_fwd_fake(x, weight, residual, eps):
    residual_out = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    return torch.empty_like(x), residual_out, _row_statistic(x)


@torch.library.register_fake("tformer::cuda_rms_norm_bwd")
def _rms_norm_bwd_fake(dy, dresidual_out, input, weight, rstd, weight_grad):
    return torch.empty_like(input), _param_grad(input, weight_grad)
