"""The CUDA row kernels (LayerNorm/RMSNorm and softmax, forward and backward) move their rows
with 128-bit global loads and stores on sm_90, and the fused LayerNorm backward reads dy and x
once: the built extension tformer._C is disassembled with ``cuobjdump -sass`` and each kernel's
instructions are read. Speed is measured by the benchmarks; this checks the code shape that the
speed depends on, without a GPU."""

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Every instantiation (element type x team size) of these kernels reads x (or dy and y) and
# writes y (or dx) in 16-byte vectors in its aligned body.
HOT_KERNELS = ("norm_forward_kernel", "norm_backward_input_kernel", "softmax_forward_kernel",
               "softmax_backward_kernel")
# norm_backward_fused_kernel<T, kWarps, kSlots, kAligned> as mangled: T, team warps, columns per
# thread, and whether rows are whole 16-byte vectors.
FUSED = re.compile(r"norm_backward_fused_kernelI(f|6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)ELb([01])E")
ELEMENT_BYTES = {"f": 4, "6__half": 2, "13__nv_bfloat16": 2}


def _extension() -> Path:
    spec = importlib.util.find_spec("tformer._C")
    if spec is None or spec.origin is None:
        pytest.skip("tformer._C is not built (TFORMER_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
    return Path(spec.origin)


def _cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    if importlib.util.find_spec("triton") is not None:  # Triton bundles one
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    found = [path for path in candidates if path and os.path.isfile(path)]
    if not found:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled one) to disassemble tformer._C")
    return found[0]


def sass_by_function(sass: str) -> dict[str, str]:
    """cuobjdump's listing split into {mangled function name: its instructions}."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_sass_splitting_reads_cuobjdump_layout():
    listing = ("\tcode for sm_90\n\t\tFunction : _Z1fv\n\t.headerflags\n /*0000*/ STG.E.128 [R2.64], R4 ;\n"
               "\t\tFunction : _Z1gv\n /*0000*/ LDG.E.U16 R0, [R2.64] ;\n")
    functions = sass_by_function(listing)
    assert list(functions) == ["_Z1fv", "_Z1gv"]
    assert "STG.E.128" in functions["_Z1fv"] and "STG.E.128" not in functions["_Z1gv"]


@functools.lru_cache(maxsize=1)  # one disassembly (~20 s on 2 cores) serves both tests
def _sm90_functions() -> dict[str, str]:
    result = subprocess.run([_cuobjdump(), "-sass", "-arch", "sm_90", str(_extension())], capture_output=True,
                            text=True, timeout=300)
    functions = sass_by_function(result.stdout)
    if not functions:
        pytest.skip(f"tformer._C holds no sm_90 code (built for another arch?): {result.stderr.strip()[:200]}")
    return functions


def fused_backward_findings(functions: dict[str, str]) -> list[str]:
    """What is wrong with the fused LayerNorm backward's instantiations (empty: nothing).

    Each thread holds kSlots columns of a row, kSlots / V vectors of V = 16 / sizeof(T)
    elements. One pass reads kSlots / V vectors each of dy and x, and of dresidual_out, plus
    the float32 weight as float4s in both row phases (2 * kSlots / 4): a second pass over dy
    and x would add 2 * kSlots / V more 128-bit loads. dx is stored in kSlots / V vectors. The
    accumulators live in registers: no local memory (spills)."""
    findings, seen = [], 0
    for name, code in functions.items():
        match = FUSED.search(name)
        if match is None:
            continue
        seen += 1
        element, _warps, slots, aligned = match.group(1), *map(int, match.groups()[1:])
        if re.search(r"\b(LDL|STL)\b", code):
            findings.append(f"{name}: uses local memory (spilled accumulators)")
        if not aligned:
            continue
        chunks = slots // (16 // ELEMENT_BYTES[element])
        loads, stores = len(re.findall(r"LDG\.E\.128\b", code)), len(re.findall(r"STG\.E\.128\b", code))
        if not 2 * chunks <= loads <= 3 * chunks + slots // 2:
            findings.append(f"{name}: {loads} 128-bit loads, expected {2 * chunks} to {3 * chunks + slots // 2} "
                            "(dy and x read once)")
        if stores < chunks:
            findings.append(f"{name}: {stores} 128-bit stores, expected at least {chunks} (dx)")
    if not seen:
        findings.append("norm_backward_fused_kernel not found")
    return findings


def test_fused_backward_check_reads_template_arguments():
    one_pass = "LDG.E.128 R4, [R2.64] ;\n" * 2 + "STG.E.128 [R2.64], R4 ;\n"
    prefix, args = "_ZN7tformer12_GLOBAL__N_126norm_backward_fused_kernelI", "EEvNS_16NormBackwardArgsEPfS4_"
    functions = {
        f"{prefix}13__nv_bfloat16Li1ELi8ELb1E{args}": one_pass,
        f"{prefix}fLi8ELi8ELb1E{args}": one_pass,  # float32: 2 vectors per thread, so 4 loads at least
        f"{prefix}6__halfLi1ELi8ELb0E{args}": "STL [R1], R0 ;\n",
    }
    findings = fused_backward_findings(functions)
    assert len(findings) == 3, findings
    assert "IfLi8" in findings[0] and "2 128-bit loads" in findings[0]
    assert "local memory" in findings[2]
    assert fused_backward_findings({}) == ["norm_backward_fused_kernel not found"]


def test_fused_layer_norm_backward_reads_dy_and_x_once_on_sm90():
    findings = fused_backward_findings(_sm90_functions())
    assert not findings, findings


def test_row_kernels_use_128_bit_loads_and_stores_on_sm90():
    functions = _sm90_functions()
    for kernel in HOT_KERNELS:
        instantiations = {name: code for name, code in functions.items() if kernel in name}
        assert instantiations, f"{kernel} not found in tformer._C"
        for name, code in instantiations.items():
            missing = [op for op in ("LDG.E.128", "STG.E.128") if op not in code]
            assert not missing, f"{name} has no {missing}: its rows move in narrower accesses"
