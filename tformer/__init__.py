"""tformer: fused attention, LayerNorm and softmax kernels (Triton and CUDA C++) behind one
op API with a pure-PyTorch reference, and the models and training system built on them."""

from .build_info import install_extension_guard as _install_extension_guard

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "available_backends", "backend", "default_backend", "BackendError", "UnsupportedInput", "patch",
           "unpatch"]

# `import tformer._C` checks first that the extension was built against the running torch.
_install_extension_guard()

_FROM_OPS = ("available_backends", "backend", "default_backend", "BackendError", "UnsupportedInput")
_SUBPACKAGES = ("ops", "nn", "models", "data", "tasks", "training", "generation", "integrations", "visualization",
                "experiments", "cli")


def __getattr__(name):
    # Everything loads on first use, so `import tformer` (and the `tformer` command's --help) does
    # not pay for torch; tformer.patch keeps tformer.nn out of what the backends load.
    import importlib

    if name in ("patch", "unpatch"):
        return getattr(importlib.import_module(f"{__name__}.integrations.patch"), name)
    if name in _FROM_OPS:
        return getattr(importlib.import_module(f"{__name__}.ops"), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tformer' has no attribute {name!r}")
