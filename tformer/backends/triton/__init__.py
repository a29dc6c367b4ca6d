"""The Triton backend: kernels in ``tformer.kernels`` (the repository's ``kernels/``),
wrapped as ``torch.library`` custom ops with autograd and fake implementations."""

import importlib

import torch

from tformer.ops import overrides
from tformer.ops.variants import Variant

OP_MODULES: tuple[str, ...] = ("attention", "layer_norm", "softmax")

# Named kernel paths, chosen as backend="triton:<name>" (or by auto after the self-check):
# each sets kernel arguments of the ops it names; other ops run the backend's default.
ATTENTION_OPS = ("attention", "attention_varlen")
VARIANTS: dict[str, Variant] = {
    "atomic_dq": Variant(ATTENTION_OPS, {"dq_mode": "atomic"},
                         "attention backward adds dQ by float32 atomics in the dK/dV pass: one pass fewer, "
                         "not bit-reproducible"),
    "fa2": Variant(ATTENTION_OPS, {"fwd_path": "fa2"},
                   "attention forward on the FlashAttention-2 (sm_80) kernel, never the Hopper TMA one"),
}


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (slowly)."""
    return overrides.triton_interpret()


def devices() -> tuple[str, ...]:
    """Device types the Triton kernels take in this process."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


def interpreter_numpy_conflict(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run beside this NumPy, or None.

    Before Triton 3.7 the interpreter turns a scalar tensor into an index with int() of a
    one-element array (every `range(pid, n, step)` in a kernel does it); NumPy 2.4 made that a
    TypeError. Caught here so the user reads the fix, not an InterpreterError from inside a kernel.
    """
    if _version_tuple(triton_version) < (3, 7) and _version_tuple(numpy_version) >= (2, 4):
        return (f"TRITON_INTERPRET=1 with Triton {triton_version} cannot run beside NumPy {numpy_version}: its "
                "interpreter converts one-element arrays to int, a TypeError since NumPy 2.4; "
                "pip install 'numpy<2.4' or 'triton>=3.7'")
    return None


def unavailable_reason() -> str | None:
    try:
        triton = importlib.import_module("triton")
    except ImportError as error:
        return f"Triton is not installed or does not import ({error}); pip install triton (CUDA builds of torch on Linux bring it)"
    if not torch.cuda.is_available() and not interpreting():
        return ("no CUDA GPU is visible (torch.cuda.is_available() is False); set TRITON_INTERPRET=1 to run the "
                "Triton kernels on CPU tensors (slow: for tests)")
    if interpreting():
        import numpy

        return interpreter_numpy_conflict(triton.__version__, numpy.__version__)
    return None


def load() -> None:
    for name in OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")
