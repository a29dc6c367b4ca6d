"""Lower every launch configuration of tformer's Triton kernels for an H100 (sm_90) without a
GPU, and report what ptxas says about each: registers per thread, spilled bytes and shared
memory. A config that spills or does not fit a block's shared memory is slow or skipped by the
autotuner; this finds it before GPU time is spent.

    python -m bench.compile_audit                    # every kernel, markdown table to stdout
    python -m bench.compile_audit --only attention   # kernels whose name contains "attention"
    python -m bench.compile_audit --json audit.json  # the rows, for diffing two Triton versions

The configs are the autotune tables (attention) and the ``block_config`` heuristic (rows), so
the audit follows any change to either. Every kernel is compiled as it launches: the real
launchers run on meta tensors with a recording launcher, and Triton's own binder specializes
the recorded arguments (16-divisible pointers and integers, integers equal to 1 as constants),
so unit strides become constants and loads vectorize and pipeline as on the GPU. It needs no
GPU; ``TRITON_INTERPRET`` must be unset. Exit status 1 when a config fails to compile,
overflows shared memory, or spills on a path the speed targets cover (dropout with padding or
varlen may spill: reported).

Register allocation differs between Triton releases: audit with the Triton the GPU runs, e.g.
``pip install --target /tmp/triton36 --no-deps triton==3.6.0`` and then
``PYTHONPATH=/tmp/triton36 TRITON_CACHE_DIR=/tmp/triton36-cache python -m bench.compile_audit``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232_448  # 227 KiB: the most one block may opt in to on sm_90
# ptxas at times parks a word or two in local memory well under its register cap (seen: 8 bytes
# at 48 registers); that costs nothing measurable. More than this is a finding.
SPILL_TOLERANCE_BYTES = 16


@dataclass
class Case:
    """One kernel configuration to lower: ``compile`` returns Triton's compiled kernel."""

    kernel: str
    variant: str
    config: str
    compile: Callable
    spills_allowed: bool = False  # rarely used paths (dropout with padding or varlen): reported only


@dataclass
class Row:
    kernel: str
    variant: str
    config: str
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    cp_async: int | None = None  # cp.async instructions in the PTX (0: loads not pipelined)
    wgmma: int | None = None  # wgmma.mma_async instructions (0: the dots use mma.sync or FMA)
    tma: int | None = None  # cp.async.bulk.tensor instructions (TMA copies; the Hopper forward's loads)
    error: str | None = None
    spills_allowed: bool = False

    @property
    def ok(self) -> bool:
        return (self.error is None and (self.spills_allowed or self.spill_bytes <= SPILL_TOLERANCE_BYTES)
                and self.shared_bytes <= H100_SHARED_BYTES)


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) of the PTX's kernel, from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90).path  # Triton >= 3.7 picks the ptxas by arch
    except TypeError:
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", source, "-o", os.path.join(scratch, "k.cubin")],
                                capture_output=True, text=True, check=True)
    text = result.stderr + result.stdout
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return registers, spills


def lower_launch(kernel, args: tuple, meta: dict, num_warps: int, num_stages: int):
    """Compile ``kernel`` as Triton's launcher would for these arguments: its own binder gives
    the specialization (pointers and integers divisible by 16 marked so, integers equal to 1
    made constants), the same signature, constants and attributes a launch compiles with."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(H100)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(meta, num_warps=num_warps, num_stages=num_stages)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature_types, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                                    options)
    return triton.compile(ASTSource(kernel, signature_types, constexprs, attrs), target=H100,
                          options=options.__dict__)


def measure(compiled) -> dict:
    """ptxas's registers and spills, shared memory, and the PTX's async copies and wgmma."""
    ptx = compiled.asm["ptx"]
    registers, spills = ptxas_report(ptx)
    return dict(registers=registers, spill_bytes=spills, shared_bytes=compiled.metadata.shared,
                cp_async=len(re.findall(r"cp\.async\.c[ag]", ptx)), wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)))


def ttgir_dots(compiled) -> dict:
    """Dots in the TTGIR by lowering: ``warp_group_dot`` (wgmma on sm_90) and ``dot`` (left to
    mma.sync or, for fp32 inputs, the CUDA cores)."""
    ttgir = compiled.asm["ttgir"]
    return dict(warp_group_dot=len(re.findall(r"\bttng\.warp_group_dot\b", ttgir)),
                dot=len(re.findall(r"\btt\.dot\b", ttgir)))


# Representative launches, built by the real launchers on meta tensors (no memory, data_ptr 0):
# B=2, S=2048 (tokens and sequence counts divisible by 16, as the anchors' shapes are).
# (name, causal, key padding, varlen, dropout, Hq, Hkv). Rarely used paths (dropout with
# padding or varlen) may spill: reported, not gated.
ATTENTION_FEATURES = (("plain", False, False, False, False, 16, 16),
                      ("causal", True, False, False, False, 16, 16),
                      ("gqa-causal", True, False, False, False, 16, 4),
                      ("padding-gqa-dropout", True, True, False, True, 16, 4),
                      ("varlen-dropout", True, False, True, True, 16, 16))
SPILLS_ALLOWED = ("padding-gqa-dropout", "varlen-dropout")
# (launch, head-dim bucket) pairs allowed to spill on every feature: the opt-in atomic-dQ dK/dV
# at hd 256, where every candidate tried spills (kernels/attention_bwd.py DKDV_ATOMIC_DQ_CONFIGS).
SPILLS_ALLOWED_LAUNCHES = (("attention_bwd_dkdv_atomic_dq", 256),)
# The Hopper forward (kernels/attention_hopper.py) takes 16-bit padded-batch inputs without
# dropout: these are its variants.
HOPPER_FEATURES = (("plain", False, False, False, False, 16, 16),
                   ("causal", True, False, False, False, 16, 16),
                   ("gqa-causal", True, False, False, False, 16, 4),
                   ("padding-gqa-causal", True, True, False, False, 16, 4))
AUDIT_BATCH, AUDIT_SEQLEN = 2, 2048
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def attention_launches(data: str, head_dim: int, feature: tuple, fwd_path: str = "fa2",
                       mask: dict | None = None) -> list[tuple]:
    """(kernel name, kernel, tuned, args, meta) of every tuned launch of one forward + backward,
    or of the forward alone for ``fwd_path="hopper"``. ``mask``: the kernels' ``band`` and
    ``softcap`` keyword arguments (a sliding window, bottom-right alignment, soft-capping)."""
    import torch

    from tformer.kernels.attention import attention_forward
    from tformer.kernels.attention_bwd import attention_backward

    _, causal, padding, varlen, dropout, num_heads, num_kv_heads = feature
    dtype, device = getattr(torch, TORCH_DTYPES[data]), torch.device("meta")
    tokens = (AUDIT_BATCH * AUDIT_SEQLEN,) if varlen else (AUDIT_BATCH,)
    layout = (lambda heads: (*tokens, heads, head_dim)) if varlen else (
        lambda heads: (AUDIT_BATCH, heads, AUDIT_SEQLEN, head_dim))
    q = torch.empty(layout(num_heads), dtype=dtype, device=device)
    k, v = (torch.empty(layout(num_kv_heads), dtype=dtype, device=device) for _ in range(2))
    cu_seqlens = torch.empty(AUDIT_BATCH + 1, dtype=torch.int32, device=device) if varlen else None
    key_padding = torch.empty(AUDIT_BATCH, AUDIT_SEQLEN, dtype=torch.bool, device=device) if padding else None
    # A launch's seed is drawn below 2^62 (an int64 argument); 0 without dropout.
    dropout_p, seed = (0.1, 2**61 + 5) if dropout else (0.0, 0)
    recorded = []

    def record(kernel, tuned, grid_of, args, meta, launch_device):
        if tuned is not None:
            recorded.append((kernel, tuned, args, meta))

    common = (cu_seqlens, cu_seqlens, AUDIT_SEQLEN, AUDIT_SEQLEN, causal, head_dim ** -0.5, dropout_p, seed)
    mask = mask or {}
    out, lse = attention_forward(q, k, v, key_padding, *common, launcher=record, fwd_path=fwd_path, **mask)
    if fwd_path == "hopper":
        return [("attention_fwd_hopper", *recorded.pop())]
    launches = [("attention_fwd", *recorded.pop())]
    for expanded in (False, True) if num_heads != num_kv_heads else (False,):
        attention_backward(out, q, k, v, out, lse, key_padding, *common, launcher=record, expanded=expanded,
                           dq_mode="split", **mask)
        dq_launch, dkdv_launch = recorded.pop(), recorded.pop()
        launches.append(("attention_bwd_dkdv_expanded" if expanded else "attention_bwd_dkdv", *dkdv_launch))
        if not expanded:
            launches.append(("attention_bwd_dq", *dq_launch))
    # TFORMER_ATTENTION_DQ=atomic: the dK/dV pass with the dQ atomics, and no dQ pass.
    attention_backward(out, q, k, v, out, lse, key_padding, *common, launcher=record, expanded=False,
                       dq_mode="atomic", **mask)
    launches.append(("attention_bwd_dkdv_atomic_dq", *recorded.pop()))
    return launches


def attention_cases(dtypes: tuple[str, ...]):
    for data in dtypes:
        for bucket in (64, 128, 256):
            paths = (("fa2", ATTENTION_FEATURES), ("hopper", HOPPER_FEATURES if data != "fp32" else ()))
            for fwd_path, features in paths:
                yield from _attention_bucket_cases(data, bucket, fwd_path, features)


def _attention_bucket_cases(data: str, bucket: int, fwd_path: str, features: tuple):
    for feature in features:
        for name, kernel, tuned, args, meta in attention_launches(data, bucket, feature, fwd_path):
            for config in tuned.candidates(meta):
                label = (f"BLOCK_M={config.kwargs['BLOCK_M']} BLOCK_N={config.kwargs['BLOCK_N']} "
                         f"warps={config.num_warps} stages={config.num_stages}"
                         + (" persistent" if config.kwargs.get("PERSISTENT") else ""))
                yield Case(name, f"hd {bucket} {data} {feature[0]}", label,
                           lambda kernel=kernel, args=args, meta=dict(meta, **config.kwargs), config=config:
                           lower_launch(kernel, args, meta, config.num_warps, config.num_stages),
                           spills_allowed=feature[0] in SPILLS_ALLOWED or (name, bucket) in SPILLS_ALLOWED_LAUNCHES)


# Rows per row-kernel launch: a multiple of 16, as the anchors' row counts are.
AUDIT_ROWS = 4096
ROW_WIDTHS = (512, 1024, 4096, 8192, 65536)  # the ANCHORS rows, and a row wider than one block


def row_launches(data: str, n_cols: int) -> list[tuple]:
    """(kernel name, variant, kernel, args, meta) of every row-kernel launch at one width, made
    by the real launchers on meta tensors (with a residual, weight and bias; softmax without
    a mask, with a bool and with an additive mask)."""
    import torch

    from tformer.kernels import layer_norm, softmax

    dtype, device = getattr(torch, TORCH_DTYPES[data]), torch.device("meta")
    x, residual, dy = (torch.empty(AUDIT_ROWS, n_cols, dtype=dtype, device=device) for _ in range(3))
    weight, bias = (torch.empty(n_cols, dtype=dtype, device=device) for _ in range(2))
    recorded = []

    def record(kernel, grid, args, meta):
        recorded.append((kernel, args, meta))

    launches = []
    for norm, is_rms in (("layer_norm", False), ("rms_norm", True)):
        _, residual_out, mean, rstd = layer_norm.layer_norm_fwd(x, weight, None if is_rms else bias, residual, 1e-5,
                                                                is_rms=is_rms, launcher=record)
        layer_norm.layer_norm_bwd(dy, residual_out, weight, None if is_rms else bias, mean, rstd, dy, True,
                                  is_rms=is_rms, launcher=record)
        launches += [(f"{norm}_fwd", f"N={n_cols} {data} residual", *recorded[-2]),
                     (f"{norm}_bwd", f"N={n_cols} {data} residual", *recorded[-1])]
    masks = (("no mask", None), ("bool mask", torch.empty(AUDIT_ROWS, n_cols, dtype=torch.bool, device=device)),
             ("additive mask", torch.empty(AUDIT_ROWS, n_cols, dtype=dtype, device=device)))
    for mask_name, mask in masks:
        softmax.softmax_fwd(x, mask, 1.0, launcher=record)
        launches.append(("softmax_fwd", f"N={n_cols} {data} {mask_name}", *recorded[-1]))
    softmax.softmax_bwd(dy, x, 1.0, True, launcher=record)
    launches.append(("softmax_bwd", f"N={n_cols} {data} mask grad", *recorded[-1]))
    return launches


def row_cases(dtypes: tuple[str, ...]):
    """The row kernels as they launch (block_config's BLOCK_N and warps, Triton's specialization)."""
    for data in dtypes:
        for n_cols in ROW_WIDTHS:
            for name, variant, kernel, args, meta in row_launches(data, n_cols):
                meta = dict(meta)
                warps = meta.pop("num_warps")
                yield Case(name, variant, f"BLOCK_N={meta['BLOCK_N']} warps={warps}",
                           lambda kernel=kernel, args=args, meta=meta, warps=warps:
                           lower_launch(kernel, args, meta, warps, 1))


def all_cases(dtypes: tuple[str, ...]):
    yield from attention_cases(dtypes)
    yield from row_cases(dtypes)


def audit(only: str | None, dtypes: tuple[str, ...], cases=None) -> list[Row]:
    rows = []
    for case in cases if cases is not None else all_cases(dtypes):
        if only and only not in case.kernel:
            continue
        row = Row(case.kernel, case.variant, case.config, spills_allowed=case.spills_allowed)
        try:
            for name, value in measure(case.compile()).items():
                setattr(row, name, value)
        except Exception as error:  # a config that does not lower is a finding, not a crash
            row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        rows.append(row)
        print(format_row(row), file=sys.stderr, flush=True)
    return rows


def format_row(row: Row) -> str:
    if row.error:
        return f"| {row.kernel} | {row.variant} | {row.config} | - | - | - | - | - | - | FAILED: {row.error} |"
    verdict = ("OVER SHARED MEMORY" if row.shared_bytes > H100_SHARED_BYTES
               else "SPILLS" if row.spill_bytes > SPILL_TOLERANCE_BYTES else "ok")
    verdict += " (allowed)" if row.ok and verdict != "ok" else ""
    return (f"| {row.kernel} | {row.variant} | {row.config} | {row.registers} | {row.spill_bytes} | "
            f"{row.shared_bytes / 1024:.1f} | {row.cp_async} | {row.wgmma} | {row.tma} | {verdict} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="audit only kernels whose name contains this")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated Triton dtypes (default bf16,fp32)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the audit lowers kernels to GPU code")
    rows = audit(args.only, tuple(args.dtypes.split(",")))
    print(f"Triton {triton.__version__}, target sm_90 (H100), {len(rows)} configs\n")
    print("| kernel | variant | config | registers | spill bytes | shared KiB | cp.async | wgmma | TMA | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(format_row(row))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(row) for row in rows], handle, indent=1)
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
