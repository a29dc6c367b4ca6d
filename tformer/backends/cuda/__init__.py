"""The CUDA C++ backend: kernels in ``csrc/``, compiled into ``tformer._C`` by
``pip install``, registered as ``torch.ops.tformer.*`` with autograd and fake
implementations added from Python (one module per op here)."""

import importlib

import torch

from tformer.build_info import ExtensionMismatch
from tformer.ops.variants import Variant

OP_MODULES: tuple[str, ...] = ("attention", "layer_norm", "softmax")

# Named kernel paths, chosen as backend="cuda:<name>" (or by auto after the self-check), as the
# Triton backend's: each sets kernel arguments of the ops it names; other ops run the default.
ATTENTION_OPS = ("attention", "attention_varlen")
VARIANTS: dict[str, Variant] = {
    "sm80": Variant(ATTENTION_OPS, {"force_sm80": True},
                    "attention forward and backward on the sm_80 (FlashAttention-2, mma.sync) kernels, never the "
                    "sm_90a (TMA + wgmma) ones"),
}

BUILD_HINT = ("install a CUDA toolkit, set CUDA_HOME (e.g. /usr/local/cuda) and reinstall with "
              "'TFORMER_BUILD_CUDA=1 pip install --no-build-isolation -e .'")


def extension_error() -> str | None:
    """None when tformer._C imports, else why it does not."""
    try:
        importlib.import_module("tformer._C")
    except ExtensionMismatch as error:  # built for another torch: the message says how to rebuild
        return str(error)
    except ImportError as error:
        return f"the CUDA extension tformer._C was not built or does not load ({error}); {BUILD_HINT}"
    return None


def unavailable_reason() -> str | None:
    if torch.version.cuda is None:
        return "this build of torch has no CUDA support; install a CUDA build of torch"
    reason = extension_error()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def load() -> None:
    for name in OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")
