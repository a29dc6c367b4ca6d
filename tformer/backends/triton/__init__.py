"""The Triton backend: kernels in ``tformer.kernels`` (the repository's ``kernels/``),
wrapped as ``torch.library`` custom ops with autograd and fake implementations."""

import importlib
import os

import torch

OP_MODULES: tuple[str, ...] = ("attention", "layer_norm", "softmax")


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def devices() -> tuple[str, ...]:
    """Device types the Triton kernels take in this process."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def unavailable_reason() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"Triton is not installed or does not import ({error}); pip install triton (CUDA builds of torch on Linux bring it)"
    if not torch.cuda.is_available() and not interpreting():
        return ("no CUDA GPU is visible (torch.cuda.is_available() is False); set TRITON_INTERPRET=1 to run the "
                "Triton kernels on CPU tensors (slow: for tests)")
    return None


def load() -> None:
    for name in OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")
