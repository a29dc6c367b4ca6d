"""Run one attention row a few times, for a profiler to watch (Nsight Compute on a GPU).

    python -m bench.profile_attention --shape 4,16,4096,128 --causal --backend triton --pass bwd
    ncu --set full --profile-from-start off -o profile python -m bench.profile_attention ...

The first ``--warmup`` iterations compile and autotune, outside the profiled range (the script
calls cudaProfilerStart after them; `bash bench/gpu_session.sh profile` runs the ncu line). On a
CPU (reference backend, small shapes) it only proves the script runs.
"""

from __future__ import annotations

import argparse

import torch

import tformer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"argument '--shape' must be B,H,S,D (four positive ints), got {text!r}")
    return tuple(int(part) for part in parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=parse_shape, default=(4, 16, 4096, 128), help="B,H,S,D")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backend", default="triton", help="tformer backend (reference, triton, cuda)")
    parser.add_argument("--pass", dest="pass_name", choices=("fwd", "bwd"), default="fwd")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compile, autotune)")
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, heads, seq, head_dim = args.shape
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=DTYPES[args.dtype], generator=generator,
                           requires_grad=args.pass_name == "bwd") for _ in range(3))
    grad = torch.randn(batch, heads, seq, head_dim, device=device, dtype=DTYPES[args.dtype], generator=generator)

    def one() -> None:
        out = tformer.ops.attention(q, k, v, causal=args.causal, backend=args.backend)
        if args.pass_name == "bwd":
            out.backward(grad)  # the forward runs too; filter the profiler on the backward kernels
            for t in (q, k, v):
                t.grad = None

    for index in range(args.warmup + args.iterations):
        if index == args.warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()  # ncu --profile-from-start off starts here
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"ran attention {args.pass_name} {args.shape} causal={args.causal} {args.dtype} backend={args.backend}: "
          f"{args.warmup} warm-up + {args.iterations} profiled iterations on {device.type}")


if __name__ == "__main__":
    main()
