"""FlashAttention's test grid against tformer's attention, with FlashAttention's acceptance rule.

The grid's dimensions are those of FlashAttention's ``tests/test_flash_attn.py``
(``test_flash_attn_output``, ``test_flash_attn_varlen_output``, ``test_flash_attn_splitkv``):
head dims, (seqlen_q, seqlen_k) pairs, MHA/MQA/GQA, causal and sliding windows (in both
alignments: FlashAttention's bottom-right and tformer's default top-left), soft-capping, padding
kinds (none: the padded-batch op; "full", "random", "third": unpadded into the varlen op as its
tests do) and fp16/bf16.

The rule (FlashAttention's): against ``attention_ref`` in float64, the maximum error of the
output may be at most ``2x`` (``3x`` with soft-capping) that of the same-precision PyTorch path
(``attention_ref(upcast=False, reorder_ops=True)`` in the case's dtype), and of each gradient
``3x`` (``5x`` with soft-capping), plus FlashAttention's floor (twice the float32 rounding at the
reference's magnitude, plus 3e-4 on gradients with soft-capping).

    python -m bench.flash_attn_grid --device cuda --backends triton,cuda       # the full grid
    python -m bench.flash_attn_grid --device cuda --max-cases 500 --seed 1     # a sample
    python -m bench.flash_attn_grid --device cpu --max-cases 12                # interpreted sample

``tests/test_flash_attn_grid.py`` runs a CPU sample in CI; ``bench.gpu_sweep --flash-grid N``
adds N grid cases (or "full") to the GPU proof run's sweep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

HEAD_DIMS = (32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256)
SEQLENS = ((1, 147), (1, 239), (3, 799), (108, 256), (113, 203), (113, 211), (127, 512), (128, 217), (256, 512),
           (512, 256), (1023, 1024), (1024, 1023), (1024, 1024), (2048, 2048))
MHA_TYPES = ("mha", "mqa", "gqa")
MASKS = ("none", "causal", "local", "causal_local")
ALIGNMENTS = ("bottom_right", "top_left")
SOFTCAPS = (0.0, 50.0)
PADDINGS = ("none", "full", "random", "third")
DTYPES = ("float16", "bfloat16")
# FlashAttention's tests: batch 4 (9 heads; MQA 1, GQA 3 key/value heads). The interpreter runs
# one batch row of 4 heads (GQA: 2) so that a sample stays within a CI budget.
SHAPES = {"cuda": dict(batch=4, heads=9, gqa_kv_heads=3), "cpu": dict(batch=1, heads=4, gqa_kv_heads=2)}
# Interpreter sample: short sequences and head dims only (each block pair is a Python loop step).
CPU_MAX_SCORES = 128 * 217
CPU_MAX_HEAD_DIM = 64


@dataclass(frozen=True)
class GridCase:
    head_dim: int
    seqlen_q: int
    seqlen_k: int
    mha_type: str
    mask: str
    alignment: str
    softcap: float
    padding: str
    dtype: str
    seed: int = 0

    @property
    def name(self) -> str:
        return (f"d{self.head_dim}-{self.seqlen_q}x{self.seqlen_k}-{self.mha_type}-{self.mask}-{self.alignment}-"
                f"cap{self.softcap:g}-{self.padding}-{self.dtype}")


def full_grid() -> list[GridCase]:
    """Every combination; the alignment only where a mask has a diagonal to place."""
    cases = []
    for d, (sq, sk), mha, mask, align, cap, padding, dtype in itertools.product(
            HEAD_DIMS, SEQLENS, MHA_TYPES, MASKS, ALIGNMENTS, SOFTCAPS, PADDINGS, DTYPES):
        if mask == "none" and align != ALIGNMENTS[0]:
            continue
        cases.append(GridCase(d, sq, sk, mha, mask, align, cap, padding, dtype, seed=len(cases)))
    return cases


def sample(count: int, seed: int, device: str) -> list[GridCase]:
    """``count`` grid cases drawn without replacement (interpreter-sized on the CPU), each with its
    own input seed; the same arguments give the same cases."""
    grid = full_grid()
    if device == "cpu":
        grid = [c for c in grid if c.seqlen_q * c.seqlen_k <= CPU_MAX_SCORES and c.head_dim <= CPU_MAX_HEAD_DIM]
    rng = random.Random(seed)
    return [GridCase(**{**asdict(c), "seed": rng.randrange(1 << 30)}) for c in rng.sample(grid, min(count, len(grid)))]


# ---------------------------------------------------------------- one case

def _mask_kwargs(case: GridCase, window: tuple[int, int] | None) -> dict:
    return dict(causal=case.mask in ("causal", "causal_local"), window_size=window or (-1, -1),
                softcap=case.softcap)


def run_case(case: GridCase, backend: str, device: str) -> dict:
    """{"status": "ok" | "wrong" | "skipped", "worst": error / allowed, "detail": ...}."""
    import torch
    import tformer
    from flash_attn_reference import attention_ref, max_error, pad, padding_mask, rounding_floor, unpad

    dev = torch.device(device)
    dtype = getattr(torch, case.dtype)
    shape = SHAPES["cuda" if dev.type == "cuda" else "cpu"]
    batch, heads = shape["batch"], shape["heads"]
    kv_heads = dict(mha=heads, mqa=1, gqa=shape["gqa_kv_heads"])[case.mha_type]
    gen = torch.Generator().manual_seed(case.seed)
    sq, sk, d = case.seqlen_q, case.seqlen_k, case.head_dim

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dev)

    q64, k64, v64 = randn(batch, sq, heads, d), randn(batch, sk, kv_heads, d), randn(batch, sk, kv_heads, d)
    grad64 = randn(batch, sq, heads, d)
    window = None
    if case.mask in ("local", "causal_local"):  # as FlashAttention draws it: both bounds in [0, seqlen_k)
        window = tuple(int(x) for x in torch.randint(0, sk, (2,), generator=gen))
        if case.mask == "causal_local":
            window = (window[0], 0)
    if case.padding == "none":
        query_mask = key_mask = None
    else:
        query_mask = padding_mask(sq, batch, case.padding, gen).to(dev)
        key_mask = padding_mask(sk, batch, case.padding, gen).to(dev)
    ref_kwargs = dict(_mask_kwargs(case, window), alignment=case.alignment, query_padding_mask=query_mask,
                      key_padding_mask=key_mask)
    ops_kwargs = dict(causal=ref_kwargs["causal"], alignment=case.alignment, softcap=case.softcap,
                      window=None if window is None else window)

    def run(fn, leaves, grad):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    def tformer_call(q, k, v):
        if query_mask is None:
            out = tformer.ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=backend,
                                        **ops_kwargs)
            return out.transpose(1, 2)
        (qp, cu_q, max_q), (kp, cu_k, max_k) = unpad(q, query_mask), unpad(k, key_mask)
        vp, _, _ = unpad(v, key_mask)
        out = tformer.ops.attention_varlen(qp, kp, vp, cu_q, cu_k, max_q, max_k, backend=backend, **ops_kwargs)
        return pad(out, query_mask)

    inputs = (q64.to(dtype), k64.to(dtype), v64.to(dtype))
    try:
        got = run(tformer_call, inputs, grad64)
    except tformer.ops.UnsupportedInput as error:
        return dict(status="skipped", worst=0.0, detail=str(error).splitlines()[0][:200])
    want = run(lambda q, k, v: attention_ref(q, k, v, **ref_kwargs)[0], (q64, k64, v64), grad64)
    same_precision = run(lambda q, k, v: attention_ref(q, k, v, upcast=False, reorder_ops=True, **ref_kwargs)[0],
                         inputs, grad64)
    # Gradients of padded positions are zero on every path; compare the real tokens (as unpadded).
    details, worst = [], 0.0
    for index, name in enumerate(("out", "dq", "dk", "dv")):
        factor = (3.0 if case.softcap else 2.0) if index == 0 else (5.0 if case.softcap else 3.0)
        floor = rounding_floor(want[index]) + (3e-4 if index and case.softcap else 0.0)
        err = max_error(got[index], want[index])
        allowed = factor * max_error(same_precision[index], want[index]) + floor
        if not torch.isfinite(got[index]).all():
            err = math.inf
        worst = max(worst, err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf))
        if err > allowed:
            details.append(f"{name}: {err:.3g} > {factor:g} x {max_error(same_precision[index], want[index]):.3g} "
                           f"+ {floor:.3g}")
    return dict(status="wrong" if details else "ok", worst=worst, detail="; ".join(details))


def run_grid(cases: list[GridCase], backends: list[str], device: str, seconds: float = math.inf,
             log=print) -> dict:
    """Every case on every backend until ``seconds`` pass; counts per backend and each failure."""
    counts = {b: dict(cases=0, wrong=0, skipped=0, worst=0.0) for b in backends}
    failures, start = [], time.monotonic()
    for case, backend in itertools.product(cases, backends):
        if time.monotonic() - start > seconds:
            break
        result = run_case(case, backend, device)
        row = counts[backend]
        if result["status"] == "skipped":
            row["skipped"] += 1
            continue
        row["cases"] += 1
        row["worst"] = max(row["worst"], result["worst"])
        if result["status"] == "wrong":
            row["wrong"] += 1
            failures.append(dict(case=asdict(case), backend=backend, **result))
            log(f"WRONG flash grid {backend} {case.name} seed {case.seed}: {result['detail']}")
    return dict(counts=counts, failures=failures, seconds=round(time.monotonic() - start, 1),
                total=dict(cases=sum(r["cases"] for r in counts.values()),
                           wrong=sum(r["wrong"] for r in counts.values())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flash_attn_grid", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--max-cases", type=int, default=None, help="a seeded sample (default: the full grid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=math.inf)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    cases = full_grid() if args.max_cases is None else sample(args.max_cases, args.seed, args.device)
    result = run_grid(cases, args.backends.split(","), args.device, args.seconds,
                      log=lambda line: print(line, flush=True))
    print(json.dumps({k: result[k] for k in ("counts", "total", "seconds")}))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 1 if result["total"]["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
