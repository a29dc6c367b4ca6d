"""The sm_90a attention kernels (csrc/attention_sm90/) are Hopper code, proved without a GPU:
the built extension tformer._C is disassembled (``cuobjdump -sass``, ``-res-usage``) and each
instantiation of the forward and of the backward's key_grad_kernel and query_grad_kernel must
issue warpgroup MMA (HGMMA) and TMA loads (UTMALDG) inside loops, keep everything in registers
(no local memory, no spill loads or stores), and fit Hopper's 227 KiB of shared memory. Guards
for hazards that would hang or corrupt silently: REG at entry equal to the setmaxnreg budget's
168, no ptxas-injected WARPGROUP.ARRIVE, no register traffic inside an in-flight wgmma's window,
named-barrier ids as immediates. Their numerical tests are GPU tests
(tests/test_cuda_attention_sm90.py); the CPU emulators of the same contracts are
tests/test_sm90_contracts.py."""

import re
import subprocess
from pathlib import Path

import pytest

from tformer.build_info import load_record

from sm90_layout_model import forward_q_buffers, read_constants
from test_cuda_row_kernels_sass import _cuobjdump, _extension, sass_by_function

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "attention_sm9014forward_kernel"  # tformer::attention_sm90::forward_kernel<T, kD, kBanded>
# (dtype, head dim) instantiations: csrc/attention_sm90/forward_sm90_hdim{64,128}.cu; each kernel
# also has a banded variant (kBanded: sliding windows, bottom-right alignment, soft-capping).
INSTANTIATIONS = {("6__half", 64), ("13__nv_bfloat16", 64), ("6__half", 128), ("13__nv_bfloat16", 128)}
BANDED = (False, True)
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


def mangled(dtype: str, head_dim: int, banded: bool) -> str:
    return f"_ZN7tformer14attention_sm9014forward_kernelI{dtype}Li{head_dim}ELb{int(banded)}EEEvNS0_13ForwardParamsE"


def is_banded(name: str) -> bool:
    """Whether a mangled sm_90a kernel is a banded variant (its last template argument)."""
    return re.search(r"Lb([01])EEEvNS0_", name).group(1) == "1"


@pytest.fixture(scope="module")
def sm90a_kernels() -> dict[str, str]:
    require_sm90a_code("forward_sm90_hdim")
    # Only these functions: disassembling the whole extension takes ~20 s on 2 cores.
    names = ",".join(mangled(dtype, dim, banded) for dtype, dim in sorted(INSTANTIATIONS) for banded in BANDED)
    result = subprocess.run([_cuobjdump(), "-sass", "-fun", names, str(_extension())], capture_output=True,
                            text=True, timeout=300)
    return {name: code for name, code in sass_by_function(result.stdout).items() if KERNEL in name}


def test_every_instantiation_is_built(sm90a_kernels):
    found = {(dtype, int(dim), banded == "1") for name in sm90a_kernels
             for dtype, dim, banded in re.findall(r"forward_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELb([01])E", name)}
    assert found == {(dtype, dim, banded) for dtype, dim in INSTANTIATIONS for banded in BANDED}


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
        # The epilogue (store_output): 64 rows x head_dim a consumer, 16 bytes a thread a store.
        assert code.count("STG.E.128") == 64 * head_dim * 2 // 16 // 128, f"{name}: O not stored in 16-byte chunks"


def test_no_spills_and_shared_memory_within_hopper_limit(sm90a_kernels):
    names = ",".join(sm90a_kernels)
    result = subprocess.run([_cuobjdump(), "-res-usage", "-fun", names, str(_extension())], capture_output=True,
                            text=True, timeout=300)
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", result.stdout))
    constants = read_constants()  # csrc/attention_sm90/contracts.h
    stages, rows = constants["kForwardStages"], constants["kBoxRows"]
    for name in sm90a_kernels:
        fields = dict(item.split(":", 1) for item in usage[name].split())
        assert fields["LOCAL"] == "0" and fields["STACK"] == "0", f"{name}: {usage[name]}"
        head_dim = int(re.search(r"Li(\d+)E", name).group(1))
        # Shape<kD>::kSmemBytes: Q buffers + stages x (K + V) tiles of rows x head_dim 16-bit
        # elements, the barriers and 1 KiB to align the base; plus the static shared memory.
        q_buffers = forward_q_buffers(head_dim, constants)
        dynamic = (q_buffers + 2 * stages) * rows * head_dim * 2 + constants["kForwardBarrierBytes"] + 1024
        assert dynamic + int(fields["SHARED"]) <= HOPPER_SMEM_LIMIT, f"{name}: {dynamic} B dynamic smem"


# The backward (backward_sm90.cuh): tformer::attention_sm90::key_grad_kernel<T, kD, kAtomicDq,
# kBanded> (two-pass dK/dV, or the one pass that also adds dQ by atomics) and
# query_grad_kernel<T, kD, kBanded>; the mangled template arguments after the head dim.
BACKWARD = {"key_grad_kernel": ("15key_grad_kernel", "ELb0E"), "key_grad_kernel_dq": ("15key_grad_kernel", "ELb1E"),
            "query_grad_kernel": ("17query_grad_kernel", "E")}


def backward_kind(name: str) -> str:
    """The BACKWARD key of a mangled backward kernel name."""
    if "query_grad_kernel" in name:
        return "query_grad_kernel"
    atomic_dq = re.search(r"key_grad_kernelI\w+?Li\d+ELb([01])ELb[01]E", name).group(1)
    return "key_grad_kernel_dq" if atomic_dq == "1" else "key_grad_kernel"


def test_kernel_names_are_read_by_their_template_arguments():
    key = "_ZN7tformer14attention_sm9015key_grad_kernelI6__halfLi64ELb{}ELb{}EEEvNS0_14BackwardParamsE"
    assert [backward_kind(key.format(dq, b)) for dq in "01" for b in "01"] == \
        ["key_grad_kernel", "key_grad_kernel", "key_grad_kernel_dq", "key_grad_kernel_dq"]
    assert [is_banded(key.format(dq, b)) for dq in "01" for b in "01"] == [False, True, False, True]
    assert is_banded(mangled("6__half", 128, True)) and not is_banded(mangled("6__half", 128, False))


def grad_step(head_dim: int) -> int:
    """backward_sm90.cuh's grad_step: the rows a pipeline step streams at this head dim."""
    c = read_constants()
    return c["kGradStepSmall"] if head_dim <= c["kGradStepSmallHeadDim"] else c["kGradStepLarge"]


@pytest.fixture(scope="module")
def sm90a_backward_kernels() -> dict[str, str]:
    require_sm90a_code("backward_sm90_hdim")
    names = ",".join(f"_ZN7tformer14attention_sm90{kernel}I{dtype}Li{dim}{flag}Lb{int(banded)}EEEvNS0_14BackwardParamsE"
                     for kernel, flag in BACKWARD.values() for dtype, dim in sorted(INSTANTIATIONS)
                     for banded in BANDED)
    result = subprocess.run([_cuobjdump(), "-sass", "-fun", names, str(_extension())], capture_output=True,
                            text=True, timeout=300)
    return {name: code for name, code in sass_by_function(result.stdout).items() if "_grad_kernel" in name}


def test_every_backward_instantiation_is_built(sm90a_backward_kernels):
    found = {(backward_kind(name), dtype, int(dim), is_banded(name)) for name in sm90a_backward_kernels
             for dtype, dim in re.findall(r"_grad_kernelI(6__half|13__nv_bfloat16)Li(\d+)E", name)}
    assert found == {(kernel, dtype, dim, banded) for kernel in BACKWARD for dtype, dim in INSTANTIATIONS
                     for banded in BANDED}


def test_backward_hot_loops_use_wgmma_and_tma(sm90a_backward_kernels):
    for name, code in sm90a_backward_kernels.items():
        head_dim = int(re.search(r"Li(\d+)E", name).group(1))
        step = grad_step(head_dim)
        # Two products over the head dim (S and dP, or their transposes), head_dim / 16 wgmmas
        # each; then dV and dK (two), or dQ (one), over the step's rows, step / 16 each.
        # The one pass adds dQ = dS K: step / 64 products of 64 keys / 16 wgmmas (step / 16).
        kind = backward_kind(name)
        register_products = {"key_grad_kernel": 2, "key_grad_kernel_dq": 3, "query_grad_kernel": 1}[kind]
        assert code.count("HGMMA.") == 2 * head_dim // 16 + register_products * step // 16, f"{name}: HGMMA count"
        assert "tnspB" in code, f"{name}: the register-A products must read their B tile MN-major"
        assert in_loop(code, "HGMMA"), f"{name}: no HGMMA inside a loop"
        assert in_loop(code, "UTMALDG"), f"{name}: no TMA load (UTMALDG) inside a loop"
        assert "USETMAXREG" in code, f"{name}: no register reallocation between producer and consumers"
        # One full wait per product phase; ptxas waits after every HGMMA when it serializes them.
        phases = 3 if kind == "key_grad_kernel_dq" else 2
        assert code.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") <= phases, f"{name}: wgmma serialized"
        assert not re.search(r"\b(STL|LDL)\b", code), f"{name}: local memory (spills) in the kernel"
        reductions = re.findall(r"\bRED(?:G)?\.E\.ADD\.F32x2\S*", code)
        if kind == "key_grad_kernel_dq":
            # dQ = dS^T^T K: both operands MN-major; every thread adds its (step / 64) x (head_dim / 8) x 2
            # float pairs with one vector reduction each; the staged dS^T is fenced for wgmma.
            assert "tnspA.tnspB" in code, f"{name}: dQ must read the staged dS^T and K MN-major"
            assert len(reductions) == step // 64 * head_dim // 8 * 2, f"{name}: {len(reductions)} RED.E.ADD.F32x2"
            # (the two passes have one FENCE.VIEW.ASYNC.S already, after the barriers' init)
            assert code.count("FENCE.VIEW.ASYNC.S") >= 2, f"{name}: dS^T stores not fenced for the async proxy"
        else:
            assert not reductions and "ATOM" not in code, f"{name}: the deterministic passes use no atomics"


def test_backward_has_no_spills_and_fits_hopper_shared_memory(sm90a_backward_kernels):
    result = subprocess.run([_cuobjdump(), "-res-usage", "-fun", ",".join(sm90a_backward_kernels), str(_extension())],
                            capture_output=True, text=True, timeout=300)
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", result.stdout))
    constants = read_constants()
    block, stages = constants["kGradBlock"], constants["kGradStages"]
    for name in sm90a_backward_kernels:
        fields = dict(item.split(":", 1) for item in usage[name].split())
        assert fields["LOCAL"] == "0" and fields["STACK"] == "0", f"{name}: {usage[name]}"
        head_dim = int(re.search(r"Li(\d+)E", name).group(1))
        step = grad_step(head_dim)
        # GradShape<kD>::kSmemBytes: two block tiles, stages x (two step tiles + lse and delta),
        # barriers, 1 KiB of alignment.
        dynamic = 2 * block * head_dim * 2 + stages * (2 * step * head_dim * 2 + 2 * step * 4) + 64 + 1024
        if backward_kind(name) == "key_grad_kernel_dq":  # + each consumer's dS^T staging buffer
            dynamic += constants["kConsumers"] * step // 64 * constants["kGradStagePanelBytes"]
        assert dynamic + int(fields["SHARED"]) <= HOPPER_SMEM_LIMIT, f"{name}: {dynamic} B dynamic smem"


# ---- guards for silent hazards (issue: a hang or a wrong value instead of an error) -------------
ALL_KERNELS = ("forward_kernel", "key_grad_kernel_dq", "key_grad_kernel", "query_grad_kernel")
# wgmma_fence() calls each kernel executes in its source (forward_sm90.cuh: the first S, the
# loop, the last P V; backward_sm90.cuh: scores_and_output_grads and the register-A products).
# Every WARPGROUP.ARRIVE beyond these is one ptxas injected to repair a register move into an
# in-flight wgmma (C7519): it works, but means the kernel's register fences are not what run.
FENCES = {"forward_kernel": 3, "key_grad_kernel": 2, "key_grad_kernel_dq": 3, "query_grad_kernel": 2}
_NO_DESTINATION = ("ST", "RED", "BAR", "BRA", "EXIT", "WARPGROUP", "SYNCS", "UTMA", "NOP", "CALL", "RET", "MEMBAR",
                   "FENCE", "DEPBAR", "ERRBAR", "CCTL", "UBLKCP", "WARPSYNC", "BSSY", "BSYNC", "YIELD", "ELECT",
                   "UCGABAR", "JMP", "PREEXIT", "USETMAXREG", "HGMMA")


def setmaxnreg_budget(name: str, constants: dict[str, int]) -> tuple[int, int]:
    """(producer, consumer) registers a kernel's setmaxnreg asks for: the banded backward kernels
    take kBanded{Producer,Consumer}Registers (backward_sm90.cuh), every other one the defaults."""
    if is_banded(name) and "_grad_kernel" in name:
        return constants["kBandedProducerRegisters"], constants["kBandedConsumerRegisters"]
    return constants["kProducerRegisters"], constants["kConsumerRegisters"]


def registers_at_entry_problem(usage: str, constants: dict[str, int],
                               budget: tuple[int, int] | None = None) -> str | None:
    """Why a setmaxnreg kernel with this `-res-usage` line would hang, or None. The block's pool
    is REG x threads; the consumers' setmaxnreg.inc spins until the pool holds what they claim
    (`budget`: the kernel's (producer, consumer) registers, by default contracts.h's)."""
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    producer, consumer = budget or (constants["kProducerRegisters"], constants["kConsumerRegisters"])
    claimed = (producer + constants["kConsumers"] * consumer) * constants["kWarpgroupThreads"]
    if registers != constants["kRegistersAtEntry"] or registers * constants["kThreads"] < claimed:
        return (f"REG:{registers} at entry, expected {constants['kRegistersAtEntry']}: the pool of "
                f"{registers * constants['kThreads']} registers is not the {claimed} setmaxnreg redistributes")
    return None


def wgmma_window_problems(code: str) -> list[str]:
    """Instructions that write a register of an in-flight wgmma (its accumulator or A fragment)
    or read its accumulator, between the HGMMA and the WARPGROUP.DEPBAR that retires its group
    (commit groups end at the HGMMA marked gsb0; DEPBAR.LE gsb0, n leaves the newest n in flight)."""
    groups, current, problems = [], None, []
    for address, text in instructions(code):
        match = re.match(r"(?:@!?U?P\w+\s+)?([A-Z][\w.]*)\s*(.*)", text)
        if not match:
            continue
        opcode, operands = match.groups()
        if opcode.startswith("HGMMA"):
            n = int(re.search(r"64x(\d+)x", opcode).group(1))
            fields = [f.strip() for f in operands.split(",")]
            current = current or (set(), set())
            current[0].update(range(int(fields[0][1:]), int(fields[0][1:]) + n // 2))
            if fields[1].startswith("R"):
                current[1].update(range(int(fields[1][1:]), int(fields[1][1:]) + 4))
            if "gsb0" in operands:
                groups, current = groups + [current], None
            continue
        depbar = re.match(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)", text)
        if depbar:
            keep = int(depbar.group(1), 16)
            groups = groups[len(groups) - keep:] if keep else []
            continue
        in_flight = groups + ([current] if current else [])
        if not in_flight:
            continue
        accumulators = set().union(*(g[0] for g in in_flight))
        fragments = set().union(*(g[1] for g in in_flight))
        destination = re.match(r"R(\d+)\b", operands)
        writes = set()
        if destination and not opcode.startswith(_NO_DESTINATION):
            width = 4 if ".128" in opcode else 2 if (".64" in opcode or "WIDE" in opcode) else 1
            writes = set(range(int(destination.group(1)), int(destination.group(1)) + width))
            operands = operands.split(",", 1)[1] if "," in operands else ""
        reads = {int(r) for r in re.findall(r"\bR(\d+)\b", operands)}
        if writes & (accumulators | fragments):
            problems.append(f"{address:#06x} {text}: writes a register of an in-flight wgmma")
        elif reads & accumulators:
            problems.append(f"{address:#06x} {text}: reads an accumulator of an in-flight wgmma")
    return problems


def test_register_budget_check_fails_on_too_few_registers():
    constants = read_constants()
    assert registers_at_entry_problem("REG:168 STACK:0 SHARED:1024 LOCAL:0", constants) is None
    assert "REG:128" in registers_at_entry_problem("REG:128 STACK:0 SHARED:1024 LOCAL:0", constants)
    banded = (constants["kBandedProducerRegisters"], constants["kBandedConsumerRegisters"])
    assert registers_at_entry_problem("REG:168 STACK:0 SHARED:1024 LOCAL:0", constants, banded) is None
    assert registers_at_entry_problem("REG:168 STACK:0 SHARED:1024 LOCAL:0", constants,
                                      (banded[0], banded[1] + 8)) is not None


def test_window_check_reads_in_flight_groups():
    code = ("        /*0000*/                   WARPGROUP.ARRIVE ;\n"
            "        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;\n"
            "        /*0020*/                   HGMMA.64x64x16.F32.BF16 R56, R120, gdesc[UR8], R56, gsb0 ;\n"
            "        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n"
            "        /*0040*/                   FMUL R30, R30, R2 ;\n"    # first group done: fine
            "        /*0050*/                   MOV R121, R3 ;\n"        # A fragment of the second: hazard
            "        /*0060*/                   FADD R4, R60, R5 ;\n"    # its accumulator: hazard
            "        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n"
            "        /*0080*/                   FADD R60, R60, R5 ;\n")  # done: fine
    problems = wgmma_window_problems(code)
    assert [p[:6] for p in problems] == ["0x0050", "0x0060"], problems


def test_fence_counts_follow_the_sources():
    forward = (ROOT / "csrc" / "attention_sm90" / "forward_sm90.cuh").read_text()
    backward = (ROOT / "csrc" / "attention_sm90" / "backward_sm90.cuh").read_text()
    assert forward.count("wgmma_fence();") == FENCES["forward_kernel"]
    # scores_and_output_grads (inlined into both passes), one in each pass, and the one pass's dQ
    assert backward.count("wgmma_fence();") == 4 and FENCES["key_grad_kernel"] == FENCES["query_grad_kernel"] == 2
    assert FENCES["key_grad_kernel_dq"] == 3


@pytest.fixture(scope="module")
def all_sm90a_kernels(sm90a_kernels, sm90a_backward_kernels) -> dict[str, str]:
    return {**sm90a_kernels, **sm90a_backward_kernels}


def test_every_setmaxnreg_kernel_has_the_registers_it_redistributes(all_sm90a_kernels):
    result = subprocess.run([_cuobjdump(), "-res-usage", "-fun", ",".join(all_sm90a_kernels), str(_extension())],
                            capture_output=True, text=True, timeout=300)
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", result.stdout))
    constants = read_constants()
    for name, code in all_sm90a_kernels.items():
        assert "USETMAXREG" in code, f"{name}: expected a setmaxnreg kernel"
        budget = setmaxnreg_budget(name, constants)
        assert registers_at_entry_problem(usage[name], constants, budget) is None, f"{name}: " + \
            registers_at_entry_problem(usage[name], constants, budget)
        # The consumers claim exactly their budget (USETMAXREG.TRY_ALLOC takes the count in hex).
        claims = {int(n, 16) for n in re.findall(r"USETMAXREG\.TRY_ALLOC\S*\s+\w+,\s*0x([0-9a-f]+)", code)}
        assert claims == {budget[1]}, f"{name}: setmaxnreg.inc {sorted(claims)}, expected {budget[1]}"


def test_no_injected_warpgroup_arrive(all_sm90a_kernels):
    for name, code in all_sm90a_kernels.items():
        kernel = "forward_kernel" if "forward_kernel" in name else backward_kind(name)
        assert code.count("WARPGROUP.ARRIVE") == FENCES[kernel], \
            f"{name}: {code.count('WARPGROUP.ARRIVE')} WARPGROUP.ARRIVE for {FENCES[kernel]} wgmma_fence() (ptxas C7519)"


def test_no_register_traffic_inside_wgmma_windows(all_sm90a_kernels):
    for name, code in all_sm90a_kernels.items():
        assert wgmma_window_problems(code) == [], name


def named_barriers_by_function(elf: str) -> dict[str, int]:
    """EIATTR_NUM_BARRIERS of each kernel in ``cuobjdump -elf`` output (its .nv.info.<name> section)."""
    found, current = {}, None
    lines = elf.splitlines()
    for i, line in enumerate(lines):
        section = re.match(r"^\.nv\.info\.(\S+)$", line.strip())
        if section:
            current = section.group(1)
        elif "EIATTR_NUM_BARRIERS" in line and current:
            value = next(re.search(r"Value:\s*(0x[0-9a-f]+)", l) for l in lines[i:i + 4] if "Value" in l)
            found[current] = int(value.group(1), 16)
    return found


def test_named_barrier_reader_reads_cuobjdump_elf():
    elf = (".nv.info._ZN7tformer14attention_sm9014forward_kernelI6__halfLi64EEEvNS0_13ForwardParamsE\n"
           "\t<0x5>\n\tAttribute:\tEIATTR_NUM_BARRIERS\n\tFormat:\tEIFMT_BVAL\n\tValue:\t0x10\n")
    assert named_barriers_by_function(elf) == {
        "_ZN7tformer14attention_sm9014forward_kernelI6__halfLi64EEEvNS0_13ForwardParamsE": 16}


def test_named_barrier_ids_are_immediates(all_sm90a_kernels):
    # A bar.sync / bar.arrive on an id in a register reserves all 16 named barriers; the forward
    # uses 0 (__syncthreads), the two pingpong ids and the two epilogue ids, the backward 0 only,
    # its one pass also the consumers' two staging ids.
    elf = subprocess.run([_cuobjdump(), "-elf", str(_extension())], capture_output=True, text=True, timeout=300).stdout
    barriers = named_barriers_by_function(elf)
    constants = read_constants()
    for name in all_sm90a_kernels:
        one_pass = "forward_kernel" not in name and backward_kind(name) == "key_grad_kernel_dq"
        allowed = constants["kEpilogueBarrier"] + constants["kConsumers"] if "forward_kernel" in name else \
            constants["kGradStageBarrier"] + constants["kConsumers"] if one_pass else 1
        assert barriers.get(name, 0) <= allowed, f"{name}: {barriers.get(name)} named barriers reserved"
