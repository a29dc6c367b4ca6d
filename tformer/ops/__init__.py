"""The public ops. Each validates its inputs once and dispatches through the backend
registry (see :mod:`tformer.ops.registry`)."""

from .attention import attention, attention_varlen
from .normalization import layer_norm, rms_norm
from . import registry
from .registry import BackendError, UnsupportedInput, available_backends, backend, default_backend
from .softmax import softmax

registry.prepare()

__all__ = ["attention", "attention_varlen", "layer_norm", "rms_norm", "softmax", "available_backends",
           "backend", "default_backend", "BackendError", "UnsupportedInput"]
