"""Randomized correctness sweep: every op x backend x dtype over random shapes, forward and every
gradient against the float64 reference, under a fixed time budget.

The rule is FlashAttention's: a backend's error against float64 may be at most twice the error of
the same-precision PyTorch path (the ``reference`` backend run in the low dtype) plus an absolute
floor (tests/tolerances.py's atol for that dtype, scaled by the magnitude of the expectation).
Every failing case prints a one-line reproducer:

    python -m bench.gpu_sweep --seconds 90 --seed 1 --out sweep.json    # on a GPU
    python -m bench.gpu_sweep --device cpu --seconds 5                  # CPU: Triton interpreted, tiny shapes
    python -m bench.gpu_sweep --case '{"op": "softmax", ...}'           # re-run one case
    python -m bench.gpu_sweep --seconds 90 --flash-grid full            # plus FlashAttention's whole grid

``--flash-grid N`` (a seeded sample of N cases) or ``full`` also runs FlashAttention's test grid
(bench/flash_attn_grid.py: its head dims, sequence pairs, MQA/GQA, both causal alignments,
windows, soft-capping, padding kinds and varlen, with its own rule) on the swept attention
backends, after the random sweep; its counts join the result as ``flash_grid``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

from bench.environment import environment

OPS = ("attention", "attention_varlen", "layer_norm", "rms_norm", "softmax")
DTYPES = ("bfloat16", "float16", "float32")
# 64 and 128 three times over: most models use them, and only they take the sm_90a kernels
# (csrc/attention_sm90/), so 3 in 8 GPU attention cases land there instead of 1 in 6.
GPU_HEAD_DIMS = (32, 40, 48, 64, 64, 64, 72, 80, 96, 112, 128, 128, 128, 160, 192, 256)
CPU_HEAD_DIMS = (16, 24, 32, 40)
# Float64 reference cost bounds: scores (B * Hq * Sq * Sk) and row elements (M * N) per case;
# 2**26 float64 scores are 512 MiB, so one head of 8192 x 8192 fits.
GPU_LIMITS = dict(max_seq=8192, max_scores=1 << 26, max_row=65536, max_elements=1 << 23)
CPU_LIMITS = dict(max_seq=40, max_scores=1 << 13, max_row=300, max_elements=1 << 12)
# Op implementations by name; tests swap one for a wrong one to prove the checker catches it.
IMPLEMENTATIONS: dict = {}
# Attention paths a backend picks by itself on Hopper, swept as their own "backend+path" rows so
# the older path (the one other GPUs run) is proven on the same GPU: name -> (backend, environment).
PATH_VARIANTS = {"triton+fa2": ("triton", {"TFORMER_ATTENTION_FWD": "fa2"}),
                 "cuda+sm80": ("cuda", {"TFORMER_ATTENTION_FORCE_SM80": "1"})}
# Options a backend offers on every GPU, swept as their own rows in the same way.
OPTION_VARIANTS = {"triton+atomic_dq": ("triton", {"TFORMER_ATTENTION_DQ": "atomic"})}
VARIANTS = {**PATH_VARIANTS, **OPTION_VARIANTS}
VARIANT_OPS = ("attention", "attention_varlen")


def _ops():
    if not IMPLEMENTATIONS:
        import tformer

        IMPLEMENTATIONS.update({name: getattr(tformer.ops, name) for name in OPS})
    return IMPLEMENTATIONS


# ---------------------------------------------------------------- case generation (pure Python)

def _length(rng: random.Random, limit: int, low: int = 1) -> int:
    """Log-uniform in [low, limit], nudged off multiples of 16 (block sizes) most of the time."""
    n = int(round(math.exp(rng.uniform(math.log(low), math.log(limit)))))
    n = max(low, min(limit, n))
    if n > 16 and n % 16 == 0 and rng.random() < 0.8:
        n += -1 if n == limit else rng.choice((-1, 1))
    return n


def make_case(rng: random.Random, op: str, backend: str, dtype: str, device: str) -> dict:
    """A random case: a JSON-able dict holding everything needed to rebuild its inputs."""
    limits = GPU_LIMITS if device == "cuda" else CPU_LIMITS
    case = dict(op=op, backend=backend, dtype=dtype, device=device, seed=rng.randrange(1 << 31))
    if op in ("attention", "attention_varlen"):
        head_dims = GPU_HEAD_DIMS if device == "cuda" else CPU_HEAD_DIMS
        num_kv = rng.choice((1, 1, 2, 4))
        group = rng.choice((1, 1, 2, 3, 4))
        case.update(num_kv_heads=num_kv, num_heads=num_kv * group, head_dim=rng.choice(head_dims),
                    causal=rng.random() < 0.5)
        budget = limits["max_scores"] // case["num_heads"]
        if op == "attention":
            seq_q = _length(rng, limits["max_seq"])
            seq_k = seq_q if rng.random() < 0.5 else _length(rng, limits["max_seq"])
            batch = max(1, min(rng.choice((1, 2, 3, 4)), budget // (seq_q * seq_k)))
            while seq_q * seq_k * batch > budget:  # shrink the longer side until the reference fits
                seq_q, seq_k = (max(1, seq_q // 2), seq_k) if seq_q >= seq_k else (seq_q, max(1, seq_k // 2))
            case.update(batch=batch, seq_q=seq_q, seq_k=seq_k)
            if rng.random() < 0.4:  # key padding; length 0 is a batch element whose rows are all padded
                case["key_lengths"] = [rng.choice((0, rng.randint(0, seq_k), seq_k)) for _ in range(batch)]
        else:
            num_seqs = rng.randint(1, 4)
            lengths_q = [_length(rng, limits["max_seq"] // 2) for _ in range(num_seqs)]
            lengths_k = lengths_q if rng.random() < 0.5 else [_length(rng, limits["max_seq"] // 2)
                                                               for _ in range(num_seqs)]
            while sum(a * b for a, b in zip(lengths_q, lengths_k)) > budget:
                lengths_q = [max(1, n // 2) for n in lengths_q]
                lengths_k = [max(1, n // 2) for n in lengths_k]
            case.update(lengths_q=lengths_q, lengths_k=lengths_k)
    else:
        # Now and then the widest row the kernels must take (65,536 on a GPU).
        width = limits["max_row"] if rng.random() < 0.05 else _length(rng, limits["max_row"])
        rows = max(1, min(_length(rng, 512), limits["max_elements"] // width))
        case.update(rows=rows, width=width)
        if op in ("layer_norm", "rms_norm"):
            # param_fp32: float32 weight/bias beside half-precision x, as under autocast.
            case.update(affine=rng.random() < 0.8, residual=rng.random() < 0.4, param_fp32=rng.random() < 0.3)
        else:
            case.update(scale=rng.choice((1.0, 0.125, 2.0)), mask=rng.choice((None, None, "bool", "float", "bool_row")))
    return case


# ---------------------------------------------------------------- inputs and one evaluation

def _inputs(case: dict):
    """(leaves, kwargs, grad_outs) in float64 on the case's device; leaves get gradients."""
    import torch

    gen = torch.Generator().manual_seed(case["seed"])
    dev = torch.device(case["device"])

    def randn(*shape, spread=1.0):
        return (spread * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dev)

    op = case["op"]
    if op == "attention":
        b, hq, hkv, d = case["batch"], case["num_heads"], case["num_kv_heads"], case["head_dim"]
        leaves = {"q": randn(b, hq, case["seq_q"], d), "k": randn(b, hkv, case["seq_k"], d),
                  "v": randn(b, hkv, case["seq_k"], d)}
        kwargs = dict(causal=case["causal"])
        if case.get("key_lengths") is not None:
            lengths = torch.tensor(case["key_lengths"], device=dev)
            kwargs["key_padding_mask"] = torch.arange(case["seq_k"], device=dev)[None, :] >= lengths[:, None]
        grad_outs = [randn(b, hq, case["seq_q"], d)]
    elif op == "attention_varlen":
        hq, hkv, d = case["num_heads"], case["num_kv_heads"], case["head_dim"]
        total_q, total_k = sum(case["lengths_q"]), sum(case["lengths_k"])
        leaves = {"q": randn(total_q, hq, d), "k": randn(total_k, hkv, d), "v": randn(total_k, hkv, d)}

        def offsets(lengths):
            return torch.tensor([0, *[sum(lengths[:i + 1]) for i in range(len(lengths))]], dtype=torch.int32,
                                device=dev)

        kwargs = dict(cu_seqlens_q=offsets(case["lengths_q"]), cu_seqlens_k=offsets(case["lengths_k"]),
                      max_seqlen_q=max(case["lengths_q"]), max_seqlen_k=max(case["lengths_k"]), causal=case["causal"])
        grad_outs = [randn(total_q, hq, d)]
    elif op in ("layer_norm", "rms_norm"):
        m, n = case["rows"], case["width"]
        leaves = {"x": randn(m, n)}
        if case["affine"]:
            leaves["weight"] = 1 + randn(n, spread=0.1)
            if op == "layer_norm":
                leaves["bias"] = randn(n, spread=0.1)
        if case["residual"]:
            leaves["residual"] = randn(m, n)
        kwargs = {}
        grad_outs = [randn(m, n), randn(m, n)] if case["residual"] else [randn(m, n)]
    else:
        m, n = case["rows"], case["width"]
        leaves = {"x": randn(m, n, spread=4.0)}
        kwargs = dict(scale=case["scale"])
        if case["mask"] == "bool_row":  # (1, N), broadcast over the rows (stride 0)
            kwargs["mask"] = (torch.rand(1, n, generator=gen) < 0.7).to(dev)
        elif case["mask"] is not None:
            keep = torch.rand(m, n, generator=gen).to(dev) < 0.7
            if m > 1:
                keep[0] = False  # a row where nothing takes part: zeros, zero gradient
            kwargs["mask"] = keep if case["mask"] == "bool" else torch.zeros(m, n, dtype=torch.float64, device=dev) \
                .masked_fill(~keep, float("-inf"))
        grad_outs = [randn(m, n)]
    return leaves, kwargs, grad_outs


def evaluate(case: dict, backend: str, dtype) -> dict | None:
    """Outputs and gradients (float64 copies) of ``case`` run with ``backend`` in ``dtype``;
    None when the backend does not take this input (UnsupportedInput)."""
    import torch
    import tformer

    leaves64, kwargs64, grad_outs64 = _inputs(case)
    def leaf_dtype(name):
        keep_fp32 = case.get("param_fp32") and name in ("weight", "bias") and dtype != torch.float64
        return torch.float32 if keep_fp32 else dtype

    leaves = {name: t.to(leaf_dtype(name)).requires_grad_() for name, t in leaves64.items()}
    kwargs = {name: (t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t)
              for name, t in kwargs64.items()}
    backend, variables = VARIANTS.get(backend, (backend, {}))
    try:  # forward and backward under the path's environment (the backward may read it too)
        with environment(**variables):
            out = _ops()[case["op"]](**leaves, **kwargs, backend=backend)
            outs = list(out) if isinstance(out, tuple) else [out]
            torch.autograd.backward(outs, [g.to(dtype) for g in grad_outs64])
    except tformer.ops.UnsupportedInput:
        return None
    results = {f"out{i}" if i else "out": o.detach().double() for i, o in enumerate(outs)}
    results.update({f"d{name}": (t.grad.double() if t.grad is not None else torch.zeros_like(t, dtype=torch.float64))
                    for name, t in leaves.items()})
    return results


def check_case(case: dict) -> dict:
    """Run one case; returns {"status": "ok" | "wrong" | "skipped" | "crash", "worst": ..., "detail": ...}."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tolerances import tolerance

    dtype = getattr(torch, case["dtype"])
    try:
        actual = evaluate(case, case["backend"], dtype)
        if actual is None:
            return dict(status="skipped", worst=0.0, detail="backend does not take this input")
        expected = evaluate(case, "reference", torch.float64)
        baseline = evaluate(case, "reference", dtype)
    except Exception as error:  # a crash is a result of the sweep, not the end of it
        return dict(status="crash", worst=math.inf, detail=f"{type(error).__name__}: {error}".splitlines()[0][:300],
                    trace=traceback.format_exc(limit=3))
    worst, details = 0.0, []
    for name, want in expected.items():
        got = actual[name]
        finite = torch.isfinite(want)
        if not torch.equal(torch.isfinite(got), finite) or not torch.equal(torch.isnan(got), torch.isnan(want)):
            details.append(f"{name}: non-finite values where the reference has none")
            worst = math.inf
            continue
        error = float((got - want)[finite].abs().max()) if finite.any() else 0.0
        base = float((baseline[name] - want)[finite].abs().max()) if finite.any() else 0.0
        magnitude = max(1.0, float(want[finite].abs().max())) if finite.any() else 1.0
        floor = tolerance(dtype, "forward" if name.startswith("out") else "grad", magnitude)["atol"]
        allowed = 2 * base + floor
        ratio = error / allowed
        worst = max(worst, ratio)
        if ratio > 1:
            details.append(f"{name}: error {error:.3g} > 2 x {base:.3g} (same-precision PyTorch) + {floor:.3g}")
    return dict(status="wrong" if details else "ok", worst=worst, detail="; ".join(details))


def reproducer(case: dict) -> str:
    return f"python -m bench.gpu_sweep --case '{json.dumps(case, sort_keys=True)}'"


# ---------------------------------------------------------------- the sweep

def leave_out(backends: list[str], excluded) -> list[str]:
    """``backends`` without each excluded backend and its variants (``cuda`` takes ``cuda+sm80``)."""
    return [name for name in backends if VARIANTS.get(name, (name,))[0] not in set(excluded)]


def backends_here(device: str = "cuda") -> list[str]:
    """Every available backend but the reference, its options (OPTION_VARIANTS) on a GPU, and
    on an sm_90 GPU the older attention path of each (PATH_VARIANTS): elsewhere a backend
    already runs that path by default."""
    import torch
    import tformer

    # tformer's kernels: not the reference, not torch (PyTorch's kernels are the yardstick), and not the
    # registry's variants ("triton:atomic_dq"), which this sweep names with VARIANTS below.
    names = [name for name, reason in tformer.available_backends().items()
             if reason is None and name not in ("reference", "torch") and ":" not in name]
    on_gpu = device == "cuda" and torch.cuda.is_available()
    hopper = on_gpu and torch.cuda.get_device_capability()[0] == 9
    variants = {**OPTION_VARIANTS, **(PATH_VARIANTS if hopper else {})}
    if on_gpu:
        names += [variant for variant, (backend, _) in variants.items() if backend in names]
    return names


def sweep(seconds: float, seed: int, device: str, backends: list[str], ops=OPS, dtypes=DTYPES,
          max_cases: int | None = None, log=print) -> dict:
    """Round-robin over op x backend, a random dtype and shape each, until ``seconds`` pass."""
    rng = random.Random(seed)
    combos = [(op, backend) for op in ops for backend in backends
              if backend not in VARIANTS or op in VARIANT_OPS]
    counts = {f"{op}/{backend}": dict(cases=0, wrong=0, crashes=0, skipped=0, worst=0.0) for op, backend in combos}
    failures, start, index, interrupted = [], time.monotonic(), 0, False
    while combos and time.monotonic() - start < seconds and (max_cases is None or index < max_cases):
        op, backend = combos[index % len(combos)]
        case = make_case(rng, op, backend, rng.choice(dtypes), device)
        index += 1
        try:
            result = check_case(case)
        except KeyboardInterrupt:  # Ctrl-C or `timeout` (SIGTERM): keep the counts so far
            log(f"interrupted during {op}/{backend}: {reproducer(case)}")
            interrupted = True
            break
        row = counts[f"{op}/{backend}"]
        if result["status"] == "skipped":
            row["skipped"] += 1
            continue
        row["cases"] += 1
        row["worst"] = max(row["worst"], result["worst"])
        if result["status"] in ("wrong", "crash"):
            row["wrong" if result["status"] == "wrong" else "crashes"] += 1
            failures.append(dict(case=case, **result, reproducer=reproducer(case)))
            log(f"{result['status'].upper()} {op}/{backend} {case['dtype']}: {result['detail']}\n  {reproducer(case)}")
    return dict(seed=seed, device=device, seconds=round(time.monotonic() - start, 1), backends=backends,
                counts=counts, failures=failures, interrupted=interrupted,
                total=dict(cases=sum(r["cases"] for r in counts.values()),
                           wrong=sum(r["wrong"] for r in counts.values()),
                           crashes=sum(r["crashes"] for r in counts.values())))


def summary_table(result: dict) -> str:
    lines = ["| op/backend | cases | wrong | crashes | skipped | worst error / allowed |", "|---|---|---|---|---|---|"]
    for key, row in result["counts"].items():
        lines.append(f"| {key} | {row['cases']} | {row['wrong']} | {row['crashes']} | {row['skipped']} | "
                     f"{row['worst']:.2f} |")
    total = result["total"]
    lines.append(f"\n{total['cases']} cases, {total['wrong']} wrong, {total['crashes']} crashes "
                 f"(seed {result['seed']}, {result['seconds']} s, {result['device']})")
    return "\n".join(lines)


def run_flash_grid(spec: str, seed: int, device: str, backends: list[str], seconds: float = math.inf,
                   log=print) -> dict:
    """FlashAttention's grid ('full' or a sample of ``int(spec)`` cases) on ``backends``, each
    variant under its environment and an equal share of ``seconds`` (bench/flash_attn_grid.py)."""
    from bench import flash_attn_grid

    if spec == "full":
        cases = flash_attn_grid.full_grid()
        random.Random(seed).shuffle(cases)
    else:
        cases = flash_attn_grid.sample(int(spec), seed, device)
    results = {}
    for name in backends:
        backend, variables = VARIANTS.get(name, (name, {}))
        with environment(**variables):
            results[name] = flash_attn_grid.run_grid(cases, [backend], device, seconds / max(1, len(backends)),
                                                     log=log)
    failures = [dict(failure, backend=name) for name, r in results.items() for failure in r["failures"]]
    counts = {name: r["counts"][VARIANTS.get(name, (name,))[0]] for name, r in results.items()}
    log(f"flash grid: {len(cases)} cases x {len(backends)} backends: " + ", ".join(
        f"{name} {row['cases']} run, {row['wrong']} wrong, worst {row['worst']:.2f}" for name, row in counts.items()))
    return dict(cases=len(cases), counts=counts, failures=failures, spec=spec,
                total=dict(wrong=sum(row["wrong"] for row in counts.values())))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="time budget (default 90)")
    parser.add_argument("--seed", type=int, default=None, help="default: from the clock, printed")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default cuda; with --case, the case's own device unless given")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated, a variant as backend+variant ({', '.join(VARIANTS)}); default: every "
                        "available backend, its options on a GPU, and on an sm_90 GPU its older paths")
    parser.add_argument("--exclude", default=None,
                        help="comma-separated backends to leave out, with their variants (e.g. cuda when "
                        "bench.gpu_canary found it broken)")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON with the counts and every failure")
    parser.add_argument("--case", default=None, help="re-run one case (the JSON a failure printed)")
    parser.add_argument("--flash-grid", default=None,
                        help="also run FlashAttention's test grid: 'full', or N for a seeded sample of N cases")
    parser.add_argument("--flash-grid-seconds", type=float, default=math.inf,
                        help="time cap on the grid (the full grid runs in a seeded random order, so a capped run "
                        "is a uniform sample of it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.case is not None:
        try:
            case = json.loads(args.case)
        except json.JSONDecodeError as error:
            parser.error(f"--case must be a case's JSON, got {args.case!r} ({error})")
        if not isinstance(case, dict) or case.get("op") not in OPS:
            parser.error(f"--case must be a JSON object whose 'op' is one of {OPS}, got {args.case!r}")
        case["device"] = args.device = args.device or case.get("device", "cuda")
    args.device = args.device or "cuda"
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible (use --device cpu for an interpreted run)")
    if args.case is not None:
        result = check_case(case)
        print(json.dumps(result, default=str))
        return 0 if result["status"] in ("ok", "skipped") else 1
    unknown = sorted(set(args.ops.split(",")) - set(OPS)) + sorted(set(args.dtypes.split(",")) - set(DTYPES))
    if unknown:
        parser.error(f"--ops/--dtypes: unknown {unknown}; expected among {OPS} and {DTYPES}")
    backends = args.backends.split(",") if args.backends else backends_here(args.device)
    backends = leave_out(backends, args.exclude.split(",") if args.exclude else ())
    if not backends:
        parser.error(f"--exclude {args.exclude}: leaves no backend to sweep")
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    signal.signal(signal.SIGTERM, _interrupt)
    # The Triton attention forward follows $TFORMER_ATTENTION_FWD (auto: the Hopper kernel on sm_90
    # for 16-bit TMA-legal inputs; fa2: today's kernel everywhere): sweep once with each to cover both.
    fwd_path = os.environ.get("TFORMER_ATTENTION_FWD", "auto")
    print(f"gpu_sweep: seed {seed}, {args.seconds:g} s, device {args.device}, backends {backends}, "
          f"attention forward {fwd_path}", flush=True)
    result = sweep(args.seconds, seed, args.device, backends, ops=args.ops.split(","), dtypes=args.dtypes.split(","),
                   max_cases=args.max_cases, log=lambda line: print(line, flush=True))
    if args.flash_grid is not None:
        result["flash_grid"] = run_flash_grid(args.flash_grid, seed, args.device, backends, args.flash_grid_seconds,
                                              log=lambda line: print(line, flush=True))
        result["total"]["wrong"] += result["flash_grid"]["total"]["wrong"]
    result["attention_fwd"] = fwd_path
    result["versions"] = dict(torch=torch.__version__, cuda=torch.version.cuda,
                              gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    print(summary_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 1 if result["total"]["wrong"] or result["total"]["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
