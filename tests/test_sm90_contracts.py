"""The sm_90a attention kernels' hardware contracts, proved on the CPU from the kernels' own
constants (csrc/attention_sm90/contracts.h): the TMA swizzle and wgmma descriptors
(tests/sm90_layout_model.py) and the barrier schedule (tests/sm90_schedule_model.py). Each
contract also has a deliberately broken variant that must fail, so none of these can pass
vacuously. The SASS-side guards (registers at entry, injected warpgroup.arrive) are in
tests/test_cuda_attention_sm90_sass.py."""

import pytest

import sm90_layout_model as layout

CONSTANTS = layout.read_constants()


# ---- descriptors, 128B swizzle, TMA ---------------------------------------------------------------
@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
@pytest.mark.parametrize("kernel", layout.KERNELS)
def test_every_wgmma_fetches_the_intended_element(kernel, head_dim):
    assert layout.check_kernel(kernel, head_dim) == []


@pytest.mark.parametrize("base", [1024, 7 * 1024])
def test_contract_holds_wherever_the_aligned_base_lands(base):
    # aligned_shared() puts the carve-up on some 1024-byte boundary; the swizzle uses absolute bits.
    assert layout.check_kernel("forward", 128, base=base) == []


@pytest.mark.parametrize("broken, what", [
    ({"kKMajorStrideBytes": 512}, "elements wrong"),     # wrong SBO of the K-major operands
    ({"kMNMajorStrideBytes": 2048}, "elements wrong"),   # wrong SBO of the MN-major V / dO / Q / K
    ({"kKStepBytes": 16}, "elements wrong"),             # k-step advancing half a step in the row
    ({"kKStepsPerPanel": 8}, "elements wrong"),          # running past the 128-byte row into the next
    ({"kMNStepBytes": 1024}, "elements wrong"),          # MN-major k-step of 8 rows, not 16
    ({"kConsumerRowBytes": 4096}, "elements wrong"),     # consumer 1 reading rows 32-95
    ({"kDescriptorSwizzle128B": 2}, "not 128B swizzle"),  # 64B swizzle mode in the descriptor
])
@pytest.mark.parametrize("kernel", layout.KERNELS)
def test_broken_layout_is_caught(kernel, broken, what):
    errors = layout.check_kernel(kernel, 128, broken)
    assert any(what in e for e in errors), errors[:3]


def test_misaligned_tile_is_caught():
    errors = layout.check_kernel("forward", 64, base=512)
    assert any("not on a 1024-byte swizzle atom" in e for e in errors)


def test_swizzle_permutes_chunks_within_each_row():
    import numpy as np

    rows = np.arange(8)[:, None] * 128 + np.arange(0, 128, 16)[None, :]
    swizzled = layout.swizzle_128b(rows)
    assert (swizzled // 128 == rows // 128).all()  # stays in its row
    assert all(sorted(swizzled[r] % 128) == list(range(0, 128, 16)) for r in range(8))  # a permutation
    assert (swizzled[0] == rows[0]).all() and swizzled[1, 0] == 128 + 16  # row 1: chunk 0 <-> 1


@pytest.mark.parametrize("n", [64, 128])
def test_accumulator_is_the_next_products_a_fragment(n):
    assert layout.check_pack_a(n) == []


def test_constants_parse_and_match_the_kernels_budget():
    c = CONSTANTS
    assert c["kThreads"] == 384 and c["kRegistersAtEntry"] == 168
    assert c["kProducerRegisters"] * 128 + c["kConsumerRegisters"] * 256 <= c["kRegistersAtEntry"] * c["kThreads"]
    assert c["kKStepsPerPanel"] * c["kKStepBytes"] == c["kSwizzleBytes"]


def test_constants_reader_rejects_what_it_cannot_evaluate(tmp_path):
    header = tmp_path / "bad.h"
    header.write_text("constexpr int kA = sizeof(int);\n")
    with pytest.raises(ValueError, match="kA"):
        layout.read_constants(header)
