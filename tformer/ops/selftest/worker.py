"""One kernel path's self-check, run in its own process so a hang or a crash cannot take the
caller down:

    python -m tformer.ops.selftest.worker triton:atomic_dq --device cuda:0

checks the path against the float64 reference on :func:`tformer.ops.selftest.cases.correctness_cases`,
then times it against torch, and prints (or writes to ``--out``) one JSON result:
``{"path", "status": "ok" | "wrong" | "unavailable", "checked", "detail", "timings"}``.
``--standin module:attribute`` checks a ``{op: implementation}`` mapping instead of a registered
backend (the tests' paths that hang, crash, answer wrong or answer slowly).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

CHECKED_OPS = ("attention", "layer_norm", "rms_norm", "softmax")


def _implementations(path: str, standin: str | None, device: torch.device) -> tuple[dict, str | None]:
    """({op: callable}, why the path cannot run here or None)."""
    from tformer.ops import registry
    from tformer.ops.variants import split

    if standin is not None:
        module, _, attribute = standin.partition(":")
        return dict(getattr(importlib.import_module(module), attribute)), None
    why = registry.unavailable_reason(path)
    if why is not None:
        return {}, why
    base, variant = split(path)
    # A variant changes only the ops it names; the others are its backend's, checked under that name.
    ops = registry.variants(base)[variant].ops if variant else CHECKED_OPS
    return {op: registry.implementation(op, path)[1] for op in CHECKED_OPS
            if op in ops and registry.implementation(op, path)[0] is not None}, None


def check(path: str, device: torch.device, standin: str | None = None, repeats: int = 5) -> dict:
    from tformer.ops import registry
    from tformer.ops.validation import dtype_name

    from .cases import check_case, correctness_cases, median_ms, timing_shapes

    impls, why = _implementations(path, standin, device)
    result = {"path": path, "device": str(device), "status": "unavailable" if why else "ok", "checked": [],
              "detail": why, "timings": []}
    if why:
        return result

    def refused(op, args):
        if standin is not None:
            return None
        first = next(v for v in args.values() if isinstance(v, torch.Tensor))
        return registry.refusal(op, path, device, first.dtype, args)

    for op, name, args in correctness_cases(device):
        if op not in impls or refused(op, args):
            continue
        problem = check_case(impls[op], registry.implementation(op, "reference")[1], args)
        result["checked"].append(name)
        if problem is not None:
            result.update(status="wrong", detail=f"{name}: {problem}")
            return result
    for op, shape, args in timing_shapes(device):
        if op not in impls or refused(op, args):
            continue
        dtype = dtype_name(next(v for v in args.values() if isinstance(v, torch.Tensor)).dtype)
        torch_fn = registry.implementation(op, "torch")[1]
        times = {path: median_ms(impls[op], args, device, repeats), "torch": median_ms(torch_fn, args, device, repeats)}
        result["timings"].append({"op": op, "dtype": dtype, **shape, "times_ms": times})
    if not result["checked"]:
        result.update(status="unavailable", detail="it takes none of the self-check's cases on this device")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tformer.ops.selftest.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a backend or variant name, e.g. triton, triton:atomic_dq, cuda")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--standin", help="module:attribute holding {op: implementation} (tests)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per shape (median)")
    parser.add_argument("--out", help="write the JSON result here (default: stdout)")
    args = parser.parse_args(argv)
    result = check(args.path, torch.device(args.device), args.standin, args.repeats)
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
