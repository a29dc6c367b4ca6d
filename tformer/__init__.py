"""tformer: fused attention, LayerNorm and softmax kernels (Triton and CUDA C++) behind one
op API with a pure-PyTorch reference, and the models and training system built on them."""

from . import ops
from .ops import BackendError, UnsupportedInput, available_backends, backend, default_backend

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "available_backends", "backend", "default_backend", "BackendError", "UnsupportedInput", "patch",
           "unpatch"]


def __getattr__(name):
    # Submodules that pull in more than the ops load on first use; so does tformer.patch, which
    # keeps `import tformer` (which every backend does to load tformer._C) free of tformer.nn.
    if name in ("patch", "unpatch"):
        from .integrations import patch as patch_module

        return getattr(patch_module, name)
    if name in ("nn", "models", "data", "tasks", "training", "generation", "integrations", "visualization",
                "experiments"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tformer' has no attribute {name!r}")
