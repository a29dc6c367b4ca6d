"""The sm_90a forward at the grid level: which tiles each SM runs and how long the busiest SM
takes, for today's one-tile-a-block grid and for the persistent grid (tile_scheduler.h), from the
per-block barrier schedule of tests/sm90_schedule_model.py.

- `TileScheduler` mirrors csrc/attention_sm90/tile_scheduler.h line for line (the contract test
  compiles that header with the host compiler and compares the two orders).
- Non-persistent: the hardware hands out blocks in blockIdx order (query block fastest, reversed
  when causal, then head, then sequence) to whichever SM frees first; each block pays
  `LAUNCH_CYCLES` (the SM's turnover: a block retires, the next is placed, its barriers are
  initialised and its tensor maps fetched) plus its own schedule from the first load to exit.
- Persistent: one block an SM runs its tiles of the static order back to back in one schedule
  (forward_schedule with variant.persistent and a tile list), paying the turnover once.

What the model leaves out: the L2 (both orders keep a few heads' K/V resident: the emulator's TMA
latencies are L2 hits), DRAM, clocks, and the per-SM noise a static schedule cannot absorb.

    python tests/sm90_grid_model.py     # the ANCHORS.md rows, today's grid vs persistent variants
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sm90_schedule_model as schedule  # noqa: E402
from sm90_layout_model import forward_q_buffers, read_constants  # noqa: E402

SMS = 132                  # H100 SXM
CLOCK_HZ = 1.83e9          # the emulator's 4,096 FLOP a cycle an SM is 989 TFLOP/s at this clock
LAUNCH_CYCLES = 1000       # an SM's turnover between two blocks (stated, not measured)
# (B, H, S, D) of /work/shared/ANCHORS.md's attention rows, each causal and not.
ANCHOR_SHAPES = ((4, 16, 4096, 128), (8, 16, 2048, 64), (16, 8, 1024, 64), (32, 8, 512, 64))


@dataclass(frozen=True)
class TileScheduler:
    """tile_scheduler.h's TileScheduler."""
    m_blocks: int
    heads: int
    seqs: int
    section_heads: int
    grid: int
    causal: bool

    def parts(self) -> int:
        return 2 if self.causal else 1

    def ranks(self) -> int:
        return (self.m_blocks + 1) // 2 if self.causal else self.m_blocks

    def units(self) -> int:
        return self.ranks() * self.heads * self.seqs

    def tiles(self) -> int:
        return self.parts() * self.units()

    def linear(self, block: int, round_: int) -> int:
        unit_round = round_ // self.parts()
        unit = unit_round * self.grid + (block if unit_round % 2 == 0 else self.grid - 1 - block)
        return unit * self.parts() + round_ % self.parts()

    def tile(self, index: int) -> tuple[int, int, int]:
        unit, part = divmod(index, self.parts())
        pairs, section_units = self.heads * self.seqs, self.section_heads * self.ranks()
        section, within = divmod(unit, section_units)
        first_pair = section * self.section_heads
        width = min(pairs - first_pair, self.section_heads)
        rank, pair = within // width, first_pair + within % width
        m_block = rank
        if self.causal:
            m_block = self.m_blocks - 1 - rank if part == 0 else (-1 if rank == self.m_blocks - 1 - rank else rank)
        return (m_block, pair % self.heads, pair // self.heads)

    def block_tiles(self, block: int) -> list[tuple[int, int, int]]:
        """The tiles block `block` runs, in order (none-tiles, m_block -1, left out)."""
        out, round_ = [], 0
        while (index := self.linear(block, round_)) < self.tiles():
            if self.tile(index)[0] >= 0:
                out.append(self.tile(index))
            round_ += 1
        return out


def section_heads_for(k_len: int, head_dim: int, pairs: int, c: dict[str, int] | None = None) -> int:
    """tile_scheduler.h's section_heads_for."""
    c = c or read_constants()
    if pairs <= 1:
        return 1
    size = 2 * k_len * head_dim * c["kElementBytes"]
    fit = c["kL2SectionBytes"] // size if size > 0 else pairs
    return min(max(fit, 1), pairs)


def scheduler_for(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool, sms: int = SMS) -> TileScheduler:
    """What run_forward builds for a padded batch of equal lengths (forward_sm90.cuh)."""
    c = read_constants()
    m_blocks = -(-seq_len // c["kBoxRows"])
    units = ((m_blocks + 1) // 2 if causal else m_blocks) * heads * batch
    return TileScheduler(m_blocks, heads, batch, section_heads_for(seq_len, head_dim, heads * batch, c),
                         min(sms, units), causal)


def pair_query_blocks(left: int, right: int) -> bool:
    """tile_scheduler.h's pair_query_blocks: pair query blocks where their key blocks grow with
    the index (a band bounded on the right only)."""
    return right >= 0 and left < 0


def banded_scheduler_for(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, left: int, right: int,
                         sms: int = SMS) -> TileScheduler:
    """What run_forward builds for the banded kernel on a padded batch (forward_sm90.cuh)."""
    c = read_constants()
    m_blocks = -(-q_len // c["kBoxRows"])
    causal = pair_query_blocks(left, right)
    units = ((m_blocks + 1) // 2 if causal else m_blocks) * heads * batch
    return TileScheduler(m_blocks, heads, batch, section_heads_for(k_len, head_dim, heads * batch, c),
                         min(sms, units), causal)


def banded_tile_steps(m_block: int, band, c: dict[str, int]) -> int:
    """Key blocks a banded query block runs (forward_sm90.cuh's tile_span: band.h's key_blocks)."""
    rows = c["kBoxRows"]
    first, end = band.key_blocks(m_block * rows, rows, rows)
    return max(0, end - first)


def tile_steps(m_block: int, seq_len: int, causal: bool, c: dict[str, int]) -> int:
    """Key blocks a query block runs (forward_sm90.cuh's num_steps, equal q and k lengths)."""
    rows = c["kBoxRows"]
    key_end = min(seq_len, (m_block + 1) * rows) if causal else seq_len
    return -(-key_end // rows)


@lru_cache(maxsize=None)
def _block_cycles(head_dim: int, tiles: tuple[int, ...], variant: schedule.ForwardVariant, stages: int,
                  seed: int, lat: schedule.Latencies) -> int:
    c = {**read_constants(), "kForwardStages": stages}
    machine = schedule.run_forward_block(head_dim, tiles, variant, c, seed, lat)
    return machine.exited_at


def anchor_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float:
    """ANCHORS.md's count: 4 B H S^2 D, halved when causal."""
    return 4 * batch * heads * seq_len ** 2 * head_dim / (2 if causal else 1)


def non_persistent_cycles(batch, heads, seq_len, head_dim, causal, stages, seed=0, sms=SMS,
                          lat=schedule.Latencies(), launch=LAUNCH_CYCLES) -> int:
    """Today's grid: blocks in blockIdx order to the first free SM."""
    import heapq

    c = read_constants()
    m_blocks = -(-seq_len // c["kBoxRows"])
    free = [0] * sms
    for _ in range(batch * heads):
        for x in range(m_blocks):
            m_block = m_blocks - 1 - x if causal else x
            steps = tile_steps(m_block, seq_len, causal, c)
            start = heapq.heappop(free)
            heapq.heappush(free, start + launch + _block_cycles(head_dim, (steps,), schedule.FIXED, stages, seed, lat))
    return max(free)


def persistent_cycles(batch, heads, seq_len, head_dim, causal, variant, stages, seed=0, sms=SMS,
                      simulate_blocks: int = 2, lat=schedule.Latencies(), launch=LAUNCH_CYCLES) -> int:
    """The persistent grid: the busiest blocks' tile lists, each simulated whole."""
    c = read_constants()
    scheduler = scheduler_for(batch, heads, seq_len, head_dim, causal, sms)
    lists = [tuple(tile_steps(m, seq_len, causal, c) for m, _, _ in scheduler.block_tiles(b))
             for b in range(scheduler.grid)]
    busiest = sorted(set(lists), key=lambda steps: (-sum(steps), -len(steps)))[:simulate_blocks]
    return launch + max(_block_cycles(head_dim, steps, variant, stages, seed, lat) for steps in busiest)


def executed_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> int:
    """What the tensor cores run: every key block of every tile whole (diagonal blocks included)."""
    c = read_constants()
    m_blocks = -(-seq_len // c["kBoxRows"])
    steps = sum(tile_steps(m, seq_len, causal, c) for m in range(m_blocks)) * batch * heads
    return steps * 4 * c["kBoxRows"] ** 2 * head_dim  # S = Q K^T and O += P V, 128 x 128 each


def busy(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool, cycles: int, sms: int = SMS) -> float:
    """Tensor-core busy over every SM and the whole grid's time."""
    return executed_flops(batch, heads, seq_len, head_dim, causal) / (cycles * sms * schedule.Latencies().flops_per_cycle)


def tflops(flops: float, cycles: int) -> float:
    return flops / (cycles / CLOCK_HZ) / 1e12


def built_variant(head_dim: int) -> schedule.ForwardVariant:
    """The persistent forward as built: forward_sm90.cuh's Shape<kD>::kQBuffers Q buffers."""
    return replace(schedule.FIXED, persistent=True, q_buffers=forward_q_buffers(head_dim, read_constants()))


# The candidates of KERNEL_NOTES c90d: (label, variant at hd 64, at hd 128, stages at hd 64, at hd 128).
ONE_Q = replace(schedule.FIXED, persistent=True)
TWO_Q = replace(schedule.FIXED, persistent=True, q_buffers=2)
CANDIDATES = (
    ("1 Q buffer, 3 stages", ONE_Q, ONE_Q, 3, 3),
    ("2 Q buffers; hd 128: 2 stages", TWO_Q, TWO_Q, 3, 2),
    ("built: 2 Q buffers at hd 64, 1 at hd 128; 3 stages", built_variant(64), built_variant(128), 3, 3),
)


def anchor_table(seed: int = 0, lat: schedule.Latencies = schedule.Latencies(), launch: int = LAUNCH_CYCLES,
                 candidates=CANDIDATES) -> list[dict]:
    """TFLOP/s (ANCHORS.md's FLOP count over the busiest SM's cycles) of today's grid and of each
    candidate, at every ANCHORS.md attention row."""
    rows = []
    for batch, heads, seq_len, head_dim in ANCHOR_SHAPES:
        for causal in (False, True):
            flops = anchor_flops(batch, heads, seq_len, head_dim, causal)
            today = non_persistent_cycles(batch, heads, seq_len, head_dim, causal, 3, seed, lat=lat, launch=launch)
            shape = (batch, heads, seq_len, head_dim)
            row = {"shape": shape, "causal": causal, "today": tflops(flops, today),
                   "busy": {"today": busy(*shape, causal, today)}}
            for label, variant64, variant128, stages64, stages128 in candidates:
                variant, stages = (variant64, stages64) if head_dim == 64 else (variant128, stages128)
                cycles = persistent_cycles(batch, heads, seq_len, head_dim, causal, variant, stages, seed, lat=lat,
                                           launch=launch)
                row[label] = tflops(flops, cycles)
                row["busy"][label] = busy(*shape, causal, cycles)
            rows.append(row)
    return rows


def print_table(rows: list[dict], title: str) -> None:
    labels = [key for key in rows[0] if key not in ("shape", "causal", "busy")]
    print(f"\n{title}; model TFLOP/s (x today, tensor-core busy)\n")
    print("| (B, H, S, D) | causal | " + " | ".join(labels) + " |")
    print("| --- | --- |" + " --- |" * len(labels))
    for row in rows:
        figures = " | ".join(f"{row[label]:.0f} ({row[label] / row['today']:.3f}x, {row['busy'][label]:.0%})"
                             for label in labels)
        print(f"| {', '.join(map(str, row['shape']))} | {'yes' if row['causal'] else 'no'} | {figures} |")


if __name__ == "__main__":
    print_table(anchor_table(), "Stated latencies (TMA 48 B/cycle, 1,000-cycle block turnover)")
    print_table(anchor_table(lat=schedule.Latencies(tma_bytes_per_cycle=32)), "TMA at 32 B/cycle")
    print_table(anchor_table(launch=0), "No block turnover cost (a lower bound on the persistent gain)")
