"""Which implementation an op call runs: the backend or variant named (from the registry), or
``auto``'s choice (:mod:`tformer.ops.auto`), logged once per op, backend, device and dtype."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from . import auto, registry
from .validation import dtype_name

logger = logging.getLogger("tformer")
_auto_logged: set[tuple] = set()


def resolve(op: str, requested: str | None, device: torch.device, dtype: torch.dtype, args: dict) -> Callable:
    """The implementation of ``op`` to call for inputs on ``device`` with ``dtype``."""
    name = requested or registry.default_backend()
    if name != "auto":
        return registry.resolve_named(op, name, device, dtype, args)

    skipped = []
    order, why_order = auto.candidates(op, device, dtype, args)
    for candidate in order:
        fn, why = registry.try_implementation(op, candidate, device, dtype, args)
        if fn is not None:
            _log_choice(op, candidate, device, dtype, skipped, why_order)
            return fn
        skipped.append(f"{candidate}: {why}")
    raise registry.BackendError(f"{op}: no backend can run this input: " + "; ".join(skipped))


def _log_choice(op: str, name: str, device: torch.device, dtype: torch.dtype, skipped: list[str],
                why_order: str) -> None:
    key = (op, name, device.type, dtype)
    if key in _auto_logged or torch.compiler.is_compiling():
        return
    _auto_logged.add(key)
    passed_over = f" (passed over: {'; '.join(skipped)})" if skipped else ""
    why = f": {why_order}" if why_order else ""
    logger.info("backend='auto' chose %r for %s on %s %s%s%s", name, op, device.type, dtype_name(dtype), why,
                passed_over)
