"""LayerNorm and RMSNorm modules over ``tformer.ops.layer_norm`` / ``rms_norm``.

Both take an optional ``residual``: ``norm(x, residual=r)`` returns ``(norm(x + r), x + r)``
computed by the fused residual-add kernel, the pre-LN step of a transformer block.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from tformer import ops

from tformer.schema import check_choice

NORMS: tuple[str, ...] = ("layernorm", "rmsnorm")


def _as_shape(owner: str, normalized_shape) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    if not shape or not all(isinstance(n, numbers.Integral) and n > 0 for n in shape):
        raise ValueError(f"{owner}: argument 'normalized_shape' must be a positive int or a non-empty tuple of "
                         f"positive ints, got {normalized_shape!r}")
    return tuple(int(n) for n in shape)


class _NormBase(nn.Module):
    """Shared shape handling: the ops normalize over the last dimension, so the last
    ``len(normalized_shape)`` dimensions of x are flattened into one (a view when contiguous)."""

    def _flatten(self, x: torch.Tensor, name: str) -> torch.Tensor:
        k = len(self.normalized_shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"{type(self).__name__}: argument '{name}' of shape {tuple(x.shape)} must end with "
                             f"normalized_shape {self.normalized_shape}")
        return x.reshape(*x.shape[:x.dim() - k], -1)

    def _flat(self, param: torch.Tensor | None) -> torch.Tensor | None:
        return None if param is None else param.reshape(-1)

    def _takes_as_is(self, x: torch.Tensor) -> bool:
        # The usual case, one normalized dimension that is x's last: the op takes x, residual and
        # the (N,) weights as they are (and checks residual against x). No reshapes, which would
        # each add a view to the autograd graph of every norm call.
        shape = self.normalized_shape
        return len(shape) == 1 and x.dim() >= 1 and x.shape[-1] == shape[0]

    def _run(self, op, x: torch.Tensor, residual: torch.Tensor | None, **params):
        flat_x = self._flatten(x, "x")
        flat_residual = None if residual is None else self._flatten(residual, "residual")
        out = op(flat_x, eps=self.eps, residual=flat_residual, backend=self.backend, **params)
        if residual is None:
            return out.reshape(x.shape)
        y, residual_out = out
        return y.reshape(x.shape), residual_out.reshape(x.shape)


class LayerNorm(_NormBase):
    """Drop-in for ``torch.nn.LayerNorm`` (same arguments, parameters and state_dict keys)
    running ``tformer.ops.layer_norm``.

    ``forward(x)`` returns ``y``; ``forward(x, residual=r)`` returns ``(y, x + r)`` with
    ``y = layer_norm(x + r)`` from the fused kernel.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str | None = None):
        super().__init__()
        self.normalized_shape = _as_shape("LayerNorm", normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self._takes_as_is(x):
            return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, backend=self.backend)
        return self._run(ops.layer_norm, x, residual, weight=self._flat(self.weight), bias=self._flat(self.bias))

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"backend={self.backend!r}")


class RMSNorm(_NormBase):
    """RMSNorm (Zhang & Sennrich, 2019): ``x / sqrt(mean(x^2) + eps) * weight``, over
    ``tformer.ops.rms_norm``; state_dict key ``weight`` as ``torch.nn.RMSNorm``. Same
    ``residual`` contract as :class:`LayerNorm`."""

    def __init__(self, normalized_shape, eps: float = 1e-6, elementwise_affine: bool = True, device=None,
                 dtype=None, *, backend: str | None = None):
        super().__init__()
        self.normalized_shape = _as_shape("RMSNorm", normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self._takes_as_is(x):
            return ops.rms_norm(x, self.weight, self.eps, residual=residual, backend=self.backend)
        return self._run(ops.rms_norm, x, residual, weight=self._flat(self.weight))

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"backend={self.backend!r}")


def make_norm(name: str, dim: int, *, bias: bool = True, backend: str | None = None, device=None,
              dtype=None) -> LayerNorm | RMSNorm:
    """The norm called ``name`` (one of :data:`NORMS`) over a last dimension of size ``dim``."""
    check_choice("make_norm: argument 'name'", name, NORMS)
    if name == "layernorm":
        return LayerNorm(dim, bias=bias, backend=backend, device=device, dtype=dtype)
    return RMSNorm(dim, backend=backend, device=device, dtype=dtype)
