"""The CUDA attention kernels (csrc/attention/, the sm80 mma.sync path) have the code shape
their speed depends on, read from the built extension tformer._C with ``cuobjdump -sass``
for sm_90: tensor-core MMAs (HMMA) in the hot loops, with a separate mask-free copy of each
step beside the masked one; cp.async tile loads (LDGSTS); ldmatrix (LDSM); the epilogue
staged through shared memory into 128-bit global stores (STG.E.128); and no local-memory
traffic (STL/LDL: register spills). Numbers are checked on a GPU by test_attention.py and
test_cuda_attention_extension.py; speed by bench/bench_attention.py."""

import re
import subprocess

import pytest

from test_cuda_row_kernels_sass import _cuobjdump, _extension, sass_by_function

# Block shapes per head-dim bucket (csrc/attention/block_shapes.h), the ones the counts below
# follow. forward: (16-row tiles per warp, keys per step); key_grad: (query rows per step,
# dK/dV columns per block); query_grad: keys per step.
FORWARD = {32: (2, 64), 64: (2, 64), 96: (2, 32), 128: (2, 32), 256: (1, 32)}
KEY_GRAD = {32: (64, 32), 64: (64, 64), 96: (32, 96), 128: (32, 128), 256: (32, 128)}
QUERY_GRAD = {32: 64, 64: 64, 96: 32, 128: 32, 256: 32}
ATTENTION_KERNELS = ("forward_kernel", "key_grad_kernel", "query_grad_kernel", "group_sum_kernel", "delta_kernel")


def mma_count(shape_m: int, shape_n: int, shape_k: int) -> int:
    """mma.m16n8k16 instructions of one warp's (M x K) * (K x N) product."""
    return (shape_m // 16) * (shape_n // 8) * (shape_k // 16)


def step_mmas(kernel: str, head_dim: int) -> int:
    """HMMAs of one step body of a warp (one key block, or one query block for key_grad)."""
    if kernel == "forward_kernel":
        tiles, keys = FORWARD[head_dim]
        return mma_count(16 * tiles, keys, head_dim) + mma_count(16 * tiles, head_dim, keys)  # S = Q K^T, O += P V
    if kernel == "key_grad_kernel":
        rows, columns = KEY_GRAD[head_dim]
        # P^T = K Q^T and dP^T = V dO^T over all head_dim; dV += P^T dO and dK += dS^T Q over the block's columns.
        return 2 * mma_count(16, rows, head_dim) + 2 * mma_count(16, columns, rows)
    keys = QUERY_GRAD[head_dim]
    return 2 * mma_count(16, keys, head_dim) + mma_count(16, head_dim, keys)  # S, dP; dQ += dS K


def forward_step_ldmatrix(head_dim: int) -> int:
    """ldmatrix.x4 (LDSM) of one forward step of a warp: its row tiles' Q fragments, and the K
    and V fragments, each loaded once and shared by every row tile (the point of 32 rows a warp)."""
    tiles, keys = FORWARD[head_dim]
    return tiles * (head_dim // 16) + 2 * (keys // 16) * (head_dim // 16)


def head_dim_of(name: str) -> int:
    """The head-dim bucket of a mangled instantiation, e.g. ...forward_kernelI6__halfLi128EE...."""
    return int(re.search(r"Li(\d+)E", name).group(1))


def opcodes(code: str, prefix: str) -> list[str]:
    """Instructions of a SASS listing whose opcode starts with `prefix` (predicates skipped)."""
    return re.findall(rf"/\*[0-9a-f]{{4,}}\*/\s+(?:@!?U?P\w+\s+)?({re.escape(prefix)}[\w.]*)", code)


@pytest.fixture(scope="module")
def attention_sass() -> dict[str, str]:
    result = subprocess.run([_cuobjdump(), "-sass", "-arch", "sm_90", str(_extension())], capture_output=True,
                            text=True, timeout=600)
    functions = {name: code for name, code in sass_by_function(result.stdout).items()
                 if "attention" in name and any(kernel in name for kernel in ATTENTION_KERNELS)}
    if not functions:
        pytest.skip(f"tformer._C holds no sm_90 attention code (built for another arch?): {result.stderr.strip()[:200]}")
    return functions


def instantiations(functions: dict[str, str], kernel: str) -> dict[str, str]:
    """The sm_80 path's instantiations of ``kernel`` (the sm_90a path's kernels, in namespace
    ``attention_sm90``, are checked by test_cuda_attention_sm90_sass.py)."""
    found = {name: code for name, code in functions.items() if kernel in name and "attention_sm90" not in name}
    assert found, f"{kernel} not found in tformer._C"
    return found


def test_opcode_reader_skips_addresses_and_predicates():
    listing = ("        /*0100*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n"
               "        /*0110*/              @!P0 STG.E.128 desc[UR4][R2.64], R8 ;\n"
               "        /*0120*/               @P1 LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;\n")
    assert opcodes(listing, "HMMA") == ["HMMA.16816.F32.BF16"]
    assert opcodes(listing, "STG") == ["STG.E.128"]
    assert opcodes(listing, "LDGSTS") == ["LDGSTS.E.BYPASS.128"]


def test_mma_counts_follow_the_block_shapes():
    assert mma_count(32, 64, 64) == 2 * 8 * 4
    assert step_mmas("forward_kernel", 64) == 2 * mma_count(32, 64, 64)
    assert step_mmas("query_grad_kernel", 128) == 2 * mma_count(16, 32, 128) + mma_count(16, 128, 32)
    # hd 128, 32 rows a warp and 32 keys a step: Q 2 x 8, K 2 x 8, V 8 x 2 (64 rows a warp over
    # 64 keys would be 8 + 32 + 32).
    assert forward_step_ldmatrix(128) == 48


def test_no_local_memory_in_attention_kernels(attention_sass):
    for name, code in attention_sass.items():
        spills = opcodes(code, "STL") + opcodes(code, "LDL")
        assert not spills, f"{name} spills registers to local memory: {spills[:4]}"


@pytest.mark.parametrize("kernel", ["forward_kernel", "key_grad_kernel", "query_grad_kernel"])
def test_hot_loops_are_tensor_core_mma_with_cp_async_and_ldmatrix(attention_sass, kernel):
    for name, code in instantiations(attention_sass, kernel).items():
        hmma = opcodes(code, "HMMA")
        assert all(op.startswith("HMMA.16816.F32") for op in hmma), f"{name}: {sorted(set(hmma))}"
        # Two copies of the step: the masked one for boundary blocks and the mask-free one.
        expected = 2 * step_mmas(kernel, head_dim_of(name))
        assert len(hmma) == expected, f"{name}: {len(hmma)} HMMA, expected {expected} (two step bodies)"
        assert opcodes(code, "LDGSTS"), f"{name} has no cp.async (LDGSTS) tile loads"
        ldmatrix = opcodes(code, "LDSM")
        assert ldmatrix, f"{name} has no ldmatrix (LDSM)"
        if kernel == "forward_kernel":  # the block shape: row tiles share each K and V fragment
            expected = 2 * forward_step_ldmatrix(head_dim_of(name))
            assert len(ldmatrix) == expected, f"{name}: {len(ldmatrix)} LDSM, expected {expected} (two step bodies)"


def test_epilogues_store_128_bit_vectors(attention_sass):
    for kernel in ("forward_kernel", "key_grad_kernel", "query_grad_kernel", "group_sum_kernel"):
        for name, code in instantiations(attention_sass, kernel).items():
            stores = opcodes(code, "STG")
            if re.search(r"Li\d+ELb1E", name):  # key_grad_kernel<T, kD, kExpanded = true, kWide>: float32
                # partials, 8-byte pairs from the accumulators
                assert "STG.E.64" in stores, f"{name}: {sorted(set(stores))}"
                continue
            # Outputs leave in 16-byte vectors; the forward's lse (4 bytes a row) is the only narrower store.
            allowed = ("STG.E.128", "STG.E") if kernel == "forward_kernel" else ("STG.E.128",)
            narrow = [op for op in stores if op not in allowed]
            assert "STG.E.128" in stores and not narrow, f"{name}: {sorted(set(stores))}"


def test_head_dim_128_has_both_key_grad_block_shapes(attention_sass):
    # key_grad_kernel<T, 128, kExpanded, kWide>: the 8-warp (128-key) shape for GPUs with >= 102.5 KiB
    # of shared memory a block and the 4-warp one for the rest, grouped and expanded, fp16 and bf16.
    names = instantiations(attention_sass, "key_grad_kernel")
    for dtype in ("6__half", "13__nv_bfloat16"):
        for expanded in "01":
            for wide in "01":
                assert any(f"I{dtype}Li128ELb{expanded}ELb{wide}E" in name for name in names), (dtype, expanded, wide)
