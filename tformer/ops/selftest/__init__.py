"""The per-device self-check behind ``backend="auto"``: see :mod:`tformer.ops.selftest.check`."""

from .check import verdict_for

__all__ = ["verdict_for"]
