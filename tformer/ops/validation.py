"""Input checks done once at the API boundary. Each error names the op, the argument,
what it got and what it expects."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(op: str, name: str, value, *, ndim: int | tuple[int, ...] | None = None,
                 dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: argument '{name}' has dtype {dtype_name(value.dtype)}, expected one of {expected}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            raise ValueError(f"{op}: argument '{name}' must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(value.shape)}")


def check_same(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` has the dtype and device of ``reference``."""
    for name, value in others.items():
        if value is None:
            continue
        if value.device != reference.device:
            raise ValueError(f"{op}: argument '{name}' is on {value.device}, expected {reference.device} "
                             f"(the device of '{reference_name}')")
        if value.dtype != reference.dtype:
            raise TypeError(f"{op}: argument '{name}' has dtype {dtype_name(value.dtype)}, expected "
                            f"{dtype_name(reference.dtype)} (the dtype of '{reference_name}')")


def check_shape(op: str, name: str, value: torch.Tensor, expected: tuple, description: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{op}: argument '{name}' must have shape {description} = {tuple(expected)}, "
                         f"got {tuple(value.shape)}")


def check_device(op: str, name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{op}: argument '{name}' is on {value.device}, expected {device}")


def check_probability(op: str, name: str, value) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{op}: argument '{name}' must be a float in [0, 1), got {value!r}")


def check_positive(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{op}: argument '{name}' must be a positive number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: argument '{name}' must be finite, got {value!r}")
