// The persistent sm_90a forward's static tile scheduler: which (query block, head, sequence)
// tiles each of the grid's blocks runs, and in what order. Plain C++ (no CUDA types): the kernel
// calls it on the device, the launch on the host, and tests/test_sm90_contracts.py compiles this
// header with the host compiler to check the order against its Python model
// (tests/sm90_grid_model.py): every tile exactly once, longest first.
//
// The order:
// - Heads of all sequences are cut into L2 sections: as many (sequence, head) pairs as keep
//   their K and V inside kL2SectionBytes, so the blocks running at once reuse K/V from L2 as the
//   non-persistent grid's (query block fastest) order did (FA3's tile_scheduler.hpp groups heads
//   the same way). Longest-first across every head at once would stream each head's K/V from
//   DRAM again for every query block.
// - Causal (pair_query_blocks): a unit of work is a pair of query blocks of one head, the longest first (query block
//   M - 1 - r, then r: M + 1 key blocks a pair), so every unit costs the same and a static
//   schedule stays balanced. Plain longest-first along a list cut into sections makes a sawtooth
//   of lengths, and blocks striding over it got up to 29% more key blocks than the mean
//   (tests/sm90_grid_model.py, KERNEL_NOTES c90d). Without causal every tile is one unit.
// - Inside a section, rank major (r, or the query block), head minor.
// - Block c runs units c, then 2 grid - 1 - c, then 2 grid + c, ... (a snake), so no block is
//   always the first or the last of a round.
#pragma once

#include <cstdint>

#include "attention_sm90/contracts.h"

#if defined(__CUDACC__)
#define TFORMER_TILE_FUNCTION __host__ __device__ __forceinline__
#else
#define TFORMER_TILE_FUNCTION inline
#endif

namespace tformer {
namespace attention_sm90 {

struct ForwardTile {
  int m_block, head, seq;
};

struct TileScheduler {
  int m_blocks;         // query blocks of the longest sequence
  int heads, seqs;      // query heads; sequences (packed: the cu_seqlens count)
  int section_heads;    // (sequence, head) pairs a section: section_heads_for()
  int grid;             // blocks launched: min(SMs, units())
  int causal;

  TFORMER_TILE_FUNCTION int parts() const { return causal ? 2 : 1; }  // tiles a unit
  TFORMER_TILE_FUNCTION int ranks() const { return causal ? (m_blocks + 1) / 2 : m_blocks; }  // units a head
  TFORMER_TILE_FUNCTION int units() const { return ranks() * heads * seqs; }
  TFORMER_TILE_FUNCTION int tiles() const { return parts() * units(); }

  // The linear tile index of the `round`-th tile block `block` runs; >= tiles() once it has
  // none left (every later round's index is larger too).
  TFORMER_TILE_FUNCTION int linear(int block, int round) const {
    const int unit_round = round / parts();
    const int unit = unit_round * grid + (unit_round % 2 == 0 ? block : grid - 1 - block);
    return unit * parts() + round % parts();
  }

  // The tile at a linear index; m_block -1: none (the second half of a causal pair whose two
  // query blocks are one, the middle of an odd count).
  TFORMER_TILE_FUNCTION ForwardTile tile(int index) const {
    const int unit = index / parts(), part = index % parts();
    const int pairs = heads * seqs, section_units = section_heads * ranks();
    const int section = unit / section_units, within = unit % section_units;
    const int first_pair = section * section_heads;
    const int width = pairs - first_pair < section_heads ? pairs - first_pair : section_heads;
    const int rank = within / width, pair = first_pair + within % width;
    int m_block = rank;
    if (causal) m_block = part == 0 ? m_blocks - 1 - rank : (rank == m_blocks - 1 - rank ? -1 : rank);
    return {m_block, pair % heads, pair / heads};
  }
};

// Whether the order pairs query blocks (the `causal` field): where a query block's key blocks
// grow with its index (a band bounded on the right, unbounded on the left: causal of either
// alignment, or a right window), so block M - 1 - r and block r together cost about the same for
// every r. A sliding window (bounded on the left too) gives every query block about the same
// number of key blocks, as full attention: one tile a unit. Any choice runs every tile exactly
// once; this one only balances.
TFORMER_TILE_FUNCTION int pair_query_blocks(int window_left, int window_right) {
  return window_right >= 0 && window_left < 0 ? 1 : 0;
}

// (sequence, head) pairs whose K and V (k_len tokens x head_dim, 16-bit) fit in one section.
TFORMER_TILE_FUNCTION int section_heads_for(int64_t k_len, int head_dim, int pairs) {
  if (pairs <= 1) return 1;
  const int64_t bytes = 2 * k_len * head_dim * kElementBytes;  // K and V of one head
  int64_t fit = bytes > 0 ? kL2SectionBytes / bytes : pairs;
  fit = fit < 1 ? 1 : fit;
  return static_cast<int>(fit < pairs ? fit : pairs);
}

}  // namespace attention_sm90
}  // namespace tformer

#undef TFORMER_TILE_FUNCTION
