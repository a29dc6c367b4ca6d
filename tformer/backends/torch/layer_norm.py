"""LayerNorm and RMSNorm through ``F.layer_norm`` / ``F.rms_norm``, with the fused residual add."""

import torch
import torch.nn.functional as F

from tformer.ops.registry import register

from .softmax import ALL_DEVICES, ALL_DTYPES


def _add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    # As the reference: the norm reads the sum rounded to x's dtype.
    return x if residual is None else x + residual


_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> torch.dtype:
    """x's dtype, unless a parameter is kept wider (float32 weight beside half x, as under
    autocast): then the parameter's, so the weight is applied at its own precision, as the
    reference does (torch's fused kernels also want one dtype)."""
    dtype = x.dtype
    for param in params:
        if param is not None and param.dtype is not dtype:
            dtype = param.dtype
            break
    # torch's CPU kernels sum the weight gradient over rows in half precision (its GPU kernels
    # accumulate in float32): on the CPU, half inputs are normalized in float32 instead.
    if dtype in _HALF and x.device.type == "cpu":
        return torch.float32
    return dtype


def _as(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # A plain attribute test before .to(): this runs on every norm call of a model.
    return tensor if tensor is None or tensor.dtype is dtype else tensor.to(dtype)


def _supports_layer_norm(x, **_) -> str | None:
    # A one-element row has variance 0 and normalizes to exactly 0. torch's LayerNorm backward
    # recomputes x_hat as x * rstd - mean * rstd with rstd = 1/sqrt(eps) ~ 316, so dweight picks
    # up ~1e-4 of rounding noise, beyond float32's tolerance against the reference.
    if x.shape[-1] == 1:
        return "torch's LayerNorm backward is inexact for rows of one element (N = 1); use 'reference'"
    return None


@register("layer_norm", "torch", devices=ALL_DEVICES, dtypes=ALL_DTYPES, supports=_supports_layer_norm)
def layer_norm(x, weight, bias, *, eps: float, residual):
    summed = _add_residual(x, residual)
    dtype = _compute_dtype(x, weight, bias)
    y = F.layer_norm(_as(summed, dtype), summed.shape[-1:], _as(weight, dtype), _as(bias, dtype), eps)
    y = _as(y, x.dtype)
    return y if residual is None else (y, summed)


@register("rms_norm", "torch", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def rms_norm(x, weight, *, eps: float, residual):
    summed = _add_residual(x, residual)
    dtype = _compute_dtype(x, weight)
    y = _as(F.rms_norm(_as(summed, dtype), summed.shape[-1:], _as(weight, dtype), eps), x.dtype)
    return y if residual is None else (y, summed)
