"""``tformer.ops.layer_norm`` and ``rms_norm``: validate once, then dispatch."""

from __future__ import annotations

import math

import torch

from . import dispatch
from .validation import FLOAT_DTYPES, check_device, check_positive, check_same, check_shape, check_tensor


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, *, residual: torch.Tensor | None = None, backend: str | None = None):
    """LayerNorm over the last dimension of ``x`` ``(..., N)``, statistics in float32
    (float64 for float64 input).

    ``weight`` and ``bias`` are ``(N,)`` or None; they may be float32 beside a half-precision
    ``x`` (as under autocast). With ``residual`` (same shape and dtype as x) this is the
    fused pre-LN step: ``residual_out = x + residual`` and ``y = layer_norm(residual_out)``;
    it returns ``(y, residual_out)``. Otherwise it returns ``y``, in x's dtype.
    """
    op = "layer_norm"
    _check_norm_args(op, x, weight, bias, eps, residual)
    args = dict(x=x, weight=weight, bias=bias, eps=float(eps), residual=residual)
    return dispatch.resolve(op, backend, x.device, x.dtype, args)(**args)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
             residual: torch.Tensor | None = None, backend: str | None = None):
    """RMSNorm over the last dimension, ``x / sqrt(mean(x^2) + eps) * weight``; the same
    ``residual`` contract as :func:`layer_norm`."""
    op = "rms_norm"
    _check_norm_args(op, x, weight, None, eps, residual)
    args = dict(x=x, weight=weight, eps=float(eps), residual=residual)
    return dispatch.resolve(op, backend, x.device, x.dtype, args)(**args)


def _plainly_valid(x, weight, bias, eps, residual) -> bool:
    """The common valid call, recognized in a few attribute reads: every norm of a model runs
    this. Anything else goes through the full checks, which name what is wrong."""
    if not (isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and x.dim() > 0 and type(eps) is float
            and 0.0 < eps < math.inf):
        return False
    features, device = x.shape[-1], x.device
    for param in (weight, bias):
        if param is not None and not (isinstance(param, torch.Tensor) and param.dtype in FLOAT_DTYPES
                                      and param.dim() == 1 and param.shape[0] == features and param.device == device):
            return False
    return residual is None or (isinstance(residual, torch.Tensor) and residual.dtype is x.dtype
                                and residual.shape == x.shape and residual.device == device)


def _check_norm_args(op, x, weight, bias, eps, residual) -> None:
    if _plainly_valid(x, weight, bias, eps, residual):
        return
    check_tensor(op, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{op}: argument 'x' must have at least 1 dimension, got a 0-d tensor")
    features = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_tensor(op, name, param, ndim=1)
            check_shape(op, name, param, (features,), "(N,) with N = x.shape[-1]")
            check_device(op, name, param, x.device)
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_same(op, "x", x, residual=residual)
        check_shape(op, "residual", residual, x.shape, "x.shape")
    check_positive(op, "eps", eps)
