"""CUDA C++ softmax (kernels in csrc/softmax/, ops in csrc/bindings.cpp).

Adds autograd and fake implementations to ``tformer::cuda_softmax_{fwd,bwd}`` and registers
the public function. The mask arrives expanded to x's shape; the kernel reads it in place
through its strides (stride-0 broadcast dims cost nothing). A float64 mask is converted to
float32 at its un-broadcast size. An additive mask that requires grad gets the gradient of
the scores, dy_scores = y * (dy - sum(dy * y)), at x's shape; autograd of the op's
``expand`` sums it over the broadcast dims. x is made contiguous (a copy when ``dim`` was
not the last one).
"""

import torch

import tformer._C  # noqa: F401  loads the library that defines torch.ops.tformer.cuda_*
from tformer.ops.registry import register

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask in a dtype the kernel reads (bool, float32, float16, bfloat16)."""
    if mask is None or mask.dtype != torch.float64:
        return mask
    # Convert only the un-broadcast values, then broadcast again (a view).
    compact = mask[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in mask.stride())]
    return compact.to(torch.float32).expand(mask.shape)


@register("softmax", "cuda", devices=("cuda",), dtypes=DTYPES)
def softmax(x: torch.Tensor, *, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.tformer.cuda_softmax_fwd(x.contiguous(), scale, _kernel_mask(mask))


def _setup_softmax(ctx, inputs, output):
    _x, scale, mask = inputs
    ctx.scale = scale
    ctx.mask_dtype = None if mask is None else mask.dtype
    ctx.save_for_backward(output)


def _backward_softmax(ctx, dy):
    (y,) = ctx.saved_tensors
    need_x, _, need_mask = ctx.needs_input_grad
    if not need_mask:
        return torch.ops.tformer.cuda_softmax_bwd(dy.contiguous(), y, ctx.scale), None, None
    # The mask is added to the scaled scores: its gradient is that of the scores, and x's
    # is the same times scale.
    dscores = torch.ops.tformer.cuda_softmax_bwd(dy.contiguous(), y, 1.0)
    dx = (dscores * ctx.scale if ctx.scale != 1.0 else dscores) if need_x else None
    return dx, None, dscores.to(ctx.mask_dtype)


torch.library.register_autograd("tformer::cuda_softmax_fwd", _backward_softmax, setup_context=_setup_softmax)


@torch.library.register_fake("tformer::cuda_softmax_fwd")
def _softmax_fwd_fake(x, scale, mask):
    return torch.empty_like(x)


@torch.library.register_fake("tformer::cuda_softmax_bwd")
def _softmax_bwd_fake(dy, y, scale):
    return torch.empty_like(y)
