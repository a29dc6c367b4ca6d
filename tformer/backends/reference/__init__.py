"""The reference backend: plain PyTorch tensor math, differentiable by autograd, float64
capable. It is the definition of correct that every other backend is tested against."""

import importlib

OP_MODULES = ("attention", "layer_norm", "softmax")


def unavailable_reason() -> str | None:
    return None


def load() -> None:
    for name in OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")
