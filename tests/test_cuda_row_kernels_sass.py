"""The CUDA row kernels (LayerNorm/RMSNorm and softmax, forward and backward) move their rows
with 128-bit global loads and stores on sm_90: the built extension tformer._C is disassembled
with ``cuobjdump -sass`` and each kernel's instructions are read. Speed is measured by the
benchmarks; this checks the code shape that the speed depends on, without a GPU."""

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


def test_row_kernels_use_128_bit_loads_and_stores_on_sm90():
    result = subprocess.run([_cuobjdump(), "-sass", "-arch", "sm_90", str(_extension())], capture_output=True,
                            text=True, timeout=300)
    functions = sass_by_function(result.stdout)
    if not functions:
        pytest.skip(f"tformer._C holds no sm_90 code (built for another arch?): {result.stderr.strip()[:200]}")
    for kernel in HOT_KERNELS:
        instantiations = {name: code for name, code in functions.items() if kernel in name}
        assert instantiations, f"{kernel} not found in tformer._C"
        for name, code in instantiations.items():
            missing = [op for op in ("LDG.E.128", "STG.E.128") if op not in code]
            assert not missing, f"{name} has no {missing}: its rows move in narrower accesses"
