"""The self-check on each new device: every tformer kernel path is checked against the reference
in a subprocess with a time limit, then timed against torch; ``auto`` picks only among paths
that passed (:mod:`tformer.ops.auto`).

- A path that hangs (past ``timeout_s``), crashes (the process dies) or answers wrong is excluded
  with a one-line warning that names it and the command that reproduces it.
- A path that answers right is kept with its timings; one slower than torch is simply never
  picked (``auto`` wants it 3% faster).
- The verdict is cached per device key (:mod:`tformer.ops.selftest.cache`). Under torchrun or
  DeepSpeed only ``LOCAL_RANK`` 0 runs the check; the node's other ranks wait for its verdict.
- ``TFORMER_SELFTEST=0`` turns it off (``auto`` then uses the shipped table, else torch).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import cache

logger = logging.getLogger("tformer")

DEFAULT_TIMEOUT_S = {"cuda": 300.0, "cpu": 600.0}  # first Triton compiles, or the interpreter
SKIPPED = ("torch", "reference")  # torch is the yardstick and reference the definition of correct

_verdicts: dict[str, dict | None] = {}  # per device, for this process


def kernel_paths() -> list[str]:
    """Every backend and variant the self-check covers (all but torch and reference)."""
    from tformer.ops import registry

    return [name for name in registry.backend_names() if name.split(":")[0] not in SKIPPED]


def reproduce_command(path: str, device: torch.device, standin: str | None = None) -> str:
    command = f"python -m tformer.ops.selftest.worker {path} --device {device}"
    return command + (f" --standin {standin}" if standin else "")


def run_path(path: str, device: torch.device, timeout_s: float, standin: str | None = None,
             repeats: int = 5) -> dict:
    """One path's result: the worker's, or status "hang" / "crash" when its process did not finish."""
    env = dict(os.environ, TFORMER_AUTOTUNE="0", TFORMER_SELFTEST="0")  # untuned kernels: a conservative timing
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "tformer.ops.selftest.worker", path, "--device", str(device), "--out", str(out),
                   "--repeats", str(repeats), *(["--standin", standin] if standin else [])]
        started = time.perf_counter()
        try:
            finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"path": path, "status": "hang", "checked": [], "timings": [],
                    "detail": f"no answer within {timeout_s:g} s"}
        seconds = round(time.perf_counter() - started, 1)
        if finished.returncode != 0 or not out.is_file():
            last = (finished.stderr.strip().splitlines() or [f"exit status {finished.returncode}"])[-1]
            return {"path": path, "status": "crash", "checked": [], "timings": [],
                    "detail": f"exit status {finished.returncode}: {last[:300]}", "seconds": seconds}
        return {**json.loads(out.read_text()), "seconds": seconds}


def run_selftest(device: torch.device, paths: dict[str, str | None] | None = None, timeout_s: float | None = None,
                 repeats: int = 5) -> dict:
    """Check every path (``{name: standin or None}``; default: :func:`kernel_paths`) on ``device``
    and return the verdict: ``{key, created, paths: {name: result}, timings: [...]}``."""
    paths = {name: None for name in kernel_paths()} if paths is None else paths
    timeout_s = DEFAULT_TIMEOUT_S.get(device.type, 300.0) if timeout_s is None else timeout_s
    results = {}
    for name, standin in paths.items():
        result = run_path(name, device, timeout_s, standin, repeats)
        result["command"] = reproduce_command(name, device, standin)
        results[name] = result
        if result["status"] in ("hang", "crash", "wrong"):
            logger.warning("tformer self-check: %s excluded on %s (%s: %s); reproduce: %s", name, device,
                           result["status"], result["detail"], result["command"])
    return {"key": cache.device_key(device), "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "paths": results, "timings": merge_timings(results)}


def merge_timings(results: dict[str, dict]) -> list[dict]:
    """One entry per (op, dtype, shape) with every passing path's time and torch's; torch's is the
    fastest of its measurements (each worker timed it beside its own path), so a kernel must
    beat torch's best."""
    merged: dict[tuple, dict] = {}
    for name, result in results.items():
        if result["status"] != "ok":
            continue
        for entry in result["timings"]:
            shape = {k: v for k, v in entry.items() if k != "times_ms"}
            slot = merged.setdefault(tuple(sorted(shape.items())), {**shape, "times_ms": {}})
            times = slot["times_ms"]
            times[name] = entry["times_ms"][name]
            times["torch"] = min(times.get("torch", float("inf")), entry["times_ms"]["torch"])
    return list(merged.values())


def _is_runner() -> bool:
    """Only one process per node runs the check: LOCAL_RANK 0 (or a process with no rank)."""
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


def verdict_for(device: torch.device, *, refresh: bool = False, paths: dict[str, str | None] | None = None,
                timeout_s: float | None = None, directory: Path | None = None, wait_s: float | None = None,
                repeats: int = 5) -> dict | None:
    """This device's verdict: from the cache, else by running the check (LOCAL_RANK 0) or waiting
    for the rank that does. None when no verdict could be had (the caller then trusts torch)."""
    memo = str(device)
    if memo in _verdicts and not refresh and paths is None:
        return _verdicts[memo]
    key = cache.device_key(device)
    path = cache.key_file(key, directory)
    timeout_s = DEFAULT_TIMEOUT_S.get(device.type, 300.0) if timeout_s is None else timeout_s
    count = len(kernel_paths() if paths is None else paths)
    deadline = time.monotonic() + (wait_s if wait_s is not None else timeout_s * (count + 1))
    verdict = None
    while True:
        with cache.locked(path):
            verdict = None if refresh else cache.read(path, key)
            if verdict is None and _is_runner():
                logger.info("tformer self-check: checking %d kernel path(s) on %s (once per device; "
                            "TFORMER_SELFTEST=0 skips it)", count, key["device"])
                verdict = run_selftest(device, paths, timeout_s, repeats)
                cache.write(path, verdict)
        if verdict is not None or _is_runner() or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # another rank of this node is checking: wait for its verdict
    if verdict is None:
        logger.warning("tformer self-check: no verdict for %s from LOCAL_RANK 0 within the wait; auto uses torch",
                       key["device"])
    if paths is None:
        _verdicts[memo] = verdict
    return verdict


def format_table(verdict: dict) -> list[str]:
    """The verdict as lines for ``tformer selftest`` (attach them to a bug report)."""
    key = verdict["key"]
    lines = [f"device: {key['device']} (capability {key['capability']}, driver {key['driver']}), torch {key['torch']}, "
             f"Triton {key['triton']}, build {key['build']}; checked {verdict['created']}",
             f"{'path':<20} {'status':<12} {'cases':>5} {'seconds':>8}  detail"]
    for name, result in verdict["paths"].items():
        detail = result.get("detail") or ""
        if result["status"] in ("hang", "crash", "wrong"):
            detail += f"; reproduce: {result['command']}"
        lines.append(f"{name:<20} {result['status']:<12} {len(result['checked']):>5} "
                     f"{result.get('seconds', 0):>8}  {detail}")
    if verdict["timings"]:
        lines.append("timings (forward+backward, ms; x = torch's time / the path's):")
        for entry in verdict["timings"]:
            shape = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("op", "dtype", "times_ms"))
            torch_ms = entry["times_ms"]["torch"]
            paths = "  ".join(f"{name} {t:.3g} ({torch_ms / t:.3g}x)" for name, t in entry["times_ms"].items()
                              if name != "torch")
            lines.append(f"  {entry['op']} {entry['dtype']} {shape}: torch {torch_ms:.3g}  {paths}")
    checked = dict.fromkeys(case for result in verdict["paths"].values() for case in result["checked"])
    if checked:
        lines.append("cases checked against the float64 reference (forward and gradients): " + ", ".join(checked))
    return lines
