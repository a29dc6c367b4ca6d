"""The sm_90a attention kernels (csrc/attention_sm90/) are Hopper code, proved without a GPU:
the built extension tformer._C is disassembled (``cuobjdump -sass``, ``-res-usage``) and each
instantiation of the forward and of the backward's key_grad_kernel and query_grad_kernel must
issue warpgroup MMA (HGMMA) and TMA loads (UTMALDG) inside loops, keep everything in registers
(no local memory, no spill loads or stores), and fit Hopper's 227 KiB of shared memory. Their
numerical tests are GPU tests (tests/test_cuda_attention_sm90.py)."""

import re
import subprocess
from pathlib import Path

import pytest

from tformer.build_info import load_record

from test_cuda_row_kernels_sass import _cuobjdump, _extension, sass_by_function

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "attention_sm9014forward_kernel"  # tformer::attention_sm90::forward_kernel<T, kD>
# (dtype, head dim) instantiations: csrc/attention_sm90/forward_sm90_hdim{64,128}.cu.
INSTANTIATIONS = {("6__half", 64), ("13__nv_bfloat16", 64), ("6__half", 128), ("13__nv_bfloat16", 128)}
HOPPER_SMEM_LIMIT = 227 * 1024
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def instructions(code: str) -> list[tuple[int, str]]:
    """(address, instruction text) of each SASS line of one function."""
    return [(int(address, 16), text) for address, text in _INSTRUCTION.findall(code)]


def in_loop(code: str, opcode: str) -> bool:
    """Whether a backward branch jumps over an ``opcode`` instruction (which then runs once per
    trip of that loop). ``BRA.U.ANY`` retry loops around a single instruction do not count."""
    listing = instructions(code)
    for address, text in listing:
        branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if branch is None or int(branch.group(1), 16) >= address:
            continue
        start = int(branch.group(1), 16)
        if any(start <= a < address and re.search(rf"\b{opcode}\b", t) for a, t in listing):
            return True
    return False


def test_loop_detection_reads_cuobjdump_layout():
    code = ("        /*0000*/                   MOV R1, c[0x0][0x28] ;\n"
            "        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], R24 ;\n"
            "        /*0020*/              @!P0 BRA 0x10 ;\n"
            "        /*0030*/                   UTMALDG.4D [UR8], [UR16] ;\n"
            "        /*0040*/               @P0 BRA.U.ANY 0x30 ;\n"
            "        /*0050*/                   EXIT ;\n")
    assert in_loop(code, "HGMMA") and not in_loop(code, "UTMALDG")


def require_sm90a_code(unit: str) -> None:
    """Skip unless tformer._C holds sm_90a code compiled from csrc/attention_sm90/<unit>*.cu.
    cuobjdump 12.9 and later name those cubins ``.sm_90a``; 12.8 (the one Triton 3.6 bundles) says
    ``.sm_90``, so there the build record decides (setup.py compiles 9.0 as 9.0a)."""
    elves = subprocess.run([_cuobjdump(), "-lelf", str(_extension())], capture_output=True, text=True,
                           timeout=60).stdout
    cubins = re.findall(rf"{unit}\w*\.(sm_\d+a?)\.cubin", elves)
    record = load_record() or {}
    if "sm_90a" not in cubins and not ("sm_90" in cubins and "9.0" in record.get("arch_list", [])):
        pytest.skip(f"tformer._C has no sm_90a {unit} code (built without 9.0 in TORCH_CUDA_ARCH_LIST; "
                    f"its cubins: {sorted(set(cubins)) or 'none'})")


def mangled(dtype: str, head_dim: int) -> str:
    return f"_ZN7tformer14attention_sm9014forward_kernelI{dtype}Li{head_dim}EEEvNS0_13ForwardParamsE"


@pytest.fixture(scope="module")
def sm90a_kernels() -> dict[str, str]:
    require_sm90a_code("forward_sm90_hdim")
    # Only these functions: disassembling the whole extension takes ~20 s on 2 cores.
    names = ",".join(mangled(dtype, dim) for dtype, dim in sorted(INSTANTIATIONS))
    result = subprocess.run([_cuobjdump(), "-sass", "-fun", names, str(_extension())], capture_output=True,
                            text=True, timeout=300)
    return {name: code for name, code in sass_by_function(result.stdout).items() if KERNEL in name}


def test_every_instantiation_is_built(sm90a_kernels):
    found = {(dtype, int(dim)) for name in sm90a_kernels
             for dtype, dim in re.findall(r"forward_kernelI(6__half|13__nv_bfloat16)Li(\d+)E", name)}
    assert found == INSTANTIATIONS


def test_hot_loops_use_wgmma_and_tma(sm90a_kernels):
    for name, code in sm90a_kernels.items():
        head_dim = int(re.search(r"Li(\d+)E", name).group(1))
        # S = Q K^T: head_dim / 16 wgmmas; O += P V: 128 keys / 16; each once in the loop and
        # once outside it (the first block's S before it, the last block's P V after it).
        assert code.count("HGMMA.") == 2 * (head_dim // 16 + 8), f"{name}: HGMMA count"
        assert "tnspB" in code, f"{name}: P V must read V MN-major (transposed B)"
        assert in_loop(code, "HGMMA"), f"{name}: no HGMMA inside a loop"
        assert in_loop(code, "UTMALDG"), f"{name}: no TMA load (UTMALDG) inside a loop"
        assert "USETMAXREG" in code, f"{name}: no register reallocation between producer and consumers"
        # One full wait per GEMM phase (first S, loop, last P V); ptxas inserts one after every
        # HGMMA when it has to serialize them (C7520), which would undo the overlap.
        assert code.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") <= 3, f"{name}: wgmma serialized"
        assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in code, f"{name}: S is not awaited apart from P V (no overlap)"
        assert re.search(r"BAR\.ARV", code), f"{name}: no pingpong hand-over between the consumers"
        assert not re.search(r"\b(STL|LDL)\b", code), f"{name}: local memory (spills) in the kernel"


def test_no_spills_and_shared_memory_within_hopper_limit(sm90a_kernels):
    names = ",".join(sm90a_kernels)
    result = subprocess.run([_cuobjdump(), "-res-usage", "-fun", names, str(_extension())], capture_output=True,
                            text=True, timeout=300)
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", result.stdout))
    header = (ROOT / "csrc" / "attention_sm90" / "forward_sm90.cuh").read_text()
    stages = int(re.search(r"constexpr int kStages = (\d+);", header).group(1))
    rows = int(re.search(r"constexpr int kBoxRows = (\d+);",
                         (ROOT / "csrc" / "attention_sm90" / "attention_sm90.h").read_text()).group(1))
    for name in sm90a_kernels:
        fields = dict(item.split(":", 1) for item in usage[name].split())
        assert fields["LOCAL"] == "0" and fields["STACK"] == "0", f"{name}: {usage[name]}"
        head_dim = int(re.search(r"Li(\d+)E", name).group(1))
        # Shape<kD>::kSmemBytes: Q + stages x (K + V) tiles of rows x head_dim 16-bit elements,
        # 64 bytes of barriers and 1 KiB to align the base; plus the static shared memory.
        dynamic = (1 + 2 * stages) * rows * head_dim * 2 + 64 + 1024
        assert dynamic + int(fields["SHARED"]) <= HOPPER_SMEM_LIMIT, f"{name}: {dynamic} B dynamic smem"


# The backward (backward_sm90.cuh): tformer::attention_sm90::{key,query}_grad_kernel<T, kD>.
BACKWARD = {"key_grad_kernel": "15key_grad_kernel", "query_grad_kernel": "17query_grad_kernel"}


def grad_step(head_dim: int) -> int:
    """backward_sm90.cuh's grad_step: the rows a pipeline step streams at this head dim."""
    header = (ROOT / "csrc" / "attention_sm90" / "backward_sm90.cuh").read_text()
    limit, small, large = map(int, re.search(r"grad_step\(int head_dim\) \{ return head_dim <= (\d+) \? (\d+) : (\d+);",
                                             header).groups())
    return small if head_dim <= limit else large


@pytest.fixture(scope="module")
def sm90a_backward_kernels() -> dict[str, str]:
    require_sm90a_code("backward_sm90_hdim")
    names = ",".join(f"_ZN7tformer14attention_sm90{kernel}I{dtype}Li{dim}EEEvNS0_14BackwardParamsE"
                     for kernel in BACKWARD.values() for dtype, dim in sorted(INSTANTIATIONS))
    result = subprocess.run([_cuobjdump(), "-sass", "-fun", names, str(_extension())], capture_output=True,
                            text=True, timeout=300)
    return {name: code for name, code in sass_by_function(result.stdout).items() if "_grad_kernel" in name}


def test_every_backward_instantiation_is_built(sm90a_backward_kernels):
    found = {(kernel, dtype, int(dim)) for name in sm90a_backward_kernels
             for kernel, dtype, dim in re.findall(r"(key_grad_kernel|query_grad_kernel)I(6__half|13__nv_bfloat16)Li(\d+)E",
                                                  name)}
    assert found == {(kernel, dtype, dim) for kernel in BACKWARD for dtype, dim in INSTANTIATIONS}


def test_backward_hot_loops_use_wgmma_and_tma(sm90a_backward_kernels):
    for name, code in sm90a_backward_kernels.items():
        head_dim = int(re.search(r"Li(\d+)E", name).group(1))
        step = grad_step(head_dim)
        # Two products over the head dim (S and dP, or their transposes), head_dim / 16 wgmmas
        # each; then dV and dK (two), or dQ (one), over the step's rows, step / 16 each.
        register_products = 2 if "key_grad" in name else 1
        assert code.count("HGMMA.") == 2 * head_dim // 16 + register_products * step // 16, f"{name}: HGMMA count"
        assert "tnspB" in code, f"{name}: the register-A products must read their B tile MN-major"
        assert in_loop(code, "HGMMA"), f"{name}: no HGMMA inside a loop"
        assert in_loop(code, "UTMALDG"), f"{name}: no TMA load (UTMALDG) inside a loop"
        assert "USETMAXREG" in code, f"{name}: no register reallocation between producer and consumers"
        # One full wait per product phase; ptxas waits after every HGMMA when it serializes them.
        assert code.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") <= 2, f"{name}: wgmma serialized"
        assert not re.search(r"\b(STL|LDL)\b", code), f"{name}: local memory (spills) in the kernel"


def test_backward_has_no_spills_and_fits_hopper_shared_memory(sm90a_backward_kernels):
    result = subprocess.run([_cuobjdump(), "-res-usage", "-fun", ",".join(sm90a_backward_kernels), str(_extension())],
                            capture_output=True, text=True, timeout=300)
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", result.stdout))
    header = (ROOT / "csrc" / "attention_sm90" / "backward_sm90.cuh").read_text()
    block, stages = (int(re.search(rf"constexpr int {name} = (\d+);", header).group(1))
                     for name in ("kGradBlock", "kGradStages"))
    for name in sm90a_backward_kernels:
        fields = dict(item.split(":", 1) for item in usage[name].split())
        assert fields["LOCAL"] == "0" and fields["STACK"] == "0", f"{name}: {usage[name]}"
        head_dim = int(re.search(r"Li(\d+)E", name).group(1))
        step = grad_step(head_dim)
        # GradShape<kD>::kSmemBytes: two block tiles, stages x (two step tiles + lse and delta),
        # barriers, 1 KiB of alignment.
        dynamic = 2 * block * head_dim * 2 + stages * (2 * step * head_dim * 2 + 2 * step * 4) + 64 + 1024
        assert dynamic + int(fields["SHARED"]) <= HOPPER_SMEM_LIMIT, f"{name}: {dynamic} B dynamic smem"
