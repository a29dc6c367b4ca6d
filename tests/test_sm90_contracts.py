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


@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
def test_broken_dq_staging_is_caught(head_dim):
    # One pass: dS^T stored without the swizzle (wgmma reads the swizzled address), or the dQ
    # product reading the staged dS^T as K-major (imm-trans-a = 0).
    unswizzled = layout.check_kernel("key_grad_dq", head_dim, stage_swizzled=False)
    assert any("elements wrong" in e for e in unswizzled) and any("bank conflicts" in e for e in unswizzled)
    k_major = layout.check_kernel("key_grad_dq", head_dim, dq_a_transposed=False)
    assert any("dS K" in e and "A:" in e and "elements wrong" in e for e in k_major), k_major[:3]


def test_staging_model_mirrors_the_kernel_source():
    # stage_offset (the model) is the kernel's stage_transposed expression and issue_ss_mn's
    # descriptors, term by term: a change to either side must show up here.
    source = (layout.ROOT / "csrc" / "attention_sm90" / "backward_sm90.cuh").read_text()
    products = (layout.ROOT / "csrc" / "attention_sm90" / "products.cuh").read_text()
    squashed = " ".join(source.split())
    assert ("query / kPanelColumns * kGradStagePanelBytes + key * kSwizzleBytes + "
            "((chunk ^ (key % 8)) * 16) + (column % 8) * kElementBytes") in squashed
    assert "accumulator_row(lane, warp, i % 2), query = accumulator_column(lane, 2 * t + i / 2, 0)" in squashed
    assert "smem_u32(ds_stage) + part * kGradStagePanelBytes, kGradStagePanelBytes, k_address, kBlockPanelBytes" \
        in squashed
    squashed = " ".join(products.split())
    assert "smem_descriptor(a_address + t * kMNStepBytes, a_panel_bytes, kMNMajorStrideBytes)" in squashed
    assert "smem_descriptor(b_address + t * kMNStepBytes, b_panel_bytes, kMNMajorStrideBytes)" in squashed
    assert '"1, 1, 1, 1" if transposed' in (layout.ROOT / "csrc" / "attention_sm90" / "gen_wgmma.py").read_text()


def test_overlapping_dq_staging_panels_are_caught():
    # hd 64 stages 128 queries in two 64-query panels: a panel offset of half a panel overlaps them.
    errors = layout.check_kernel("key_grad_dq", 64, {"kGradStagePanelBytes": 4096})
    assert any("written twice" in e for e in errors) and any("elements wrong" in e for e in errors)


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
    # The banded backward's split (FA3's 24 / 240) fills the same pool.
    assert c["kBandedProducerRegisters"] * 128 + c["kBandedConsumerRegisters"] * 256 <= \
        c["kRegistersAtEntry"] * c["kThreads"]
    assert c["kKStepsPerPanel"] * c["kKStepBytes"] == c["kSwizzleBytes"]


def test_constants_reader_rejects_what_it_cannot_evaluate(tmp_path):
    header = tmp_path / "bad.h"
    header.write_text("constexpr int kA = sizeof(int);\n")
    with pytest.raises(ValueError, match="kA"):
        layout.read_constants(header)


# ---- barrier schedule ------------------------------------------------------------------------------
import re  # noqa: E402
from dataclasses import replace  # noqa: E402

import sm90_grid_model as grid  # noqa: E402
import sm90_schedule_model as schedule  # noqa: E402

SEEDS = range(6)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 32])
@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
@pytest.mark.parametrize("kernel", layout.KERNELS)
def test_schedule_never_hangs_over_arrives_or_overwrites(kernel, head_dim, steps):
    for seed in SEEDS:  # ScheduleError on any broken contract
        schedule.simulate(kernel, head_dim, steps=steps, seed=seed)


def test_forward_keeps_the_tensor_cores_busy():
    low, _ = schedule.busy_range("forward", 128)
    assert low >= 0.85, f"forward hd 128: tensor cores busy {low:.1%} at the stated latencies"


def test_todays_forward_schedule_fails_the_busy_bar():
    # main at 99c1e85: one empty barrier a slot for K and V, 2 stages, K waited for inside the
    # turn. The bar above must tell it from the fixed schedule.
    two_stages = {**CONSTANTS, "kForwardStages": 2}
    before_fix_2 = schedule.Latencies(softmax_cycles=750)
    low, mean = schedule.busy_range("forward", 128, variant=schedule.TODAY, constants=two_stages, lat=before_fix_2)
    assert mean < 0.85, f"today's schedule modelled at {mean:.1%}"


@pytest.mark.parametrize("broken, message", [
    (dict(wrong_parity=True), "before its TMA lands"),
    (dict(release_k_early=True), "reads it until"),
    (dict(double_release=True), "over-arrival"),
    (dict(skip_finish=True), "left half-arrived"),
    (dict(skip_first_grant=True), "hang"),
])
def test_broken_forward_schedule_is_caught(broken, message):
    with pytest.raises(schedule.ScheduleError, match=message):
        schedule.simulate("forward", 128, variant=replace(schedule.FIXED, **broken))


@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
def test_one_pass_backward_beats_two_passes_in_the_model(head_dim):
    # Time in units of one product at the full tensor-core rate, 5 products against 4 + 3.
    two = 4 / schedule.busy_range("key_grad", head_dim, seeds=3)[1] + \
        3 / schedule.busy_range("query_grad", head_dim, seeds=3)[1]
    one = 5 / schedule.busy_range("key_grad_dq", head_dim, seeds=3)[1]
    assert one < two * 0.9, f"hd {head_dim}: one pass {one:.2f} vs two passes {two:.2f}"


@pytest.mark.parametrize("overlap_dq", [False, True])
@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
def test_one_pass_variants_are_sound(head_dim, overlap_dq):
    for seed in SEEDS:
        schedule.simulate("key_grad_dq", head_dim, steps=5, seed=seed, overlap_dq=overlap_dq)


@pytest.mark.parametrize("kernel", ["key_grad", "query_grad", "key_grad_dq"])
@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
def test_backward_slot_released_while_read_is_caught(kernel, head_dim):
    with pytest.raises(schedule.ScheduleError, match="reads it until"):
        schedule.simulate(kernel, head_dim, release_early=True)


@pytest.mark.parametrize("kernel", layout.KERNELS)
@pytest.mark.parametrize("registers", [128, 160])
def test_too_few_registers_at_entry_hang(kernel, registers):
    with pytest.raises(schedule.ScheduleError, match=r"hang: .*setmaxnreg"):
        schedule.simulate(kernel, 128, registers_at_entry=registers)


@pytest.mark.parametrize("kernel", layout.KERNELS)
def test_boxes_short_of_the_announced_bytes_hang(kernel):
    # 32-column boxes deliver half of what expect_tx announces: the phase never completes.
    with pytest.raises(schedule.ScheduleError, match="hang"):
        schedule.simulate(kernel, 128, constants={**CONSTANTS, "kBoxColumns": 32})


def test_transaction_bytes_past_the_tx_count_are_caught():
    small = {**CONSTANTS, "kMaxTransactionBytes": 16 * 1024}
    with pytest.raises(schedule.ScheduleError, match="tx-count"):
        schedule.simulate("forward", 128, constants=small)


# The model's forward consumer is the kernel's: the same pipeline operations in the same order
# (one tile of the persistent kernel: Q waited for, the main loop, Q released after the epilogue,
# consumer 0's finish once the block's tiles are done).
_SOURCE_TOKENS = [
    (r"mbarrier_wait\(&q_full", "wait q_full"), (r"mbarrier_wait\(&k_full", "wait k_full"),
    (r"mbarrier_wait\(&v_full", "wait v_full"), (r"turns\.grant_first\(\)", "grant"),
    (r"turns\.take\(\)", "take"), (r"turns\.pass\(\)", "pass"), (r"turns\.finish\(\)", "finish"),
    (r"issue_qk<", "issue S"), (r"issue_pv<", "issue PV"), (r"wgmma_wait<(\d)>", "wgmma_wait"),
    (r"mbarrier_arrive\(&k_empty", "release k"), (r"mbarrier_arrive\(&v_empty", "release v"),
    (r"mbarrier_arrive\(&kv_empty", "release kv"), (r"mbarrier_arrive\(&q_empty", "release q"),
]


def _source_tokens(text: str) -> list[str]:
    found = []
    for pattern, token in _SOURCE_TOKENS:
        for match in re.finditer(pattern, text):
            found.append((match.start(), token + (f"<{match.group(1)}>" if match.groups() else "")))
    return [token for _, token in sorted(found)]


def _model_tokens(ops) -> list[str]:
    tokens = []
    for op in ops:
        kind = op[0]
        if kind == "wait":
            tokens.append("wait " + re.sub(r"\d+$", "", op[1]))
        elif kind in ("bar_sync", "bar_arrive"):
            tokens.append(op[2])
        elif kind == "wgmma":
            tokens.append("issue PV" if op[1].startswith("PV") else "issue S")
        elif kind == "wait_group":
            tokens.append(f"wgmma_wait<{op[1]}>")
        elif kind == "arrive":
            tokens.append("release " + re.sub(r"_empty\d*$", "", op[1]))
    return tokens


def forward_source_tokens(steps: int) -> list[str]:
    source = (layout.ROOT / "csrc" / "attention_sm90" / "forward_sm90.cuh").read_text()
    body = source[source.index("// ---- consumers ----"):source.index("#endif  // __CUDA_ARCH_FEAT_SM90_ALL")]
    loop_start = body.index("for (int step = 1; step < num_steps; ++step)")
    loop_end = body.index("if (num_steps > 0) {\n      const int last")
    before, loop, after = (_source_tokens(part) for part in (body[:loop_start], body[loop_start:loop_end],
                                                             body[loop_end:]))
    return before + loop * (steps - 1) + after


@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
@pytest.mark.parametrize("consumer", [0, 1])
def test_model_follows_the_forward_kernels_operation_order(consumer, head_dim):
    steps = 4
    source = forward_source_tokens(steps)
    if consumer == 0:
        source = [t for t in source if t != "grant"]
    ops = schedule.forward_consumer_ops(head_dim, steps, variant=grid.built_variant(head_dim), consumer=consumer)
    model = _model_tokens(ops)
    if consumer == 1:
        source = [t for t in source if t != "finish"]  # only consumer 0 syncs in finish()
    assert model == source


def test_operation_order_check_catches_a_moved_wait():
    # today's kernel waited for K after taking the turn: the model's FIXED order must differ.
    today = _model_tokens(schedule.forward_consumer_ops(128, 4, variant=schedule.TODAY))
    fixed = _model_tokens(schedule.forward_consumer_ops(128, 4))
    assert today != fixed and today.index("take") < today.index("wait k_full")


# ---- the forward's staged output store ----------------------------------------------------------------
@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
def test_output_staging_round_trips_without_bank_conflicts(head_dim):
    assert layout.check_output_staging(head_dim) == []


def test_output_staging_without_swizzle_is_caught():
    errors = layout.check_output_staging(128, swizzled=False)
    assert any("bank conflicts" in e for e in errors)


def test_output_staging_in_the_other_consumers_rows_is_caught():
    errors = layout.check_output_staging(128, c={**CONSTANTS, "kWgmmaM": 32})
    assert errors


# ---- the persistent forward (KERNEL_NOTES c90d) -------------------------------------------------------
# Q is refilled only after both consumers released its buffer on q_empty, once O has left the rows it
# was staged in; step numbers, slots, parities, Q buffers and the pingpong run on across tiles.
PERSISTENT = replace(schedule.FIXED, persistent=True)
STALLS = schedule.Latencies(stall_cycles=3000)  # adversarial warp scheduling before every named barrier


@pytest.mark.parametrize("tiles", [(4, 4, 4), (8, 7, 6, 5, 4, 3, 2, 1), (1, 1, 1, 1), (0, 3, 0, 2), (32, 32),
                                   (2, 1, 2, 1)], ids=str)
@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
def test_persistent_forward_schedule_is_sound(tiles, head_dim):
    for seed in SEEDS:
        for lat in (schedule.Latencies(), STALLS):
            schedule.simulate("forward", head_dim, variant=grid.built_variant(head_dim), tiles=tiles, seed=seed, lat=lat)
            schedule.simulate("forward", head_dim, variant=PERSISTENT, tiles=tiles, seed=seed, lat=lat)


@pytest.mark.parametrize("row", [(32, 8, 512, 64, True), (16, 8, 1024, 64, True), (4, 16, 4096, 128, True)],
                         ids=str)
def test_persistent_forward_runs_a_real_blocks_tiles(row):
    # block 0's tile list as tile_scheduler.h orders it at an ANCHORS row (causal pairs, longest first)
    batch, heads, seq_len, head_dim, causal = row
    scheduler = grid.scheduler_for(batch, heads, seq_len, head_dim, causal)
    c = CONSTANTS
    tiles = tuple(grid.tile_steps(m, seq_len, causal, c) for m, _, _ in scheduler.block_tiles(0))
    assert tiles[0] == scheduler.m_blocks  # the longest first
    for seed in range(3):
        schedule.simulate("forward", head_dim, variant=grid.built_variant(head_dim), tiles=tiles, seed=seed)


def test_built_forward_has_two_q_buffers_where_they_fit():
    assert layout.forward_q_buffers(64, CONSTANTS) == 2 and layout.forward_q_buffers(128, CONSTANTS) == 1


@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
def test_forward_carve_up_fits_and_does_not_overlap(head_dim):
    c = CONSTANTS
    tiles, _, _ = layout.kernel_products("forward", head_dim, 0, 0, c)
    tile_bytes = head_dim // 64 * c["kBoxRows"] * c["kSwizzleBytes"]
    q_buffers, stages = layout.forward_q_buffers(head_dim, c), c["kForwardStages"]
    starts = [b * tile_bytes for b in range(q_buffers)] + [(q_buffers + s) * tile_bytes for s in range(2 * stages)]
    assert [t.address for t in tiles if t.tensor == "Q"] == starts[:q_buffers]
    assert all(start % c["kSwizzleAtomBytes"] == 0 for start in starts)
    end = (q_buffers + 2 * stages) * tile_bytes
    assert c["kForwardBarrierBytes"] >= 8 * (2 * q_buffers + 4 * stages)
    assert end + c["kForwardBarrierBytes"] + c["kSwizzleAtomBytes"] <= c["kMaxSharedBytes"]


def test_second_q_buffer_read_from_the_wrong_place_is_caught():
    errors = layout.check_kernel("forward", 64, q_read_bytes=64 * 128)  # half a tile: Q0's lower rows
    assert any("S = Q1 K^T" in e and "elements wrong" in e for e in errors)


@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
def test_persistent_forward_releasing_q_before_the_epilogue_is_caught(head_dim):
    broken = replace(grid.built_variant(head_dim), release_q_early=True)
    with pytest.raises(schedule.ScheduleError, match="reads it until|reuses"):
        for seed in SEEDS:
            schedule.simulate("forward", head_dim, variant=broken, tiles=(3, 3, 3, 3), seed=seed)


def test_pingpong_granted_every_tile_is_caught_with_two_q_buffers():
    # The c90c model's protocol (grant and finish per tile): with the next Q already in, consumer 1's
    # grant can reach barrier 1 before consumer 0's finish of the tile before.
    broken = replace(grid.built_variant(64), grant_every_tile=True)
    with pytest.raises(schedule.ScheduleError, match="twice in one phase"):
        for seed in range(12):
            schedule.simulate("forward", 64, variant=broken, tiles=(2, 1, 2, 1), seed=seed, lat=STALLS)


# Tensor-core busy the c90d prediction rests on (the chosen design, grid model, seed 0), each at least
# today's grid's; the floors are the c90d table's figures rounded down.
BUSY_FLOORS = {((4, 16, 4096, 128), False): 0.92, ((4, 16, 4096, 128), True): 0.88,
               ((8, 16, 2048, 64), False): 0.70, ((8, 16, 2048, 64), True): 0.68,
               ((16, 8, 1024, 64), False): 0.67, ((16, 8, 1024, 64), True): 0.64,
               ((32, 8, 512, 64), False): 0.65, ((32, 8, 512, 64), True): 0.59}


def test_persistent_grid_keeps_the_predicted_busy():
    built = grid.CANDIDATES[-1][0]
    for row in grid.anchor_table(candidates=grid.CANDIDATES[-1:]):
        key = (row["shape"], row["causal"])
        assert row["busy"][built] >= BUSY_FLOORS[key], f"{key}: {row['busy'][built]:.1%}"
        assert row[built] >= row["today"], f"{key}: persistent {row[built]:.0f} < today {row['today']:.0f}"


def test_plain_longest_first_order_is_caught_unbalanced():
    # Longest-first without pairs, strided over L2 sections: one block gets far more key blocks than
    # the mean at the causal 4k row (the order c90d rejected); the built order stays within 5%.
    c = CONSTANTS
    built = grid.scheduler_for(4, 16, 4096, 128, True)
    plain = replace(built, causal=False)  # the same sections and snake, no pairs: ranks 0..M-1
    for scheduler, reverse, bound in ((built, False, 1.05), (plain, True, None)):
        loads = []
        for block in range(scheduler.grid):
            ms = [m for m, _, _ in scheduler.block_tiles(block)]
            ms = [scheduler.m_blocks - 1 - m for m in ms] if reverse else ms
            loads.append(sum(grid.tile_steps(m, 4096, True, c) for m in ms))
        ratio = max(loads) / (sum(loads) / len(loads))
        if bound:
            assert ratio <= bound, ratio
        else:
            assert ratio > 1.2, ratio


# ---- the tile order (tile_scheduler.h; its Python mirror is sm90_grid_model.TileScheduler) ----------
ORDER_CASES = [  # (m_blocks, heads, seqs, section_heads, grid, causal)
    (32, 16, 4, 16, 132, 1), (32, 16, 4, 16, 132, 0), (4, 8, 32, 256, 132, 1), (7, 3, 5, 4, 11, 1),
    (7, 3, 5, 4, 11, 0), (1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 1, 0), (5, 2, 1, 2, 3, 1), (9, 5, 3, 7, 132, 1),
    (16, 8, 16, 128, 132, 1), (3, 1, 1, 1, 2, 1),
    (7, 3, 5, 4, 60, 1), (7, 3, 5, 4, 105, 0),  # one unit a block: the packed grid
]


def _order(case):
    scheduler = grid.TileScheduler(*case[:5], bool(case[5]))
    return [scheduler.block_tiles(block) for block in range(scheduler.grid)]


@pytest.mark.parametrize("case", ORDER_CASES, ids=str)
def test_every_tile_runs_exactly_once(case):
    m_blocks, heads, seqs = case[:3]
    tiles = [tile for block in _order(case) for tile in block]
    assert sorted(tiles) == sorted((m, h, s) for m in range(m_blocks) for h in range(heads) for s in range(seqs))


@pytest.mark.parametrize("case", [c for c in ORDER_CASES if c[5]], ids=str)
def test_causal_order_runs_longest_first_in_equal_pairs(case):
    m_blocks = case[0]
    scheduler = grid.TileScheduler(*case[:5], True)
    for block in range(scheduler.grid):
        round_ = 0
        while (index := scheduler.linear(block, round_)) < scheduler.tiles():
            if round_ % 2 == 0:  # a unit: its long query block, then its short one of the same head
                long, short = scheduler.tile(index), scheduler.tile(scheduler.linear(block, round_ + 1))
                assert long[0] >= m_blocks // 2 and long[1:] == short[1:]
                assert short[0] == -1 or long[0] + short[0] == m_blocks - 1
            round_ += 1
    # Along the order, inside each section, the units' long query blocks never grow: the longest first.
    section_tiles = 2 * scheduler.section_heads * scheduler.ranks()
    for start in range(0, scheduler.tiles(), section_tiles):
        longs = [scheduler.tile(i)[0] for i in range(start, min(start + section_tiles, scheduler.tiles()), 2)]
        assert longs[0] == m_blocks - 1 and longs == sorted(longs, reverse=True)


def test_section_heads_keep_k_and_v_within_the_l2_budget():
    c = CONSTANTS
    assert grid.section_heads_for(4096, 128, 64, c) == c["kL2SectionBytes"] // (2 * 4096 * 128 * 2)
    assert grid.section_heads_for(1 << 22, 128, 64, c) == 1 and grid.section_heads_for(512, 64, 3, c) == 3
    assert grid.section_heads_for(512, 64, 0, c) == 1


def test_kernel_header_gives_the_same_order(tmp_path):
    # tile_scheduler.h compiled by the host compiler: the order the kernel runs, compared with the mirror.
    import shutil
    import subprocess

    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler to build tile_scheduler.h")
    program = tmp_path / "order.cpp"
    program.write_text(
        '#include <cstdio>\n#include <cstdlib>\n#include "attention_sm90/tile_scheduler.h"\n'
        "using namespace tformer::attention_sm90;\n"
        "int main(int argc, char** argv) {\n"
        "  TileScheduler s{atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6])};\n"
        "  for (int b = 0; b < s.grid; ++b) {\n"
        "    for (int r = 0;; ++r) {\n"
        "      const int i = s.linear(b, r);\n"
        "      if (i >= s.tiles()) break;\n"
        "      const ForwardTile t = s.tile(i);\n"
        "      if (t.m_block >= 0) std::printf(\"%d %d %d,\", t.m_block, t.head, t.seq);\n"
        "    }\n"
        "    std::printf(\"\\n\");\n"
        "  }\n"
        "  std::printf(\"%d %d %d\\n\", section_heads_for(4096, 128, 64), section_heads_for(512, 64, 3), s.units());\n"
        "}\n")
    binary = tmp_path / "order"
    subprocess.run([compiler, "-std=c++17", "-I", str(layout.ROOT / "csrc"), str(program), "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    for case in ORDER_CASES:
        lines = subprocess.run([str(binary), *map(str, case)], check=True, capture_output=True, text=True,
                               timeout=30).stdout.splitlines()
        header = [[tuple(map(int, t.split())) for t in line.split(",") if t] for line in lines[:-1]]
        assert header == _order(case), case
        scheduler = grid.TileScheduler(*case[:5], bool(case[5]))
        assert lines[-1].split() == [str(grid.section_heads_for(4096, 128, 64)), str(grid.section_heads_for(512, 64, 3)),
                                     str(scheduler.units())]


# ---- banded grids: the banded forward's schedule (pair_query_blocks) and its key blocks (band.h) -----
import sm90_band_model as band_model  # noqa: E402

BANDED_GRIDS = {  # (batch, heads, Sq, Sk, head dim, left, right, bottom_right, SMs)
    "causal_sliding_256": (4, 16, 8192, 8192, 128, 256, 0, False, 132),
    "two_sided_128": (2, 3, 1000, 1000, 64, 128, 128, False, 132),
    "bottom_right_sq_lt_sk": (2, 2, 300, 1000, 128, -1, 0, True, 11),
    "bottom_right_sq_gt_sk_rows_without_keys": (2, 2, 1000, 300, 64, -1, 0, True, 7),
    "window_bottom_right_sq_gt_sk": (1, 3, 700, 129, 64, 64, 0, True, 5),
    "top_left_sq_gt_sk_rows_without_keys": (1, 2, 1000, 17, 64, 0, 0, False, 3),
    "decoding": (3, 2, 1, 1000, 128, 256, 0, True, 132),
}


@pytest.mark.parametrize("case", list(BANDED_GRIDS))
def test_banded_grid_runs_every_tile_once_with_the_bands_key_blocks(case):
    batch, heads, q_len, k_len, head_dim, left, right, bottom_right, sms = BANDED_GRIDS[case]
    scheduler = grid.banded_scheduler_for(batch, heads, q_len, k_len, head_dim, left, right, sms)
    tiles = [tile for block in range(scheduler.grid) for tile in scheduler.block_tiles(block)]
    assert sorted(tiles) == sorted((m, h, s) for m in range(scheduler.m_blocks) for h in range(heads)
                                   for s in range(batch))
    # Each tile's key blocks are exactly the blocks holding an allowed pair of its rows (brute
    # force): a tile whose rows see no key runs none (and writes zeros, lse -inf).
    band = band_model.sequence_band(q_len, k_len, left, right, bottom_right)
    allowed = band_model.brute_force_mask(q_len, k_len, left, right, bottom_right)
    rows = CONSTANTS["kBoxRows"]
    for m in range(scheduler.m_blocks):
        keys = allowed[m * rows:(m + 1) * rows].any(0).nonzero().flatten()
        want = 0 if len(keys) == 0 else int(keys[-1]) // rows - int(keys[0]) // rows + 1
        assert grid.banded_tile_steps(m, band, CONSTANTS) == want, (case, m)


def test_banded_grid_stays_balanced():
    # The causal sliding window's query blocks cost about the same: one tile a unit, and the
    # busiest block runs within 10% of the mean key blocks.
    batch, heads, q_len, k_len, head_dim, left, right, bottom_right, sms = BANDED_GRIDS["causal_sliding_256"]
    scheduler = grid.banded_scheduler_for(batch, heads, q_len, k_len, head_dim, left, right, sms)
    assert not scheduler.causal
    band = band_model.sequence_band(q_len, k_len, left, right, bottom_right)
    loads = [sum(grid.banded_tile_steps(m, band, CONSTANTS) for m, _, _ in scheduler.block_tiles(b))
             for b in range(scheduler.grid)]
    assert max(loads) <= 1.1 * sum(loads) / len(loads)
    # Bottom-right causal keeps the pairs: a unit's two query blocks together stay within one
    # key block of every other unit's.
    scheduler = grid.banded_scheduler_for(1, 4, 1000, 3000, 128, -1, 0, 132)
    band = band_model.sequence_band(1000, 3000, -1, 0, True)
    assert scheduler.causal
    pair_costs = {grid.banded_tile_steps(m, band, CONSTANTS) + grid.banded_tile_steps(scheduler.m_blocks - 1 - m,
                                                                                        band, CONSTANTS)
                  for m in range(scheduler.m_blocks // 2)}
    assert max(pair_costs) - min(pair_costs) <= 1


@pytest.mark.parametrize("case", ["causal_sliding_256", "bottom_right_sq_gt_sk_rows_without_keys",
                                  "top_left_sq_gt_sk_rows_without_keys"])
def test_banded_forward_tile_lists_are_sound(case):
    # The persistent forward's barrier schedule over real banded tile lists: a sliding window's
    # equal short tiles, and tiles whose rows see no key (0 steps: Q in, zeros out).
    batch, heads, q_len, k_len, head_dim, left, right, bottom_right, sms = BANDED_GRIDS[case]
    scheduler = grid.banded_scheduler_for(batch, heads, q_len, k_len, head_dim, left, right, sms)
    band = band_model.sequence_band(q_len, k_len, left, right, bottom_right)
    for block in (0, scheduler.grid - 1):
        tiles = tuple(grid.banded_tile_steps(m, band, CONSTANTS) for m, _, _ in scheduler.block_tiles(block))
        for seed in range(2):  # a block may have no product at all (every tile 0 steps): run it to its exit
            machine = schedule.run_forward_block(head_dim, tiles, grid.built_variant(head_dim), CONSTANTS, seed)
            assert machine.exited_at is not None


@pytest.mark.parametrize("head_dim", layout.HEAD_DIMS)
@pytest.mark.parametrize("kernel", [k for k in layout.KERNELS if k != "forward"])
def test_banded_backward_register_split_is_sound(kernel, head_dim):
    # The banded backward's setmaxnreg budgets (contracts.h) redistribute the block's pool without
    # a hang; 8 more consumer registers would spin in setmaxnreg.inc.
    banded = schedule.banded_constants(CONSTANTS)
    schedule.simulate(kernel, head_dim, steps=4, constants=banded)
    with pytest.raises(schedule.ScheduleError, match=r"hang: .*setmaxnreg"):
        schedule.simulate(kernel, head_dim, steps=4,
                          constants={**banded, "kConsumerRegisters": banded["kConsumerRegisters"] + 8})
