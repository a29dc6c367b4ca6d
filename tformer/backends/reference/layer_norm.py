"""Reference LayerNorm and RMSNorm over the last dimension, with the fused residual add."""

import torch

from tformer.ops.registry import register

from .softmax import ALL_DEVICES, ALL_DTYPES, compute_dtype


def _add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    # The residual stream is kept in x's dtype; the norm reads the rounded sum, so that
    # y == norm(residual_out) holds exactly.
    return x if residual is None else (x.to(compute_dtype(x.dtype)) + residual).to(x.dtype)


@register("layer_norm", "reference", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def layer_norm(x, weight, bias, *, eps: float, residual):
    summed = _add_residual(x, residual)
    xf = summed.to(compute_dtype(x.dtype))
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as torch.nn.LayerNorm
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, summed)


@register("rms_norm", "reference", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def rms_norm(x, weight, *, eps: float, residual):
    summed = _add_residual(x, residual)
    xf = summed.to(compute_dtype(x.dtype))
    y = xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, summed)
