"""``tformer.ops.softmax``: validate once, then dispatch."""

from __future__ import annotations

import math

import torch

from . import dispatch
from .validation import FLOAT_DTYPES, check_device, check_tensor


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float = 1.0, mask: torch.Tensor | None = None,
            backend: str | None = None) -> torch.Tensor:
    """``softmax(x * scale + mask)`` along ``dim``, in x's dtype (float32 math inside).

    ``mask`` broadcasts to x, as SDPA's ``attn_mask``: bool (True = takes part) or a float
    added to the scaled scores (``-inf`` removes an entry). A row where nothing takes part
    returns zeros and gets zero gradients, never NaN.

    The backends work on the last dimension; another ``dim`` is moved there as a view.
    """
    op = "softmax"
    check_tensor(op, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{op}: argument 'x' must have at least 1 dimension, got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"{op}: argument 'dim' must be an int, got {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: argument 'dim' must be in [{-x.dim()}, {x.dim() - 1}] for x of shape "
                         f"{tuple(x.shape)}, got {dim}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: argument 'scale' must be a finite float, got {scale!r}")
    if mask is not None:
        check_tensor(op, "mask", mask, dtypes=(torch.bool, *FLOAT_DTYPES))
        check_device(op, "mask", mask, x.device)
        try:
            shape = torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(f"{op}: argument 'mask' of shape {tuple(mask.shape)} does not broadcast to x's shape "
                             f"{tuple(x.shape)}")
        mask = mask.expand(x.shape)  # a view: broadcast dims have stride 0
    last = dim % x.dim() == x.dim() - 1
    if not last:
        x = x.movedim(dim, -1)
        mask = None if mask is None else mask.movedim(dim, -1)
    args = dict(x=x, scale=float(scale), mask=mask)
    out = dispatch.resolve(op, backend, x.device, x.dtype, args)(**args)
    return out if last else out.movedim(-1, dim)
