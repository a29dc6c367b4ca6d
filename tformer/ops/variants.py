"""Kernel variants: named paths inside a backend (``"triton:atomic_dq"``), chosen like backends.

A backend declares its variants in its package's ``VARIANTS`` (cheap to import). A variant sets
kernel arguments of the ops it names (``dq_mode="atomic"`` for attention); for any other op the
name means the backend's default path, so a model configured with ``backend="triton:atomic_dq"``
still runs its LayerNorm. ``available_backends()`` lists each variant beside its backend, and
``auto`` and the self-check treat each as its own candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEPARATOR = ":"


@dataclass(frozen=True)
class Variant:
    ops: tuple[str, ...]
    """The ops whose kernel arguments this variant sets."""
    options: dict = field(default_factory=dict)
    """Keyword arguments passed to those ops' implementations."""
    description: str = ""
    """One line for ``tformer env`` and the docs."""


def split(name: str) -> tuple[str, str | None]:
    """``"triton:atomic_dq"`` -> ``("triton", "atomic_dq")``; ``"torch"`` -> ``("torch", None)``."""
    backend, _, variant = name.partition(SEPARATOR)
    return backend, (variant or None)
