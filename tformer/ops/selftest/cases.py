"""The self-check's cases: a few small calls per op against the float64 reference, and a few
timings against torch at shapes a training run uses.

A kernel path is given as ``{op: implementation}`` with the registry's implementation signature
(validated keyword arguments), so registered backends and the stand-ins of the tests are
checked alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from tformer.ops.attention_mask import Band

# (forward atol=rtol, gradient atol=rtol) per dtype: the project's tolerance table, scaled by
# each result's magnitude below.
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 6e-2)}


def _randn(*shape, dtype, device, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def attention_case(device, dtype, batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, lengths=None):
    q = _randn(batch, heads, seq_q, head_dim, dtype=dtype, device=device, seed=0)
    k = _randn(batch, kv_heads, seq_k, head_dim, dtype=dtype, device=device, seed=1)
    v = _randn(batch, kv_heads, seq_k, head_dim, dtype=dtype, device=device, seed=2)
    mask = None
    if lengths is not None:
        mask = torch.arange(seq_k, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
    band = Band(left=-1, right=0) if causal else Band()
    return dict(q=q, k=k, v=v, causal=causal, key_padding_mask=mask, scale=head_dim ** -0.5, dropout_p=0.0,
                return_lse=False, band=band, softcap=0.0)


def norm_case(op, device, dtype, rows, n, residual):
    args = dict(x=_randn(rows, n, dtype=dtype, device=device, seed=3),
                weight=_randn(n, dtype=dtype, device=device, seed=4), eps=1e-5,
                residual=_randn(rows, n, dtype=dtype, device=device, seed=5) if residual else None)
    if op == "layer_norm":
        args["bias"] = _randn(n, dtype=dtype, device=device, seed=6)
    return args


def softmax_case(device, dtype, rows, n, masked):
    x = _randn(rows, n, dtype=dtype, device=device, seed=7) * 4
    mask = None
    if masked:  # row 0 has nothing that takes part: zeros, never NaN
        mask = torch.rand(rows, n, generator=torch.Generator().manual_seed(8)).to(device) > 0.3
        mask[0] = False
    return dict(x=x, scale=0.5, mask=mask)


def correctness_cases(device: torch.device) -> list[tuple[str, str, dict]]:
    """(op, name, args): small, awkward shapes (lengths 1 and 17, a fully masked row, grouped
    heads) in each dtype the device trains in."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)
    head_dims = (64, 128) if device.type == "cuda" else (16,)
    cases = []
    for dtype in dtypes:
        short = str(dtype).removeprefix("torch.")
        for head_dim in head_dims:
            cases += [
                ("attention", f"plain 17x17 d{head_dim} {short}",
                 attention_case(device, dtype, 1, 2, 2, 17, 17, head_dim, False)),
                ("attention", f"causal padded gqa d{head_dim} {short}",
                 attention_case(device, dtype, 2, 4, 2, 33, 33, head_dim, True, lengths=[33, 0])),
                ("attention", f"length 1 d{head_dim} {short}",
                 attention_case(device, dtype, 1, 1, 1, 1, 1, head_dim, True)),
            ]
        for op in ("layer_norm", "rms_norm"):
            cases += [(op, f"{op} 37x17 residual {short}", norm_case(op, device, dtype, 37, 17, True)),
                      (op, f"{op} 5x1000 {short}", norm_case(op, device, dtype, 5, 1000, False))]
        cases.append(("softmax", f"softmax 17x97 masked {short}", softmax_case(device, dtype, 17, 97, True)))
    return cases


def _forward_backward(fn: Callable, args: dict) -> list[torch.Tensor]:
    leaves = {name: value.detach().clone().requires_grad_()
              for name, value in args.items() if isinstance(value, torch.Tensor) and value.is_floating_point()}
    out = fn(**{**args, **leaves})
    outputs = list(out) if isinstance(out, tuple) else [out]
    grad_seed = torch.Generator().manual_seed(9)
    loss = sum((o.double() * torch.randn(o.shape, generator=grad_seed).to(o.device, torch.float64)).sum()
               for o in outputs)
    loss.backward()
    return [o.detach() for o in outputs] + [leaves[name].grad for name in sorted(leaves)]


def check_case(fn: Callable, reference: Callable, args: dict) -> str | None:
    """None when ``fn`` matches ``reference`` (run in float64) on ``args``; else what differs."""
    dtype = next(v.dtype for v in args.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    as64 = {name: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for name, value in args.items()}
    got, want = _forward_backward(fn, args), _forward_backward(reference, as64)
    forward_tol, grad_tol = TOLERANCE[dtype]
    for index, (a, b) in enumerate(zip(got, want)):
        what = "output" if index == 0 else f"result {index}"
        if a is None or a.shape != b.shape:
            return f"{what}: shape {None if a is None else tuple(a.shape)}, expected {tuple(b.shape)}"
        if torch.isnan(a).any():
            return f"{what}: NaN"
        tol = (forward_tol if index == 0 else grad_tol) * max(1.0, b.abs().max().item() if b.numel() else 1.0)
        error = (a.double() - b).abs().max().item() if b.numel() else 0.0
        if error > tol:
            return f"{what}: off by {error:.3g} > {tol:.3g}"
    return None


def timing_shapes(device: torch.device) -> list[tuple[str, dict, dict]]:
    """(op, shape fields as the timing tables key them, args) to time a path against torch on."""
    if device.type != "cuda":  # the interpreter: tiny, just to show the path runs and is timed
        return [("attention", {"head_dim": 16, "seq": 32, "causal": True},
                 attention_case(device, torch.float32, 1, 2, 2, 32, 32, 16, True)),
                ("layer_norm", {"n": 64}, norm_case("layer_norm", device, torch.float32, 64, 64, False)),
                ("softmax", {"n": 64}, softmax_case(device, torch.float32, 64, 64, False))]
    bf16 = torch.bfloat16
    return [(("attention", {"head_dim": d, "seq": s, "causal": c}, attention_case(device, bf16, b, h, h, s, s, d, c)))
            for b, h, s, d, c in ((8, 12, 512, 64, True), (4, 16, 1024, 64, True), (2, 16, 2048, 128, True),
                                  (4, 16, 1024, 128, False))] + \
        [("layer_norm", {"n": n}, norm_case("layer_norm", device, bf16, 8192, n, True)) for n in (1024, 4096)] + \
        [("softmax", {"n": n}, softmax_case(device, bf16, 4096, n, False)) for n in (1024, 4096)]


def median_ms(fn: Callable, args: dict, device: torch.device, repeats: int) -> float:
    """Median forward+backward time of ``fn`` on ``args``, in milliseconds."""
    leaves = {name: value.detach().requires_grad_()
              for name, value in args.items() if isinstance(value, torch.Tensor) and value.is_floating_point()}
    call = {**args, **leaves}

    def step():
        out = fn(**call)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    step()  # compile / warm up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
