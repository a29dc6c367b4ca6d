"""Lower every launch configuration of tformer's Triton kernels for an H100 (sm_90) without a
GPU, and report what ptxas says about each: registers per thread, spilled bytes and shared
memory. A config that spills or does not fit a block's shared memory is slow or skipped by the
autotuner; this finds it before GPU time is spent.

    python -m bench.compile_audit                    # every kernel, markdown table to stdout
    python -m bench.compile_audit --only attention   # kernels whose name contains "attention"
    python -m bench.compile_audit --json audit.json  # the rows, for diffing two Triton versions

The configs are the autotune tables (attention) and the ``block_config`` heuristic (rows), so
the audit follows any change to either. It needs no GPU; ``TRITON_INTERPRET`` must be unset.
Exit status 1 when a config fails to compile, overflows shared memory, or spills on a path the
speed targets cover (attention with every feature on, dropout included, may spill: reported).

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

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232_448  # 227 KiB: the most one block may opt in to on sm_90
# ptxas at times parks a word or two in local memory well under its register cap (seen: 8 bytes
# at 48 registers); that costs nothing measurable. More than this is a finding.
SPILL_TOLERANCE_BYTES = 16
FLOAT_ARGS = {"scale", "dropout_p", "eps"}
INT64_ARGS = {"seed"}


@dataclass
class Row:
    kernel: str
    variant: str
    config: str
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None
    spills_allowed: bool = False  # rarely used paths (dropout + varlen + padding): reported only

    @property
    def ok(self) -> bool:
        return (self.error is None and (self.spills_allowed or self.spill_bytes <= SPILL_TOLERANCE_BYTES)
                and self.shared_bytes <= H100_SHARED_BYTES)


def signature(kernel, meta: dict, data: str, pointers: dict) -> dict:
    """Triton types of ``kernel``'s arguments: constexpr for ``meta``, pointers for capitalised
    names (``pointers`` overrides the data type), scalars by name."""
    types = {}
    for name in kernel.arg_names:
        if name in meta:
            types[name] = "constexpr"
        elif name[0].isupper():
            types[name] = pointers.get(name, f"*{data}")
        else:
            types[name] = "fp32" if name in FLOAT_ARGS else "i64" if name in INT64_ARGS else "i32"
    return types


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


def lower(kernel, meta: dict, data: str, pointers: dict, num_warps: int, num_stages: int) -> tuple[int, int, int]:
    compiled = triton.compile(ASTSource(kernel, signature(kernel, meta, data, pointers),
                                        {name: meta[name] for name in kernel.arg_names if name in meta}),
                              target=H100, options=dict(num_warps=num_warps, num_stages=num_stages))
    registers, spills = ptxas_report(compiled.asm["ptx"])
    return registers, spills, compiled.metadata.shared


def attention_cases(dtypes: tuple[str, ...]):
    from tformer.kernels import attention as fwd, attention_bwd as bwd

    pointers = {"Lse": "*fp32", "Delta": "*fp32", "KeyPad": "*u8", "CuSeqlensQ": "*i32", "CuSeqlensK": "*i32"}
    features = {"plain": dict(IS_CAUSAL=False, HAS_KEY_PADDING=False, IS_VARLEN=False, HAS_DROPOUT=False),
                "causal": dict(IS_CAUSAL=True, HAS_KEY_PADDING=False, IS_VARLEN=False, HAS_DROPOUT=False),
                "all-features": dict(IS_CAUSAL=True, HAS_KEY_PADDING=True, IS_VARLEN=True, HAS_DROPOUT=True)}
    # dK/dV runs two ways (see attention_bwd): grouped, programs_per_kv_head = 1 (an int argument
    # equal to 1 is compiled as a constant, here as by Triton's launcher), and expanded, float32
    # partials whatever the input dtype (its heads_per_program = 1 is not specialized).
    expanded_pointers = dict(pointers, DK="*fp32", DV="*fp32")
    kernels = (("attention_fwd", fwd._attention_fwd_kernel, fwd.FWD_CONFIGS, fwd.FWD_CONFIGS_FP32, {}, pointers),
               ("attention_bwd_dkdv", bwd._dkdv_kernel, bwd.DKDV_CONFIGS, bwd.DKDV_CONFIGS_FP32,
                dict(programs_per_kv_head=1), pointers),
               ("attention_bwd_dkdv_expanded", bwd._dkdv_kernel, bwd.DKDV_CONFIGS, bwd.DKDV_CONFIGS_FP32,
                {}, expanded_pointers),
               ("attention_bwd_dq", bwd._dq_kernel, bwd.DQ_CONFIGS, bwd.DQ_CONFIGS_FP32, {}, pointers))
    for name, kernel, table, fp32_table, constants, kernel_pointers in kernels:
        for data in dtypes:
            for block_d, configs in (fp32_table if data == "fp32" else table).items():
                for feature_name, flags in features.items():
                    for config in configs:
                        meta = dict(flags, DOT_PRECISION="ieee" if data == "fp32" else "tf32", UPCAST=False,
                                    BLOCK_D=block_d, **constants, **config.kwargs)
                        label = (f"BLOCK_M={config.kwargs['BLOCK_M']} BLOCK_N={config.kwargs['BLOCK_N']} "
                                 f"warps={config.num_warps} stages={config.num_stages}")
                        yield (name, f"hd<={block_d} {data} {feature_name}", label, kernel, meta, data,
                               kernel_pointers, config.num_warps, config.num_stages)


def row_cases(dtypes: tuple[str, ...]):
    from tformer.kernels import layer_norm, softmax
    from tformer.kernels.rows import block_config

    stats = {"MEAN": "*fp32", "RSTD": "*fp32", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32"}
    widths = (512, 1024, 4096, 8192, 65536)  # the ANCHORS rows, and a row wider than one block
    for data in dtypes:
        for n_cols in widths:
            block_n, warps = block_config(n_cols)
            bwd_warps = block_config(n_cols, per_thread=8)[1]  # as layer_norm_bwd asks
            single = n_cols <= block_n
            label = f"BLOCK_N={block_n} warps={warps}"
            for norm, is_rms in (("layer_norm", False), ("rms_norm", True)):
                flags = dict(IS_RMS=is_rms, HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=not is_rms, BLOCK_N=block_n,
                             SINGLE_BLOCK=single)
                yield (f"{norm}_fwd", f"N={n_cols} {data} residual", label, layer_norm._norm_fwd_kernel, flags,
                       data, stats, warps, 1)
                yield (f"{norm}_bwd", f"N={n_cols} {data} residual", f"BLOCK_N={block_n} warps={bwd_warps}",
                       layer_norm._norm_bwd_kernel, dict(flags, HAS_DRES_OUT=True), data, stats, bwd_warps, 1)
            for mask_name, mode, mask_type in (("no mask", 0, f"*{data}"), ("bool mask", 1, "*u8"),
                                               ("additive mask", 2, f"*{data}")):
                yield ("softmax_fwd", f"N={n_cols} {data} {mask_name}", label, softmax._softmax_fwd_kernel,
                       dict(MASK_MODE=mode, BLOCK_N=block_n, SINGLE_BLOCK=single), data, {"MASK": mask_type}, warps, 1)
            yield ("softmax_bwd", f"N={n_cols} {data} mask grad", label, softmax._softmax_bwd_kernel,
                   dict(HAS_DMASK=True, BLOCK_N=block_n, SINGLE_BLOCK=single), data, {}, warps, 1)


def all_cases(dtypes: tuple[str, ...]):
    yield from attention_cases(dtypes)
    yield from row_cases(dtypes)


def audit(only: str | None, dtypes: tuple[str, ...], cases=None) -> list[Row]:
    rows = []
    for case in cases if cases is not None else all_cases(dtypes):
        name, variant, label, kernel, meta, data, pointers, warps, stages = case
        if only and only not in name:
            continue
        row = Row(name, variant, label, spills_allowed=variant.endswith("all-features"))
        try:
            row.registers, row.spill_bytes, row.shared_bytes = lower(kernel, meta, data, pointers, warps, stages)
        except Exception as error:  # a config that does not lower is a finding, not a crash
            row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        rows.append(row)
        print(format_row(row), file=sys.stderr, flush=True)
    return rows


def format_row(row: Row) -> str:
    if row.error:
        return f"| {row.kernel} | {row.variant} | {row.config} | - | - | - | FAILED: {row.error} |"
    verdict = ("OVER SHARED MEMORY" if row.shared_bytes > H100_SHARED_BYTES
               else "SPILLS" if row.spill_bytes > SPILL_TOLERANCE_BYTES else "ok")
    verdict += " (allowed)" if row.ok and verdict != "ok" else ""
    return (f"| {row.kernel} | {row.variant} | {row.config} | {row.registers} | {row.spill_bytes} | "
            f"{row.shared_bytes / 1024:.1f} | {verdict} |")


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
    print("| kernel | variant | config | registers | spill bytes | shared KiB | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(format_row(row))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(row) for row in rows], handle, indent=1)
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
