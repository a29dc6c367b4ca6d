"""What ``backend="auto"`` tries, in order, for one call: never wrong, never slower than torch.

- On a CPU: ``torch``, then ``reference`` (for inputs torch's operators refuse). tformer's Triton
  kernels run there only under the interpreter, a correctness tool.
- On a GPU: ``torch`` unless a tformer kernel path (a backend or a variant such as
  ``triton:atomic_dq``) passed this device's self-check and measured at least ``MARGIN`` faster
  than torch at the nearest measured shape; then that path, then ``torch``, then ``reference``.
  Timings come from the self-check's verdict for this device (:mod:`tformer.ops.selftest`); with the
  self-check off (``TFORMER_SELFTEST=0``) or not yet able to run, the shipped table
  (``measured_auto.json``, entries with ``times_ms``) is the starting guess.

The answer is memoized per device, op, dtype and shape bucket: auto asks on every op call.
"""

from __future__ import annotations

import torch

from . import overrides
from .measured_order import load_table, nearest_entry, shape_key
from .validation import dtype_name

MARGIN = 0.03
"""A tformer kernel is picked only where it measured at least 3% faster than torch: closer than
that is within run-to-run noise, and torch is the choice a user can reason about."""

CPU_WHY = "on a CPU torch's operators are the fast path (tformer's Triton kernels run there only interpreted)"
FALLBACK = ("torch", "reference")

_memo: dict[tuple, tuple[tuple[str, ...], str]] = {}


def candidates(op: str, device: torch.device, dtype: torch.dtype, args: dict) -> tuple[tuple[str, ...], str]:
    """(backend names to try in order, why that order) for this call."""
    if device.type != "cuda":
        return FALLBACK, CPU_WHY
    key = shape_key(op, args)
    if key is None:  # symbolic sizes under torch.compile: no guard on a shape-dependent choice
        return FALLBACK, "symbolic shapes: torch, which takes every shape"
    memo_key = (str(device), op, dtype, *key.values())
    if memo_key not in _memo:
        if torch.compiler.is_compiling() and not verdict_ready(device):
            # A self-check cannot start inside a trace (it runs subprocesses): torch, never wrong.
            # Calling tformer.ops.selftest.verdict_for(device) before compiling avoids this.
            return FALLBACK, "traced by torch.compile before this device's self-check: torch"
        _memo[memo_key] = decide(op, dtype_name(dtype), key, *measurements(device))
    return _memo[memo_key]


def verdict_ready(device: torch.device) -> bool:
    """Whether reading this device's measurements needs no check to run (off, or already read)."""
    if not overrides.selftest():
        return True
    from tformer.ops.selftest import check

    return str(device) in check._verdicts


def measurements(device: torch.device) -> tuple[list[dict], set[str] | None, str]:
    """(timing entries, the kernel paths verified on this device or None when unverified, source)."""
    if overrides.selftest():
        from tformer.ops.selftest import verdict_for  # deferred: only a GPU call gets here

        verdict = verdict_for(device)
        if verdict is not None:
            passed = {name for name, path in verdict["paths"].items() if path["status"] == "ok"}
            return verdict["timings"], passed, f"this device's self-check ({verdict['created']})"
    table = load_table()
    source = table["measured"]
    return table["entries"], None, f"the shipped table ({source.get('device', '?')}, {source.get('date', '?')})"


def decide(op: str, dtype: str, key: dict, entries: list[dict], passed: set[str] | None,
           source: str) -> tuple[tuple[str, ...], str]:
    """The order for one shape bucket, from timing entries ``{op, dtype, shape..., times_ms}``.
    ``passed``: the kernel paths that may be picked (None: any the entry times)."""
    entry = nearest_entry(op, dtype, key, [e for e in entries if "times_ms" in e or "seconds" in e])
    if entry is None:
        return FALLBACK, f"no timing near this shape in {source}: torch"
    times = entry.get("times_ms") or entry["seconds"]  # bench.report writes seconds: only ratios matter
    shape = {k: v for k, v in entry.items() if k not in ("op", "dtype", "times_ms", "seconds", "order")}
    if "torch" not in times:
        return FALLBACK, f"{source} has no torch timing at {shape}: torch"
    kernels = {name: t for name, t in times.items()
               if name not in (*FALLBACK, "auto") and (passed is None or name in passed)}
    if not kernels:
        return FALLBACK, f"no verified tformer kernel is timed at {shape} in {source}: torch"
    best = min(kernels, key=kernels.get)
    gain = times["torch"] / kernels[best] - 1.0
    if gain >= MARGIN:
        return (best, *FALLBACK), (f"{best} measured {gain:.0%} faster than torch at the nearest shape {shape} "
                                   f"in {source}")
    return FALLBACK, (f"torch: the fastest tformer path, {best}, measured {gain:+.0%} against torch at {shape} in "
                      f"{source} (a kernel needs +{MARGIN:.0%})")
