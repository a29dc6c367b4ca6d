"""The torch backend: PyTorch's own fused operators (``F.scaled_dot_product_attention``,
``F.layer_norm``, ``F.rms_norm``, ``torch.softmax``) behind tformer's op API and mask semantics.

It is what a plain PyTorch model would run, so ``backend="auto"`` always has it as a candidate:
tformer's kernels are picked over it only where they measured faster on this device. It runs
wherever torch runs (CPU and GPU, every float dtype torch's operators take)."""

import importlib

OP_MODULES = ("attention", "layer_norm", "softmax")


def unavailable_reason() -> str | None:
    return None


def load() -> None:
    for name in OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")
