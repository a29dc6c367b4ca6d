// Flash attention forward for Hopper (sm_90a): TMA tile loads, an mbarrier pipeline and
// warpgroup MMA (wgmma), warp-specialized as in FlashAttention-3 (Shah et al. 2024, 3.1).
//
// Why raw PTX and not CuTe/CUTLASS: the whole kernel needs about a dozen Hopper instructions
// (hopper.cuh, wgmma.cuh), and CI compiles every translation unit on 2 cores: these files
// compile in seconds, where CuTe's template-heavy headers cost far more per file, and the
// layouts (128-byte swizzle, descriptors) are spelled out where they are used instead of
// hidden in layout algebra.
//
// The grid is persistent: one block an SM (queried on the host) runs query tiles of 128 rows of
// one (sequence, head) in turn, in the order of tile_scheduler.h (L2 sections of heads; causal:
// pairs of query blocks, longest first). Barrier phases and pipeline slots run on across tiles:
// a tile's Q waits on q_empty (both consumers stored O out of that Q buffer), and where shared
// memory holds two Q buffers (head dim 64) the next tile's Q lands during this tile's last steps.
// A block of 3 warpgroups (384 threads), for each of its tiles:
//   warpgroup 0, the producer: one thread issues TMA loads: the Q tile once, then each key
//     block's K and V tiles into a ring of kStages slots; k_full / v_full barriers say a
//     tile arrived (transaction bytes), k_empty / v_empty that both consumers are done with
//     it. K and V are released apart: K as soon as S = Q K^T has completed, V after O += P V,
//     so the K of a later step is in flight while this step's softmax and P V run (FA3's
//     mainloop does the same); a consumer waits for its tiles before it takes the pingpong
//     turn, never holding the turn while it waits on memory.
//   warpgroups 1 and 2, the consumers: 64 query rows each. Per key block of 128 keys:
//     S = Q K^T (wgmma, both operands in shared memory), mask, online softmax in registers
//     (FA2 Algorithm 1 in log2 units, as the sm_80 kernel), then O += P V (wgmma with P
//     from registers: for 16-bit types the accumulator layout of S is already the A-operand
//     layout, FA3 3.3), and release the slot.
// The producer gives its registers to the consumers (setmaxnreg). The softmax overlaps matrix
// products twice over (FA3 3.1-3.2): inside a warpgroup, block j's P V runs during block
// j + 1's softmax; between the two warpgroups, they take turns issuing (pingpong), so one's
// softmax runs while the other's products hold the tensor cores. bench/KERNEL_NOTES.md,
// sections c90 and c90c, has the predictions and what is left. The constants every address,
// descriptor and barrier below is computed from are in contracts.h, which the CPU emulators of
// the swizzle/descriptors and of this barrier schedule (tests/sm90_*_model.py) read too.
//
// Sliding windows, bottom-right alignment and soft-capping run in a banded variant of the same
// kernel (kBanded; csrc/attention_sm90/band.h): a tile visits only the key blocks that meet some
// row's band, masks only those a band edge cuts, and soft-caps raw scores before the softmax.
//
// Shared memory, every tile 1024-byte aligned (the 128-byte swizzle's period): a tile of 128
// rows x kD is kD / 64 panels of 128 rows x 64 columns (128 bytes a row, as one TMA box of
// 64 x 128 with CU_TENSOR_MAP_SWIZZLE_128B writes it). Semantics and out / lse layout are the
// sm_80 forward's (csrc/attention/attention.h), so either backward consumes them.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <cstdint>

#include "attention/attention.h"
#include "attention_sm90/attention_sm90.h"
#include "attention_sm90/band.h"
#include "attention_sm90/block_setup.cuh"
#include "attention_sm90/hopper.cuh"
#include "attention_sm90/products.cuh"
#include "attention_sm90/tile_scheduler.h"
#include "common/convert.cuh"

namespace tformer {
namespace attention_sm90 {

constexpr int kBlockM = kBoxRows;  // query rows per block: 64 per consumer warpgroup (wgmma's M)
constexpr int kBlockN = kBoxRows;  // keys per pipeline slot
constexpr int kStages = kForwardStages;  // contracts.h: 3, which fits at head dim 128 too
constexpr int kPanelBytes = kBlockN * 128;           // one 128-row panel (kBlockM == kBlockN)
constexpr float kLn2 = 0.6931471805599453f;

template <int kD> struct Shape {
  static_assert(kD % kPanelColumns == 0, "head dim must be a multiple of 64");
  static constexpr int kPanels = kD / kPanelColumns;
  static constexpr int kTileBytes = kPanels * kPanelBytes;  // Q, K or V tile
  static constexpr int kBarrierBytes = kForwardBarrierBytes;  // per Q buffer and per slot: full and empty
  // Q buffers + kStages x (K + V) + barriers + slack to align the base to 1024 bytes.
  static constexpr int smem_bytes(int q_buffers) {
    return (q_buffers + 2 * kStages) * kTileBytes + kBarrierBytes + kSwizzleAtomBytes;
  }
  // Two Q buffers where they fit (the next tile's Q loads early), else one.
  static constexpr int kQBuffers = smem_bytes(kForwardQBuffers) <= kMaxSharedBytes ? kForwardQBuffers : 1;
  static constexpr int kSmemBytes = smem_bytes(kQBuffers);
  // Contracts a hang or a wrong value would break, checked at build time.
  static_assert(kQBuffers >= 1 && kQBuffers <= kForwardQBuffers, "Q buffers: one or two");
  static_assert(kBarrierBytes >= 8 * (2 * kQBuffers + 4 * kStages), "the barriers overflow their bytes");
  static_assert(kSmemBytes <= kMaxSharedBytes, "over Hopper's 227 KiB of shared memory a block");
  static_assert(kTileBytes % kSwizzleAtomBytes == 0, "every tile starts on a swizzle atom (1024 B)");
  static_assert(kTileBytes <= kMaxTransactionBytes, "a phase's TMA bytes exceed the mbarrier tx-count");
  static_assert(kPanelBytes < kDescriptorFieldLimit, "V's panel offset (LBO) overflows its descriptor field");
};
static_assert(Shape<64>::kQBuffers == 2 && Shape<128>::kQBuffers == 1,
              "KERNEL_NOTES c90d's design: two Q buffers at head dim 64, one at 128 (3 stages)");

struct ForwardParams {
  AttentionForwardArgs args;
  CUtensorMap q_map, k_map, v_map;
  TileScheduler scheduler;
  // The banded kernel's soft-cap in raw units (online_softmax), from the host: cap_in = scale /
  // softcap, cap_out = softcap / scale; both 0 when softcap is 0. Read from the parameter bank
  // where used, as the band's bounds: in registers they would push the consumers past 232.
  float cap_in, cap_out;
};

// A tile's place in its sequence: the sequence's span, the first query row, the key blocks
// (num_steps of them from block n_first; n_first is 0 but in the banded kernel).
struct TileSpan {
  int q_start, q_len, k_start, k_len, seq_coord, m0, num_steps, n_first;
};

// The tile a linear index names, or num_steps < 0 for none: the empty half of a causal pair, or
// (packed) a query block past its sequence's end. Producer and consumers skip the same tiles, so
// their tile counts (which pick the Q buffer and its parity) agree. Banded (kBanded): the key
// blocks that meet some row's band (band.h); none when no row sees a key (zeros, lse -inf).
template <bool kBanded>
__device__ __forceinline__ TileSpan tile_span(const AttentionProblem& p, const ForwardTile& tile) {
  if (tile.m_block < 0) return {0, 0, 0, 0, 0, 0, -1, 0};
  const auto [q_start, q_len, k_start, k_len, seq_coord] = sequence_span(p, tile.seq);
  const int m0 = tile.m_block * kBlockM;
  if (m0 >= q_len) return {0, 0, 0, 0, 0, 0, -1, 0};  // packed: this sequence is shorter than max_seqlen_q
  if constexpr (kBanded) {
    const BlockRange range = sequence_band(q_len, k_len, p.window_left, p.window_right, p.bottom_right)
                                 .key_blocks(m0, kBlockM, kBlockN);
    return {q_start, q_len, k_start, k_len, seq_coord, m0, range.count(), range.first};
  }
  const int key_end = p.causal ? min(k_len, m0 + kBlockM) : k_len;
  const int num_steps = key_end > 0 ? (key_end + kBlockN - 1) / kBlockN : 0;
  return {q_start, q_len, k_start, k_len, seq_coord, m0, num_steps, 0};
}

// S = Q K^T for one key block, and O += P V with V's tile MN-major for that product (keys
// are K, the head dim is N); both issued, not waited for.
template <typename T, int kD>
__device__ __forceinline__ void issue_qk(float (&s)[kBlockN / 2], uint32_t q_address, uint32_t k_address) {
  issue_ss<T, kD, kBlockN>(s, q_address, kPanelBytes, k_address, kPanelBytes);
}
template <typename T, int kD>
__device__ __forceinline__ void issue_pv(float (&o)[kD / 2], const uint32_t (&pa)[kBlockN / 16][4],
                                         uint32_t v_address) {
  issue_rs<T, kD, kBlockN>(o, pa, v_address, kPanelBytes);
}

// Which keys a thread's two rows (row0, row0 + 8) may attend.
struct RowMask {
  const uint8_t* padding;  // this sequence's key padding row, or nullptr
  int64_t padding_stride;
  int k_len, wg_row0, row0;
  bool causal;
  int lane;
};

// The banded kernel's band of a tile's sequence: band.h's SequenceBand, built where it is used
// from the sequence's lengths and the parameter bank (held in registers across the key loop
// instead, its fields pushed the consumers past their 232).
struct BandedRows {
  const ForwardParams& params;
  int q_len;
  __device__ __forceinline__ SequenceBand band(int k_len) const {
    const AttentionProblem& p = params.args.problem;
    return sequence_band(q_len, k_len, p.window_left, p.window_right, p.bottom_right);
  }
};

// Masks S in place and turns it into P = exp2(S scale log2 e - running max) (float32), updating
// the running max and this lane's part of the row sums; alpha is the factor O must take.
// Only blocks that need it are masked: padding, the sequence's end, keys right of a row (the
// banded kernel: keys outside a row's band, band.h's cuts over the warpgroup's 64 rows).
// The scale is folded into the exponent (FA3): the max is taken over the raw scores and scaled
// once a row, which needs scale > 0 (the dispatch keeps other scales on the sm_80 kernels), so
// each element costs one FFMA and one MUFU.EX2. The soft-cap keeps that: it is monotonic, so
// the max of capped scores is the cap of the max.
template <bool kBanded>
__device__ __forceinline__ void online_softmax(float (&s)[kBlockN / 2], int n0, const RowMask& m,
                                               const BandedRows& b, float scale_log2, float (&row_max)[2],
                                               float (&row_sum)[2], float (&alpha)[2]) {
  if constexpr (kBanded) {
    if (b.params.args.problem.softcap > 0.f) {
#pragma unroll
      for (int i = 0; i < kBlockN / 2; ++i) s[i] = b.params.cap_out * tanh_fast(s[i] * b.params.cap_in);
    }
  }
  bool needs_mask;
  if constexpr (kBanded) {
    needs_mask = m.padding != nullptr || b.band(m.k_len).cuts(m.wg_row0, m.wg_row0 + kWgmmaM - 1, n0, kBlockN);
  } else {
    needs_mask = m.padding != nullptr || n0 + kBlockN > m.k_len || (m.causal && n0 + kBlockN - 1 > m.wg_row0);
  }
  if (needs_mask) {
    // The banded kernel: this thread's two rows' key intervals, held only while masking.
    [[maybe_unused]] SequenceBand::KeyInterval keys[2];
    if constexpr (kBanded) {
      const SequenceBand band = b.band(m.k_len);
      keys[0] = band.row_keys(m.row0);
      keys[1] = band.row_keys(m.row0 + 8);
    }
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = n0 + j * 8 + 2 * (m.lane % 4) + c;
        const bool key_ok = key_allowed(m.padding, m.padding_stride, col, m.k_len);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          bool allowed;
          if constexpr (kBanded) {
            allowed = key_ok & keys[r].contains(col);
          } else {
            allowed = key_ok && (!m.causal || col <= m.row0 + 8 * r);
          }
          s[4 * j + 2 * r + c] = allowed ? s[4 * j + 2 * r + c] : -INFINITY;
        }
      }
    }
  }
  // A row with no allowed key so far keeps max -inf; exponentiating against 0 instead keeps
  // exp2(-inf - -inf) = NaN out.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float step_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) step_max = fmaxf(step_max, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
    const float new_max = fmaxf(row_max[r], quad_max(step_max) * scale_log2);  // -inf * scale = -inf
    const float safe_max = new_max == -INFINITY ? 0.f : new_max;
    alpha[r] = exp2_ftz(row_max[r] - safe_max);  // 0 when row_max was -inf
    row_max[r] = new_max;
    row_sum[r] *= alpha[r];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      s[4 * j + 2 * r] = exp2_ftz(fmaf(s[4 * j + 2 * r], scale_log2, -safe_max));
      s[4 * j + 2 * r + 1] = exp2_ftz(fmaf(s[4 * j + 2 * r + 1], scale_log2, -safe_max));
      row_sum[r] += s[4 * j + 2 * r] + s[4 * j + 2 * r + 1];
    }
  }
}

template <int kD> __device__ __forceinline__ void rescale(float (&o)[kD / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < kD / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) o[4 * j + i] *= alpha[i / 2];
  }
}

// Pingpong (FA3 3.1): the two consumer warpgroups take turns issuing their wgmmas, so one's
// softmax runs while the other's products hold the tensor cores. Named barrier 1 + c means
// "consumer c may issue"; each issue phase is bracketed by take() and pass(). Both consumers
// run the same phases (num_steps + 1 a tile, over the same tiles) and consumer 1 grants consumer
// 0 the block's first turn; consumer 0 takes one more turn at the end (finish()) to absorb
// consumer 1's last pass, so every arrival meets its sync and no barrier is left half-arrived.
// pass() has no branch: ptxas serializes every wgmma when a divergent path sits between issue
// and wait.
struct Turns {
  static constexpr int kPingpongThreads = kConsumers * kWarpgroupThreads;
  int consumer;
  __device__ __forceinline__ void grant_first() const {  // consumer 1 lets consumer 0 go first
    if (consumer == 1) named_barrier_arrive_one_of_two<kPingpongBarrier, kPingpongThreads>(false);
  }
  __device__ __forceinline__ void take() const {
    named_barrier_sync_one_of_two<kPingpongBarrier, kPingpongThreads>(consumer != 0);
  }
  __device__ __forceinline__ void pass() const {
    named_barrier_arrive_one_of_two<kPingpongBarrier, kPingpongThreads>(consumer == 0);
  }
  __device__ __forceinline__ void finish() const {
    if (consumer == 0) named_barrier_sync_one_of_two<kPingpongBarrier, kPingpongThreads>(false);
  }
};
static_assert(kConsumers == 2, "the pingpong alternates two consumers");

// The byte of shared memory holding 16-byte chunk `chunk` (0 .. kD / 8 - 1) of row `row` of a
// 128-row tile laid out as TMA writes it: 64-column panels, 128-byte rows, chunks swizzled.
__device__ __forceinline__ int tile_chunk_offset(int row, int chunk) {
  constexpr int kChunksPerSwizzleRow = kSwizzleBytes / kChunkBytes;  // 8
  return (chunk / kChunksPerSwizzleRow) * kPanelBytes + row * kSwizzleBytes +
         ((chunk % kChunksPerSwizzleRow) ^ (row % 8)) * kChunkBytes;
}

// The epilogue's store of one consumer's 64 rows of O / row sum: staged as T in its own 64 rows
// of the Q tile (free: its last Q K^T has completed, and the other consumer's wgmmas read only
// their rows), swizzled as TMA lays tiles out (the 8 rows a warp writes at once hit 8 different
// 16-byte chunks: no bank conflicts), then read back and stored 16 bytes a thread, a warp
// covering whole rows (full 32-byte sectors, where the accumulator layout gives each lane 4
// bytes). Rows at or past `rows` (the sequence's end) are not written. `out`: row 0 of these 64.
template <typename T, int kD>
__device__ __forceinline__ void store_output(const float (&o)[kD / 2], const float (&inverse)[2],
                                             unsigned char* q_tile, int consumer, int lane, int warp, T* out,
                                             int64_t token_stride, int rows) {
  static_assert(kChunkBytes == 8 * sizeof(T), "a chunk is 8 elements");
  fence_proxy_async_shared();  // the rows were Q, written by TMA and read by wgmma (async proxy)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = consumer * kWgmmaM + accumulator_row(lane, warp, r);
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {  // accumulator chunk j = the row's 16-byte chunk j
      *reinterpret_cast<uint32_t*>(q_tile + tile_chunk_offset(row, j) + 4 * (lane % 4)) =
          pack2<T>(o[4 * j + 2 * r] * inverse[r], o[4 * j + 2 * r + 1] * inverse[r]);
    }
  }
  named_barrier_sync_one_of_two<kEpilogueBarrier, kWarpgroupThreads>(consumer != 0);  // this warpgroup only
  constexpr int kChunksPerRow = kD / 8, kChunks = kWgmmaM * kChunksPerRow;
  static_assert(kChunks % kWarpgroupThreads == 0, "whole chunks a thread");
  const int thread = threadIdx.x % kWarpgroupThreads;
#pragma unroll
  for (int i = 0; i < kChunks / kWarpgroupThreads; ++i) {
    const int index = thread + i * kWarpgroupThreads, local_row = index / kChunksPerRow, chunk = index % kChunksPerRow;
    const uint4 value = *reinterpret_cast<const uint4*>(q_tile + tile_chunk_offset(consumer * kWgmmaM + local_row, chunk));
    if (local_row < rows) *reinterpret_cast<uint4*>(out + local_row * token_stride + chunk * 8) = value;
  }
}

// kBanded: the variant for a sliding window, bottom-right alignment or a soft-cap (the band and
// softcap of AttentionProblem, read at run time); the other reads only p.causal.
template <typename T, int kD, bool kBanded>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const __grid_constant__ ForwardParams params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = Shape<kD>;
  constexpr int kQBuffers = S::kQBuffers;
  extern __shared__ unsigned char shared_raw[];
  unsigned char* q_tiles = aligned_shared(shared_raw);
  unsigned char* k_tiles = q_tiles + kQBuffers * S::kTileBytes;
  unsigned char* v_tiles = k_tiles + kStages * S::kTileBytes;
  uint64_t* barriers = reinterpret_cast<uint64_t*>(v_tiles + kStages * S::kTileBytes);
  uint64_t* q_full = barriers;
  uint64_t* q_empty = q_full + kQBuffers;
  uint64_t* k_full = q_empty + kQBuffers;
  uint64_t* v_full = k_full + kStages;
  uint64_t* k_empty = v_full + kStages;
  uint64_t* v_empty = k_empty + kStages;

  const AttentionForwardArgs& args = params.args;
  const AttentionProblem& p = args.problem;
  const TileScheduler& scheduler = params.scheduler;

  if (threadIdx.x == 0) {
    for (int b = 0; b < kQBuffers; ++b) {
      mbarrier_init(&q_full[b], 1);
      mbarrier_init(&q_empty[b], kConsumers * kWarpgroupThreads);  // both consumers stored O out of it
    }
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&k_full[s], 1);
      mbarrier_init(&v_full[s], 1);
      mbarrier_init(&k_empty[s], kConsumers * kWarpgroupThreads);  // every consumer thread arrives
      mbarrier_init(&v_empty[s], kConsumers * kWarpgroupThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // ---- producer ----
    release_registers<kProducerRegisters>();
    if (threadIdx.x == 0) {
      prefetch_tensor_map(&params.q_map);
      prefetch_tensor_map(&params.k_map);
      prefetch_tensor_map(&params.v_map);
      int step_base = 0, tile_count = 0;  // run on across tiles: slots, buffers and parities
      for (int round = 0;; ++round) {
        const int index = scheduler.linear(blockIdx.x, round);
        if (index >= scheduler.tiles()) break;
        const ForwardTile tile = scheduler.tile(index);
        const TileSpan t = tile_span<kBanded>(p, tile);
        if (t.num_steps < 0) continue;
        const int kv_head = tile.head / p.group_size;
        const int buffer = tile_count % kQBuffers;
        mbarrier_wait(&q_empty[buffer], ((tile_count / kQBuffers) & 1) ^ 1);  // O of its last tile is out
        mbarrier_arrive_expect_tx(&q_full[buffer], S::kTileBytes);
#pragma unroll
        for (int panel = 0; panel < S::kPanels; ++panel) {
          tma_load_4d(q_tiles + buffer * S::kTileBytes + panel * kPanelBytes, &params.q_map, &q_full[buffer],
                      panel * kPanelColumns, t.q_start + t.m0, tile.head, t.seq_coord);
        }
        for (int step = 0; step < t.num_steps; ++step) {
          const int global = step_base + step, slot = global % kStages;
          const uint32_t parity = (global / kStages) & 1;
          const int token = t.k_start + (kBanded ? t.n_first + step : step) * kBlockN;
          mbarrier_wait(&k_empty[slot], parity ^ 1);
          mbarrier_arrive_expect_tx(&k_full[slot], S::kTileBytes);
#pragma unroll
          for (int panel = 0; panel < S::kPanels; ++panel) {
            tma_load_4d(k_tiles + slot * S::kTileBytes + panel * kPanelBytes, &params.k_map, &k_full[slot],
                        panel * kPanelColumns, token, kv_head, t.seq_coord);
          }
          mbarrier_wait(&v_empty[slot], parity ^ 1);
          mbarrier_arrive_expect_tx(&v_full[slot], S::kTileBytes);
#pragma unroll
          for (int panel = 0; panel < S::kPanels; ++panel) {
            tma_load_4d(v_tiles + slot * S::kTileBytes + panel * kPanelBytes, &params.v_map, &v_full[slot],
                        panel * kPanelColumns, token, kv_head, t.seq_coord);
          }
        }
        step_base += t.num_steps;
        ++tile_count;
      }
    }
    return;  // every load issued is waited for by the consumers, so none outlives the block
  }

  // ---- consumers ----
  claim_registers<kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  const float scale_log2 = p.scale * kLog2e;
  const auto k_address = [&](int slot) { return smem_u32(k_tiles + slot * S::kTileBytes); };
  const auto v_address = [&](int slot) { return smem_u32(v_tiles + slot * S::kTileBytes); };
  // The pingpong runs on across tiles: per tile each consumer has the same num_steps + 1 phases,
  // so consumer 0 takes the first phase of every tile from consumer 1's last pass of the one
  // before. Consumer 1 grants once, before its first phase, and consumer 0 finishes once, after
  // its last: a grant per tile could reach barrier 1 before consumer 0's finish of the tile
  // before (the next Q is already in with two buffers) and complete it with consumer 1 alone.
  const Turns turns{consumer};
  bool any_phase = false;
  int step_base = 0, tile_count = 0;
  for (int round = 0;; ++round) {
    const int index = scheduler.linear(blockIdx.x, round);
    if (index >= scheduler.tiles()) break;
    const ForwardTile tile = scheduler.tile(index);
    const TileSpan t = tile_span<kBanded>(p, tile);
    if (t.num_steps < 0) continue;
    const int head = tile.head, seq = tile.seq, num_steps = t.num_steps;
    const int buffer = tile_count % kQBuffers;
    unsigned char* q_tile = q_tiles + buffer * S::kTileBytes;
    const int wg_row0 = t.m0 + consumer * 64;         // first query row of this warpgroup
    const int row0 = wg_row0 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
    const uint8_t* const padding =
        p.key_padding == nullptr ? nullptr : p.key_padding + seq * p.key_padding_seq_stride;
    const RowMask mask{padding, p.key_padding_token_stride, t.k_len, wg_row0, row0, p.causal, lane};
    const BandedRows banded{params, t.q_len};
    const int n_first = kBanded ? t.n_first * kBlockN : 0;  // the first key block's first key
    float o[kD / 2];
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY};  // log2 units; -inf while no key was allowed
    float row_sum[2] = {0.f, 0.f};              // this lane's part; the quad's sum at the end
    float s[kBlockN / 2], alpha[2];
    uint32_t pa[kBlockN / 16][4];

    const uint32_t q_address = smem_u32(q_tile) + consumer * kConsumerRowBytes;  // 8 KiB: stays atom-aligned
    mbarrier_wait(&q_full[buffer], (tile_count / kQBuffers) & 1);

    // Intra-warpgroup overlap (FA3 3.2, Algorithm 2): block j's P V is issued right after block
    // j + 1's Q K^T, and the softmax of block j + 1 runs while P V is still on the tensor cores.
    // O is rescaled (and P repacked) only once that P V has completed. Steps are numbered
    // across the block's tiles (step_base), as the producer numbers them.
    if (num_steps > 0 && !any_phase) turns.grant_first();
    if (num_steps > 0) {
      any_phase = true;
      const int slot = step_base % kStages;
      mbarrier_wait(&k_full[slot], (step_base / kStages) & 1);
      turns.take();
      wgmma_fence();
      issue_qk<T, kD>(s, q_address, k_address(slot));
      turns.pass();
      wgmma_wait<0>();
      fence_registers(s);
      mbarrier_arrive(&k_empty[slot]);  // S is complete: K's slot may refill
      // alpha unused: O is 0
      online_softmax<kBanded>(s, n_first, mask, banded, scale_log2, row_max, row_sum, alpha);
      pack_a<T, kBlockN>(s, pa);
    }
    for (int step = 1; step < num_steps; ++step) {
      const int global = step_base + step, slot = global % kStages, prev = (global - 1) % kStages;
      mbarrier_wait(&k_full[slot], (global / kStages) & 1);
      mbarrier_wait(&v_full[prev], ((global - 1) / kStages) & 1);
      turns.take();
      wgmma_fence();  // orders the writes of o and pa above before the wgmmas read them
      issue_qk<T, kD>(s, q_address, k_address(slot));
      issue_pv<T, kD>(o, pa, v_address(prev));
      turns.pass();
      wgmma_wait<1>();  // groups complete in order: S is ready, P V may still run
      fence_registers(s);
      mbarrier_arrive(&k_empty[slot]);  // S is complete: K's slot may refill
      online_softmax<kBanded>(s, n_first + step * kBlockN, mask, banded, scale_log2, row_max, row_sum, alpha);
      wgmma_wait<0>();
      fence_registers(o);
      fence_registers(pa);  // pa stays allocated until P V has read it
      mbarrier_arrive(&v_empty[prev]);  // this thread no longer reads that V
      rescale<kD>(o, alpha);
      pack_a<T, kBlockN>(s, pa);
    }
    if (num_steps > 0) {
      const int last = step_base + num_steps - 1, slot = last % kStages;
      mbarrier_wait(&v_full[slot], (last / kStages) & 1);
      turns.take();
      wgmma_fence();
      issue_pv<T, kD>(o, pa, v_address(slot));
      turns.pass();
      wgmma_wait<0>();
      fence_registers(o);
      fence_registers(pa);
      mbarrier_arrive(&v_empty[slot]);
    }

    // Fully masked rows have sum 0: output 0 and lse = -inf, as the reference's safe softmax.
    float inverse[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(row_sum[r]);
      inverse[r] = sum == 0.f ? 0.f : 1.f / sum;
      const int row = row0 + 8 * r;
      if (row < t.q_len && lane % 4 == 0) {
        args.lse[seq * args.lse_strides.seq + head * args.lse_strides.head +
                 static_cast<int64_t>(t.q_start + row) * args.lse_strides.token] =
            sum == 0.f ? -INFINITY : (row_max[r] + log2f(sum)) * kLn2;
      }
    }
    T* out = static_cast<T*>(args.out) + seq * args.out_strides.seq + head * args.out_strides.head +
             static_cast<int64_t>(t.q_start + wg_row0) * args.out_strides.token;
    store_output<T, kD>(o, inverse, q_tile, consumer, lane, warp, out, args.out_strides.token, t.q_len - wg_row0);
    // The read-backs above are generic-proxy reads of rows the next TMA load (async proxy)
    // overwrites: fence them before q_empty hands the buffer back to the producer.
    fence_proxy_async_shared();
    mbarrier_arrive(&q_empty[buffer]);
    step_base += num_steps;
    ++tile_count;
  }
  if (any_phase) turns.finish();
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// Builds the tensor maps and launches (host side; the kernel was compiled for sm_90a).
template <typename T, int kD>
cudaError_t run_forward(const AttentionForwardArgs& args, DType dtype, cudaStream_t stream) {
  const AttentionProblem& p = args.problem;
  const int64_t m_blocks = (p.max_seqlen_q + kBlockM - 1) / kBlockM;
  if (m_blocks == 0 || p.num_heads == 0 || p.num_seqs == 0) return cudaSuccess;
  // The tile scheduler counts tiles in int (tile_scheduler.h); two per causal unit.
  if (2 * (m_blocks + 1) * p.num_heads * p.num_seqs > INT32_MAX) return cudaErrorInvalidConfiguration;
  int device = 0, sms = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess) {
    return e;
  }
  ForwardParams params{};
  params.args = args;
  const int pairs = p.num_heads * p.num_seqs;
  TileScheduler& scheduler = params.scheduler;
  scheduler.m_blocks = static_cast<int>(m_blocks);
  scheduler.heads = p.num_heads;
  scheduler.seqs = p.num_seqs;
  scheduler.section_heads = section_heads_for(p.max_seqlen_k, kD, pairs);
  // The banded kernel pairs query blocks only where its band makes their costs grow with the
  // index (tile_scheduler.h); either way every tile runs once.
  const bool banded = attention_has_band_or_softcap(p);
  scheduler.causal = banded ? pair_query_blocks(p.window_left, p.window_right) : (p.causal ? 1 : 0);
  const bool packed = p.cu_seqlens_q != nullptr;
  // Persistent (one block an SM) where the static order can balance the work: equal-length
  // sequences. Packed sequences' lengths are on the device (reading cu_seqlens here would sync),
  // so there every block runs one unit and the hardware hands blocks to the SMs that free first,
  // as before the persistent grid (same kernel, same order).
  scheduler.grid = packed || scheduler.units() < sms ? scheduler.units() : sms;
  const int seqs = packed ? 1 : p.num_seqs, kv_heads = p.num_heads / p.group_size;
  if (cudaError_t e = make_tile_map(&params.q_map, dtype, p.q, p.q_strides, p.q_tokens, p.num_heads, seqs, kD);
      e != cudaSuccess) {
    return e;
  }
  if (cudaError_t e = make_tile_map(&params.k_map, dtype, p.k, p.k_strides, p.k_tokens, kv_heads, seqs, kD);
      e != cudaSuccess) {
    return e;
  }
  if (cudaError_t e = make_tile_map(&params.v_map, dtype, p.v, p.v_strides, p.k_tokens, kv_heads, seqs, kD);
      e != cudaSuccess) {
    return e;
  }
  auto kernel = banded ? forward_kernel<T, kD, true> : forward_kernel<T, kD, false>;
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape<kD>::kSmemBytes);
      e != cudaSuccess) {
    return e;
  }
  params.cap_in = p.softcap > 0.f ? p.scale / p.softcap : 0.f;
  params.cap_out = p.softcap > 0.f ? p.softcap / p.scale : 0.f;
  kernel<<<scheduler.grid, kThreads, Shape<kD>::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace attention_sm90
}  // namespace tformer
