"""tformer: fused attention, LayerNorm and softmax kernels (Triton and CUDA C++) behind one
op API with a pure-PyTorch reference, and the models and training system built on them."""

from . import ops
from .ops import BackendError, UnsupportedInput, available_backends, backend, default_backend
from .patch import patch, unpatch

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "available_backends", "backend", "default_backend", "BackendError", "UnsupportedInput", "patch",
           "unpatch"]


def __getattr__(name):
    # Submodules that pull in more than the ops load on first use.
    if name in ("nn", "models"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tformer' has no attribute {name!r}")
