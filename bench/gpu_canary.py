"""First contact with a GPU: each attention path once, small, in a process of its own with a
time limit, before the sweep and the benchmarks run them in one process.

None of tformer's kernels has run on a GPU before its first session, and a wrong mbarrier phase
in the sm_90a forward or a bad TMA descriptor hangs a kernel instead of failing it; a fault
leaves the CUDA context unusable. Either would cost the whole stage. Here a path that hangs
(past ``--timeout``), crashes or gives a wrong answer is reported, and the environment that
steps around it for the rest of the stage is written to ``--env-out`` (sourced by
bench/gpu_session.sh): the Hopper kernels fall back to their FA2-design paths
(``TFORMER_ATTENTION_FORCE_SM80=1``, ``TFORMER_ATTENTION_BWD_FORCE_SM80=1`` for the CUDA
backward alone, ``TFORMER_ATTENTION_BAND_FORCE_SM80=1`` for the banded calls alone,
``TFORMER_ATTENTION_FWD=fa2``), a broken CUDA backend is
left out (``TFORMER_GPU_SKIP_CUDA=1``). The paths run in parallel: about the time of the slowest
(Triton's JIT compile), whose compiled kernels stay in the Triton cache for the sweep.

    python -m bench.gpu_canary --env-out build/canary.env          # on the GPU
    python -m bench.gpu_canary --device cpu                        # rehearsal: Triton interpreted
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.environment import environment

# Child exit codes.
OK, WRONG, SKIPPED = 0, 3, 4
# Max |error| against float64 for a bf16 attention output or gradient of unit-scale inputs.
BF16_LIMIT = 0.06


@dataclass(frozen=True)
class Probe:
    backend: str
    environment: dict = field(default_factory=dict)  # what selects the path
    backward: bool = True
    needs_sm90: bool = False  # the path exists on (9, 0) devices only
    on_failure: dict = field(default_factory=dict)  # what steps around it for the rest of the stage
    call: dict = field(default_factory=dict)  # attention arguments beside causal=True


PATHS = {
    "cuda-sm90a-fwd": Probe("cuda", backward=False, needs_sm90=True,
                            on_failure={"TFORMER_ATTENTION_FORCE_SM80": "1"}),
    # Forward and backward on sm_90a: a failure here alone means the backward's kernels.
    "cuda-sm90a-bwd": Probe("cuda", needs_sm90=True, on_failure={"TFORMER_ATTENTION_BWD_FORCE_SM80": "1"}),
    # The banded variants (sliding window, bottom-right alignment, soft-cap): a failure moves only
    # those calls to sm_80, so the plain sm_90a kernels keep their sweep cases and anchor rows.
    "cuda-sm90a-band": Probe("cuda", needs_sm90=True, on_failure={"TFORMER_ATTENTION_BAND_FORCE_SM80": "1"},
                             call={"window": (100, 0), "softcap": 30.0}),
    "cuda-sm80": Probe("cuda", {"TFORMER_ATTENTION_FORCE_SM80": "1"}, on_failure={"TFORMER_GPU_SKIP_CUDA": "1"}),
    "triton-hopper-fwd": Probe("triton", {"TFORMER_ATTENTION_FWD": "hopper"}, backward=False, needs_sm90=True,
                               on_failure={"TFORMER_ATTENTION_FWD": "fa2"}),
    "triton-fa2": Probe("triton", {"TFORMER_ATTENTION_FWD": "fa2"}),
}


def child(name: str, device: str) -> int:
    """Runs path ``name`` once; prints one line; returns OK, WRONG or SKIPPED (raises on a crash)."""
    import torch

    import tformer

    path = PATHS[name]
    reason = tformer.available_backends()[path.backend]
    if device == "cuda" and reason is None and path.needs_sm90 and torch.cuda.get_device_capability() != (9, 0):
        reason = "not an sm_90 GPU"
    if device == "cpu" and reason is None and (path.backend == "cuda" or path.needs_sm90):
        reason = "a GPU path"
    if reason is not None:
        print(f"{name}: skipped ({reason})")
        return SKIPPED
    # Lengths off the block multiples, GQA, causal: the boundary blocks and the grouped loads.
    batch, heads, kv_heads, seq, head_dim = (2, 4, 2, 300, 128) if device == "cuda" else (1, 2, 1, 33, 32)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    shapes = ((batch, heads, seq, head_dim), (batch, kv_heads, seq, head_dim), (batch, kv_heads, seq, head_dim))
    q, k, v = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(path.backward)
               for shape in shapes)
    out = tformer.ops.attention(q, k, v, causal=True, backend=path.backend, **path.call)
    grad_out = torch.randn(out.shape, generator=generator).to(device, dtype)
    if path.backward:
        out.backward(grad_out)
    if device == "cuda":
        torch.cuda.synchronize()  # a fault surfaces here, a hang stays here
    leaves = [t.detach().double().requires_grad_(path.backward) for t in (q, k, v)]
    expected = tformer.ops.attention(*leaves, causal=True, backend="reference", **path.call)
    errors = {"out": (out.double() - expected).abs().max().item()}
    if path.backward:
        expected.backward(grad_out.double())
        errors.update({f"d{n}": (t.grad.double() - leaf.grad).abs().max().item()
                       for n, t, leaf in zip("qkv", (q, k, v), leaves)})
    worst = max(errors.values())
    verdict = "ok" if worst <= BF16_LIMIT else "WRONG"
    print(f"{name}: {verdict}, max |error| vs float64 " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))
    return OK if verdict == "ok" else WRONG


def run(names, device: str, timeout: float, python: str = sys.executable, log=print) -> dict[str, str]:
    """Each path in a child process, all at once; ``{name: "ok" | "skipped" | "WRONG" | "CRASH" |
    "HANG"}``. A child past ``timeout`` seconds is killed and counted as hung."""
    children = {}
    for name in names:
        with environment(**PATHS[name].environment):
            children[name] = subprocess.Popen(
                [python, "-m", "bench.gpu_canary", "--child", name, "--device", device],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                cwd=Path(__file__).resolve().parents[1],
                start_new_session=True)  # a group of its own: a hang is killed with all it started
    deadline, verdicts = time.monotonic() + timeout, {}
    for name, process in children.items():
        try:
            output, _ = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # else a grandchild holding the pipe keeps us waiting
            output, _ = process.communicate()
            verdicts[name] = "HANG"
            log(f"{name}: HANG (killed after {timeout:.0f} s); its last output: {output.strip()[-300:]}")
            continue
        verdicts[name] = {OK: "ok", WRONG: "WRONG", SKIPPED: "skipped"}.get(process.returncode, "CRASH")
        log(output.strip() if verdicts[name] != "CRASH" else
            f"{name}: CRASH (exit {process.returncode}): {output.strip()[-1500:]}")
    return verdicts


def fallback_environment(verdicts: dict[str, str]) -> dict[str, str]:
    """The variables that step around every failed path."""
    variables = {}
    for name, verdict in verdicts.items():
        if verdict in ("WRONG", "CRASH", "HANG"):
            variables.update(PATHS[name].on_failure)
    return variables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_canary", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for all paths together (default 120)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated, of: " + ", ".join(PATHS))
    parser.add_argument("--env-out", type=Path, default=None, help="write the fallback exports here (sh)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child, args.device)
    names = args.paths.split(",")
    unknown = [name for name in names if name not in PATHS]
    if unknown:
        parser.error(f"argument --paths: unknown {', '.join(unknown)}; expected some of {', '.join(PATHS)}")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    verdicts = run(names, args.device, args.timeout)
    variables = fallback_environment(verdicts)
    if args.env_out is not None:
        args.env_out.parent.mkdir(parents=True, exist_ok=True)
        args.env_out.write_text("".join(f"export {name}={value}\n" for name, value in variables.items()))
    failed = [name for name, verdict in verdicts.items() if verdict in ("WRONG", "CRASH", "HANG")]
    print("canary: " + ", ".join(f"{name} {verdict}" for name, verdict in verdicts.items()))
    if failed:
        print("canary: FAILED " + ", ".join(failed) + "; the rest of the stage runs with "
              + (" ".join(f"{n}={v}" for n, v in variables.items()) or "no fallback (nothing steps around it)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
