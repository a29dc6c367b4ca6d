"""Triton softmax: the kernels of ``tformer.kernels.softmax`` registered as ``torch.library``
custom ops (``tformer::triton_softmax_fwd/_bwd``) with fake implementations and autograd, so
``torch.compile(fullgraph=True)`` traces through them without a graph break.

The mask arrives expanded to x's shape (a stride-0 view) and is read by strides, never
materialized. A float mask that requires grad gets ``d_scores`` (x's shape; autograd sums it
back over the broadcast dims through the expand). A non-contiguous x whose rows are not evenly
strided with a unit column stride (e.g. after ``movedim`` for ``dim != -1``) is copied once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tformer.kernels import softmax as kernels
from tformer.ops.registry import register

from . import devices

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("tformer::triton_softmax_fwd", mutates_args=())
def softmax_fwd(x: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    return kernels.softmax_fwd(x, mask, scale)


@softmax_fwd.register_fake
def _(x, mask, scale):
    return x.new_empty(x.shape)


@torch.library.custom_op("tformer::triton_softmax_bwd", mutates_args=())
def softmax_bwd(dy: Tensor, y: Tensor, scale: float, need_mask_grad: bool) -> tuple[Tensor, Tensor]:
    """-> (dx, d_mask or empty); d_mask is float32."""
    dx, d_mask = kernels.softmax_bwd(dy, y, scale, need_mask_grad)
    return dx, y.new_empty(0, dtype=torch.float32) if d_mask is None else d_mask


@softmax_bwd.register_fake
def _(dy, y, scale, need_mask_grad):
    d_mask_shape = y.shape if need_mask_grad else (0,)
    return y.new_empty(y.shape), y.new_empty(d_mask_shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, mask, scale = inputs
    ctx.scale = scale
    ctx.mask_dtype = mask.dtype if mask is not None and mask.is_floating_point() else None
    ctx.save_for_backward(output)


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    need_mask_grad = ctx.mask_dtype is not None and ctx.needs_input_grad[1]
    dx, d_mask = torch.ops.tformer.triton_softmax_bwd(dy, y, ctx.scale, need_mask_grad)
    return dx, d_mask.to(ctx.mask_dtype) if need_mask_grad else None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


@register("softmax", "triton", devices=devices(), dtypes=DTYPES)
def softmax(x: Tensor, *, scale: float, mask: Tensor | None) -> Tensor:
    return torch.ops.tformer.triton_softmax_fwd(x, mask, scale)
