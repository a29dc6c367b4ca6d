// Flash attention backward for Hopper (sm_90a): the sm_80 backward's two passes
// (FlashAttention-2, Dao 2023, Algorithm 2 split as in its Section 3.2: no atomics,
// deterministic) rebuilt on the forward's machinery: TMA tile loads into an mbarrier ring,
// one producer warpgroup and two consumer warpgroups issuing wgmma (forward_sm90.cuh).
//
//   key_grad_kernel    a block owns 128 keys of a (sequence, kv head), 64 per consumer, with
//                      their K and V tiles loaded once; it streams query steps (128 rows at
//                      head dim 64, 64 at 128: grad_step) of Q, dO, lse and delta over
//                      every query head of the group (grouped-query
//                      attention) and accumulates in registers
//                        S^T = K Q^T,  dP^T = V dO^T             (both operands in shared memory)
//                        P^T = exp2(S^T scale log2 e - lse),  dS^T = P^T (dP^T - delta)
//                        dV += P^T dO,  dK += dS^T Q             (P^T, dS^T from registers)
//   query_grad_kernel  a block owns 128 query rows of a (sequence, head), 64 per consumer,
//                      with their Q and dO tiles loaded once; it streams key steps of K
//                      and V (the same sizes) and accumulates dQ += dS K.
//
// One pass (args.dq_accum set; FlashAttention-3's backward, Shah et al. 2024, Algorithm 3):
// key_grad_kernel<..., kAtomicDq = true> also stages each step's dS^T in shared memory and
// computes that step's dQ part, dQ (step x D) = dS (step x 64 keys) K (64 keys x D), adding it
// to a float32 workspace with atomics; convert_dq_kernel then writes dq. 5 products a tile
// instead of 7, in an order that varies from run to run (float32 sums: not bitwise
// reproducible). The two passes stay the deterministic choice.
//
// Every product is one of the forward's two shapes (products.cuh): K-major x K-major from
// shared memory, or register A x MN-major B; the accumulator of S^T (keys x queries) is the
// A fragment of P^T as S's is of P in the forward.
// What FA3's backward adds and this does not (yet): the elementwise work of one step overlapped
// with the next step's products; bench/KERNEL_NOTES.md, sections c90b and c90c (fix 4), have
// the predictions.
//
// Banded variants (kBanded: a sliding window, bottom-right alignment or a soft-cap; band.h):
// the dK/dV pass visits only the query steps whose rows' bands reach its keys, the dQ pass only
// the key steps that meet its rows' bands; dS takes the soft-cap's derivative 1 - tanh^2.
//
// Semantics are the sm_80 backward's (csrc/attention/attention_bwd.cuh): masked scores give
// P = 0, a fully masked query row (lse = -inf) is measured against 0 with all its scores
// masked, so its gradients are 0; rows outside a sequence are not written.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

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

// kGradBlock (rows a block owns: keys in the dK/dV pass, queries in the dQ pass) and
// kGradStages are in contracts.h.
constexpr int kBlockPanelBytes = kGradBlock * 128;  // a 128-row panel of 128-byte rows

// Rows a pipeline step streams: queries (dK/dV pass) or keys (dQ pass). At head dim 64 the
// dK/dV accumulators are small enough for 128-row steps (S^T, dP^T: 64 registers each), which
// halve the steps' barrier and staging overhead and run wgmma at N = 128; at 128, 64-row steps
// keep dK, dV (64 each), S^T and dP^T within the consumers' registers. (FA3's backward picks
// the same query-block sizes.)
constexpr int grad_step(int head_dim) { return head_dim <= kGradStepSmallHeadDim ? kGradStepSmall : kGradStepLarge; }

template <int kD> struct GradShape {
  static_assert(kD % kPanelColumns == 0, "head dim must be a multiple of 64");
  static constexpr int kStep = grad_step(kD);
  static constexpr int kPanels = kD / kPanelColumns;
  static constexpr int kStepPanelBytes = kStep * 128;
  static constexpr int kBlockTileBytes = kPanels * kBlockPanelBytes;
  static constexpr int kStepTileBytes = kPanels * kStepPanelBytes;
  static constexpr int kStepFloatBytes = 2 * kStep * 4;  // a query step's lse and delta (dK/dV pass)
  static constexpr int kBarrierBytes = 64;
  // Two block tiles, kGradStages x (two step tiles + lse/delta), barriers, slack to align the
  // base to 1024 bytes (every tile 1024-aligned: the swizzle's period).
  static constexpr int kSmemBytes =
      2 * kBlockTileBytes + kGradStages * (2 * kStepTileBytes + kStepFloatBytes) + kBarrierBytes + kSwizzleAtomBytes;
  // Contracts a hang or a wrong value would break, checked at build time.
  static_assert(kGradBarrierBytes <= kBarrierBytes, "the barriers overflow their bytes");
  static_assert(kSmemBytes <= kMaxSharedBytes, "over Hopper's 227 KiB of shared memory a block");
  static_assert(kBlockTileBytes % kSwizzleAtomBytes == 0 && kStepTileBytes % kSwizzleAtomBytes == 0,
                "every tile starts on a swizzle atom (1024 B); lse and delta follow the tiles");
  static_assert(2 * kBlockTileBytes <= kMaxTransactionBytes && 2 * kStepTileBytes <= kMaxTransactionBytes,
                "a phase's TMA bytes exceed the mbarrier tx-count");
  static_assert(kBlockPanelBytes < kDescriptorFieldLimit && kStepPanelBytes < kDescriptorFieldLimit,
                "an MN-major panel offset (LBO) overflows its descriptor field");
  static_assert(kStep <= kWarpgroupThreads, "one producer thread stages each step row's lse and delta");
  // One pass: each consumer's dS^T staging buffer (64 key rows x kStep queries, in 64-query
  // panels) after lse and delta, which end on a swizzle atom.
  static constexpr int kStageBytes = kStep / kPanelColumns * kGradStagePanelBytes;
  static constexpr int kOnePassSmemBytes = kSmemBytes + kConsumers * kStageBytes;
  static_assert(kOnePassSmemBytes <= kMaxSharedBytes, "one pass: over Hopper's 227 KiB of shared memory a block");
  static_assert((2 * kBlockTileBytes + kGradStages * (2 * kStepTileBytes + kStepFloatBytes)) % kSwizzleAtomBytes == 0 &&
                    kStageBytes % kSwizzleAtomBytes == 0,
                "every dS^T staging panel starts on a swizzle atom (1024 B)");
  static_assert(kStep % kPanelColumns == 0 && kGradStagePanelBytes < kDescriptorFieldLimit,
                "whole 64-query staging panels; their offset fits the descriptor");
};

struct BackwardParams {
  AttentionBackwardArgs args;
  CUtensorMap q_map, k_map, v_map, dout_map;  // block-tile maps: 128-row boxes; step-tile maps: 64
  // The banded kernels' soft-cap in raw units, from the host (forward_sm90.cuh's ForwardParams).
  float cap_in, cap_out;
};

// The banded kernels' band of a sequence (band.h), from its lengths and the parameter bank.
__device__ __forceinline__ SequenceBand problem_band(const AttentionProblem& p, const SequenceSpan& span) {
  return sequence_band(span.q_len, span.k_len, p.window_left, p.window_right, p.bottom_right);
}

// The banded kernels' soft-cap of a step's raw scores (S or S^T), in place: s -> tanh(s cap_in),
// so the elementwise step takes the capped score as t cap_out and dS's factor as 1 - t^2 (the
// sm_80 backward's ScoreMap); a uniform branch outside the element loop, so a band without a
// soft-cap pays no MUFU for it.
template <int kN>
__device__ __forceinline__ void soft_cap_tanh(float (&s)[kN], const BackwardParams& params) {
  if (params.args.problem.softcap > 0.f) {
#pragma unroll
    for (int i = 0; i < kN; ++i) s[i] = tanh_fast(s[i] * params.cap_in);
  }
}

// From soft_cap_tanh's output: the capped score in raw units, and dS's factor.
struct CappedScore {
  float score, slope;
};
__device__ __forceinline__ CappedScore capped_score(float s, const BackwardParams& params) {
  const bool capped = params.args.problem.softcap > 0.f;
  return {capped ? s * params.cap_out : s, capped ? fmaf(-s, s, 1.f) : 1.f};
}

// lse in log2 units, measured against 0 for fully masked rows (lse = -inf) and rows past the
// sequence, whose scores are all masked anyway.
__device__ __forceinline__ float lse_log2(const AttentionBackwardArgs& args, int seq, int head, int token, bool valid) {
  if (!valid) return 0.f;
  const float lse = args.lse[seq * args.lse_strides.seq + head * args.lse_strides.head +
                             static_cast<int64_t>(token) * args.lse_strides.token];
  return lse == -INFINITY ? 0.f : lse * kLog2e;
}

__device__ __forceinline__ float delta_at(const AttentionBackwardArgs& args, int seq, int head, int token, bool valid) {
  return valid ? args.delta[seq * args.lse_strides.seq + head * args.lse_strides.head +
                            static_cast<int64_t>(token) * args.lse_strides.token]
               : 0.f;
}

// Rows row0 and row0 + 8 of an accumulator (64 x kD) to a (token, dim) slab, times `factor`;
// rows at or past `rows` are not written.
template <typename T, int kD>
__device__ __forceinline__ void store_rows(const float (&c)[kD / 2], T* base, int64_t token_stride, int row0,
                                           int rows, float factor, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row >= rows) continue;
    T* out = base + static_cast<int64_t>(row) * token_stride;
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      *reinterpret_cast<uint32_t*>(out + accumulator_column(lane, j, 0)) =
          pack2<T>(c[4 * j + 2 * r] * factor, c[4 * j + 2 * r + 1] * factor);
    }
  }
}

// One pass: rows row0 and row0 + 8 of a dQ part (64 x kD) added, times `factor`, to the float32
// workspace (two floats an atomic: red.global.add.v2.f32); rows at or past `rows` are skipped.
template <int kD>
__device__ __forceinline__ void add_rows(const float (&c)[kD / 2], float* base, int64_t token_stride, int row0,
                                         int rows, float factor, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row >= rows) continue;
    float* out = base + static_cast<int64_t>(row) * token_stride;
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      atomicAdd(reinterpret_cast<float2*>(out + accumulator_column(lane, j, 0)),
                make_float2(c[4 * j + 2 * r] * factor, c[4 * j + 2 * r + 1] * factor));
    }
  }
}

// One pass: a consumer's dS^T (its 64 keys x kStep queries), already packed to 16 bits as the A
// fragments of dK += dS^T Q, into its staging buffer: 64-query panels of 64 key rows x 128 bytes,
// the 16-byte chunk c of key row r at chunk c ^ (r % 8), as TMA writes a 128-byte-swizzled tile,
// so that the dQ product reads it through an MN-major descriptor like any loaded tile. Fragment
// word (t, i) holds elements 4 j + 2 r + {0, 1} with j = 2 t + i / 2, r = i % 2: key
// accumulator_row(r), queries accumulator_column(j, 0) and the next one (one 4-byte store).
// A warp's 32 stores of one (t, i) hit 8 key rows (distinct r % 8) x 4 words of one chunk: 32
// banks, no conflict.
template <int kStep>
__device__ __forceinline__ void stage_transposed(const uint32_t (&ds)[kStep / 16][4], unsigned char* stage,
                                                 int lane, int warp) {
#pragma unroll
  for (int t = 0; t < kStep / 16; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = accumulator_row(lane, warp, i % 2), query = accumulator_column(lane, 2 * t + i / 2, 0);
      const int column = query % kPanelColumns, chunk = column / 8;
      const int offset = query / kPanelColumns * kGradStagePanelBytes + key * kSwizzleBytes +
                         ((chunk ^ (key % 8)) * 16) + (column % 8) * kElementBytes;
      *reinterpret_cast<uint32_t*>(stage + offset) = ds[t][i];
    }
  }
}

__device__ __forceinline__ void prefetch_maps(const BackwardParams& params) {
  prefetch_tensor_map(&params.q_map);
  prefetch_tensor_map(&params.dout_map);
  prefetch_tensor_map(&params.k_map);
  prefetch_tensor_map(&params.v_map);
}

// Two tiles of the same rows (K and V, or Q and dO), each kPanels panels `panel_bytes` apart,
// onto one barrier (whose arrive_expect_tx the caller has made).
template <int kPanels>
__device__ __forceinline__ void load_tile_pair(unsigned char* first, const CUtensorMap* first_map,
                                               unsigned char* second, const CUtensorMap* second_map,
                                               uint64_t* barrier, int panel_bytes, int token, int head, int coord) {
#pragma unroll
  for (int panel = 0; panel < kPanels; ++panel) {
    tma_load_4d(first + panel * panel_bytes, first_map, barrier, panel * kPanelColumns, token, head, coord);
    tma_load_4d(second + panel * panel_bytes, second_map, barrier, panel * kPanelColumns, token, head, coord);
  }
}

// A step's two score products, awaited: s = A_s B_s^T and dp = A_dp B_dp^T (S and dP, or
// their transposes), the A tiles of block rows, the B tiles of step rows.
template <typename T, int kD, int kStep = GradShape<kD>::kStep>
__device__ __forceinline__ void scores_and_output_grads(float (&s)[kStep / 2], float (&dp)[kStep / 2], uint32_t s_a,
                                                        uint32_t dp_a, uint32_t s_b, uint32_t dp_b) {
  wgmma_fence();
  issue_ss<T, kD, kStep>(s, s_a, kBlockPanelBytes, s_b, GradShape<kD>::kStepPanelBytes);
  issue_ss<T, kD, kStep>(dp, dp_a, kBlockPanelBytes, dp_b, GradShape<kD>::kStepPanelBytes);
  wgmma_wait<0>();
  fence_registers(s);
  fence_registers(dp);
}

// kBanded: the variant for a sliding window, bottom-right alignment or a soft-cap (band.h, read at
// run time); the other reads only p.causal.
template <typename T, int kD, bool kAtomicDq, bool kBanded>
__global__ void __launch_bounds__(kThreads, 1) key_grad_kernel(const __grid_constant__ BackwardParams params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = GradShape<kD>;
  extern __shared__ unsigned char shared_raw[];
  unsigned char* k_tile = aligned_shared(shared_raw);
  unsigned char* v_tile = k_tile + S::kBlockTileBytes;
  unsigned char* q_tiles = v_tile + S::kBlockTileBytes;
  unsigned char* dout_tiles = q_tiles + kGradStages * S::kStepTileBytes;
  float* lse_steps = reinterpret_cast<float*>(dout_tiles + kGradStages * S::kStepTileBytes);
  float* delta_steps = lse_steps + kGradStages * S::kStep;
  // One pass: the consumers' dS^T staging buffers, then the barriers (two passes: no buffers).
  unsigned char* ds_stages = reinterpret_cast<unsigned char*>(delta_steps + kGradStages * S::kStep);
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(ds_stages + (kAtomicDq ? kConsumers * S::kStageBytes : 0));
  uint64_t* step_full = kv_full + 1;
  uint64_t* step_empty = step_full + kGradStages;

  const AttentionBackwardArgs& args = params.args;
  const AttentionProblem& p = args.problem;
  const int n0 = blockIdx.x * kGradBlock, kv_head = blockIdx.y, seq = blockIdx.z;
  const SequenceSpan span = sequence_span(p, seq);
  if (n0 >= span.k_len) return;  // packed: this sequence is shorter than max_seqlen_k
  // Causal (top-left): query i sees keys j <= i, so query steps wholly above the block are skipped.
  // Banded: the query steps whose rows' bands reach the block's keys.
  int m_first = p.causal ? n0 / S::kStep : 0;
  int per_head = max(0, (span.q_len + S::kStep - 1) / S::kStep - m_first);
  if constexpr (kBanded) {
    const BlockRange range = problem_band(p, span).query_blocks(n0, kGradBlock, S::kStep);
    m_first = range.first;
    per_head = range.count();
  }
  const int num_steps = per_head * p.group_size;  // heads of the group in order, then query steps

  if (threadIdx.x == 0) {
    mbarrier_init(kv_full, 1);
    for (int s = 0; s < kGradStages; ++s) {
      mbarrier_init(&step_full[s], S::kStep);  // the producer threads writing lse and delta, one a row
      mbarrier_init(&step_empty[s], 2 * 128);   // every consumer thread
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // ---- producer: thread 0 issues the TMA loads, one thread a row stages lse, delta ----
    release_registers<kBanded ? kBandedProducerRegisters : kProducerRegisters>();
    const int t = threadIdx.x;
    if (t >= S::kStep) return;
    if (t == 0 && num_steps > 0) {
      prefetch_maps(params);
      mbarrier_arrive_expect_tx(kv_full, 2 * S::kBlockTileBytes);
      load_tile_pair<S::kPanels>(k_tile, &params.k_map, v_tile, &params.v_map, kv_full, kBlockPanelBytes,
                                 span.k_start + n0, kv_head, span.coord);
    }
    for (int step = 0; step < num_steps; ++step) {
      const int slot = step % kGradStages;
      const int head = kv_head * p.group_size + step / per_head, m0 = (m_first + step % per_head) * S::kStep;
      mbarrier_wait(&step_empty[slot], ((step / kGradStages) & 1) ^ 1);
      const int row = m0 + t;
      lse_steps[slot * S::kStep + t] = lse_log2(args, seq, head, span.q_start + row, row < span.q_len);
      delta_steps[slot * S::kStep + t] = delta_at(args, seq, head, span.q_start + row, row < span.q_len);
      if (t != 0) {
        mbarrier_arrive(&step_full[slot]);  // releases this thread's lse and delta
        continue;
      }
      mbarrier_arrive_expect_tx(&step_full[slot], 2 * S::kStepTileBytes);
      load_tile_pair<S::kPanels>(q_tiles + slot * S::kStepTileBytes, &params.q_map,
                                 dout_tiles + slot * S::kStepTileBytes, &params.dout_map, &step_full[slot],
                                 S::kStepPanelBytes, span.q_start + m0, head, span.coord);
    }
    return;  // every load issued is waited for by the consumers, so none outlives the block
  }

  // ---- consumers: 64 keys each ----
  claim_registers<kBanded ? kBandedConsumerRegisters : kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  const int wg_key0 = n0 + consumer * 64;
  const int key0 = wg_key0 + accumulator_row(lane, warp, 0);  // this thread's keys: key0, key0 + 8
  const uint8_t* const padding = p.key_padding == nullptr ? nullptr : p.key_padding + seq * p.key_padding_seq_stride;
  const bool key_ok[2] = {key_allowed(padding, p.key_padding_token_stride, key0, span.k_len),
                          key_allowed(padding, p.key_padding_token_stride, key0 + 8, span.k_len)};
  const float scale_log2 = p.scale * kLog2e;
  const uint32_t k_address = smem_u32(k_tile) + consumer * kConsumerRowBytes;  // 8 KiB: stays atom-aligned
  const uint32_t v_address = smem_u32(v_tile) + consumer * kConsumerRowBytes;
  unsigned char* const ds_stage = ds_stages + consumer * S::kStageBytes;  // one pass only

  // The banded kernel: the queries whose bands hold key0 (key0 + 8's are 8 rows later): two
  // registers for the whole kernel, where the band's bounds would take more (ptxas spilled).
  [[maybe_unused]] SequenceBand::KeyInterval rows;
  if constexpr (kBanded) rows = problem_band(p, span).key_rows(key0);

  float dk[kD / 2], dv[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) dk[i] = dv[i] = 0.f;
  if (num_steps > 0) mbarrier_wait(kv_full, 0);
  for (int step = 0; step < num_steps; ++step) {
    const int slot = step % kGradStages, m0 = (m_first + step % per_head) * S::kStep;
    const uint32_t q_address = smem_u32(q_tiles + slot * S::kStepTileBytes);
    const uint32_t dout_address = smem_u32(dout_tiles + slot * S::kStepTileBytes);
    float s[S::kStep / 2], dp[S::kStep / 2];
    mbarrier_wait(&step_full[slot], (step / kGradStages) & 1);
    scores_and_output_grads<T, kD>(s, dp, k_address, v_address, q_address, dout_address);
    if constexpr (kBanded) soft_cap_tanh(s, params);
    // Element 4 j + 2 r + c: key key0 + 8 r, query m0 + column (j, c).
#pragma unroll
    for (int j = 0; j < S::kStep / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int column = accumulator_column(lane, j, c), query = m0 + column;
        const float lse = lse_steps[slot * S::kStep + column], delta = delta_steps[slot * S::kStep + column];
        const bool query_ok = query < span.q_len;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = 4 * j + 2 * r + c;
          // exp2f, not exp2_ftz as the dQ pass: with it ptxas spills 10 bytes at head dim 64 (bf16).
          if constexpr (kBanded) {
            const bool allowed = key_ok[r] & query_ok & rows.contains(query - 8 * r);
            const CappedScore capped = capped_score(s[i], params);
            const float probability = allowed ? exp2f(capped.score * scale_log2 - lse) : 0.f;
            s[i] = probability;
            dp[i] = probability * (dp[i] - delta) * capped.slope;
          } else {
            const bool allowed = key_ok[r] && query_ok && (!p.causal || key0 + 8 * r <= query);
            const float probability = allowed ? exp2f(s[i] * scale_log2 - lse) : 0.f;
            s[i] = probability;
            dp[i] = probability * (dp[i] - delta);
          }
        }
      }
    }
    uint32_t pa[S::kStep / 16][4], dsa[S::kStep / 16][4];
    pack_a<T, S::kStep>(s, pa);
    pack_a<T, S::kStep>(dp, dsa);
    if constexpr (kAtomicDq) {
      // dS^T to shared memory for dQ = dS K below. The buffer's last reader is the previous
      // step's dQ product, which each warp saw complete (wgmma_wait<0>); the sync makes that
      // hold for all 4 warps before any of them overwrites rows the others' part of it read.
      named_barrier_sync_one_of_two<kGradStageBarrier, kWarpgroupThreads>(consumer == 1);
      stage_transposed<S::kStep>(dsa, ds_stage, lane, warp);
      fence_proxy_async_shared();  // the generic stores, visible to wgmma's reads (async proxy)
      named_barrier_sync_one_of_two<kGradStageBarrier, kWarpgroupThreads>(consumer == 1);  // all 4 warps' stores
    }
    wgmma_fence();  // orders the fragment writes before the wgmmas read them
    issue_rs<T, kD, S::kStep>(dv, pa, dout_address, S::kStepPanelBytes);
    issue_rs<T, kD, S::kStep>(dk, dsa, q_address, S::kStepPanelBytes);
    wgmma_wait<0>();
    fence_registers(dv);
    fence_registers(dk);
    fence_registers(pa);  // the fragments stay allocated until the wgmmas have read them
    fence_registers(dsa);
    mbarrier_arrive(&step_empty[slot]);  // this thread no longer reads that slot
    if constexpr (kAtomicDq) {
      // dQ (step x D) = dS (step x 64 keys) K (64 keys x D), one m64 product per 64 queries,
      // after dV and dK have completed: S^T, dP^T and the fragments are dead by now, so the
      // peak stays at dK + dV + dQ registers.
      const int head = kv_head * p.group_size + step / per_head;
      float dq[S::kStep / kWgmmaM][kD / 2];
      wgmma_fence();
#pragma unroll
      for (int part = 0; part < S::kStep / kWgmmaM; ++part) {
        issue_ss_mn<T, kD>(dq[part], smem_u32(ds_stage) + part * kGradStagePanelBytes, kGradStagePanelBytes,
                           k_address, kBlockPanelBytes);
      }
      wgmma_wait<0>();
#pragma unroll
      for (int part = 0; part < S::kStep / kWgmmaM; ++part) fence_registers(dq[part]);
      float* const dq_base = args.dq_accum + seq * args.dq_accum_strides.seq + head * args.dq_accum_strides.head +
                             static_cast<int64_t>(span.q_start) * args.dq_accum_strides.token;
#pragma unroll
      for (int part = 0; part < S::kStep / kWgmmaM; ++part) {
        add_rows<kD>(dq[part], dq_base, args.dq_accum_strides.token,
                     m0 + part * kWgmmaM + accumulator_row(lane, warp, 0), span.q_len, p.scale, lane);
      }
    }
  }

  const int64_t key_offset = static_cast<int64_t>(span.k_start) * args.dk_strides.token;
  store_rows<T, kD>(dk, static_cast<T*>(args.dk) + seq * args.dk_strides.seq + kv_head * args.dk_strides.head +
                            key_offset,
                    args.dk_strides.token, key0, span.k_len, p.scale, lane);
  store_rows<T, kD>(dv, static_cast<T*>(args.dv) + seq * args.dv_strides.seq + kv_head * args.dv_strides.head +
                            static_cast<int64_t>(span.k_start) * args.dv_strides.token,
                    args.dv_strides.token, key0, span.k_len, 1.f, lane);
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <typename T, int kD, bool kBanded>
__global__ void __launch_bounds__(kThreads, 1) query_grad_kernel(const __grid_constant__ BackwardParams params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = GradShape<kD>;
  extern __shared__ unsigned char shared_raw[];
  unsigned char* q_tile = aligned_shared(shared_raw);
  unsigned char* dout_tile = q_tile + S::kBlockTileBytes;
  unsigned char* k_tiles = dout_tile + S::kBlockTileBytes;
  unsigned char* v_tiles = k_tiles + kGradStages * S::kStepTileBytes;
  uint64_t* q_full = reinterpret_cast<uint64_t*>(v_tiles + kGradStages * S::kStepTileBytes);
  uint64_t* kv_full = q_full + 1;
  uint64_t* kv_empty = kv_full + kGradStages;

  const AttentionBackwardArgs& args = params.args;
  const AttentionProblem& p = args.problem;
  // Causal: the last query blocks have the most keys; start them first (banded: where the band
  // makes the key blocks grow with the query block, tile_scheduler.h's pair_query_blocks).
  const bool longest_first = kBanded ? pair_query_blocks(p.window_left, p.window_right) != 0 : p.causal;
  const int m0 = (longest_first ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * kGradBlock, head = blockIdx.y;
  const int seq = blockIdx.z;
  const SequenceSpan span = sequence_span(p, seq);
  if (m0 >= span.q_len) return;  // packed: this sequence is shorter than max_seqlen_q
  const int kv_head = head / p.group_size;
  const int key_end = p.causal ? min(span.k_len, m0 + kGradBlock) : span.k_len;
  int num_steps = key_end > 0 ? (key_end + S::kStep - 1) / S::kStep : 0;
  int n_first = 0;  // the first key step (banded: the first that meets a row's band)
  if constexpr (kBanded) {
    const BlockRange range = problem_band(p, span).key_blocks(m0, kGradBlock, S::kStep);
    n_first = range.first;
    num_steps = range.count();
  }

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < kGradStages; ++s) {
      mbarrier_init(&kv_full[s], 1);
      mbarrier_init(&kv_empty[s], 2 * 128);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // ---- producer ----
    release_registers<kBanded ? kBandedProducerRegisters : kProducerRegisters>();
    if (threadIdx.x == 0 && num_steps > 0) {
      prefetch_maps(params);
      mbarrier_arrive_expect_tx(q_full, 2 * S::kBlockTileBytes);
      load_tile_pair<S::kPanels>(q_tile, &params.q_map, dout_tile, &params.dout_map, q_full, kBlockPanelBytes,
                                 span.q_start + m0, head, span.coord);
      for (int step = 0; step < num_steps; ++step) {
        const int slot = step % kGradStages;
        mbarrier_wait(&kv_empty[slot], ((step / kGradStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(&kv_full[slot], 2 * S::kStepTileBytes);
        load_tile_pair<S::kPanels>(k_tiles + slot * S::kStepTileBytes, &params.k_map,
                                   v_tiles + slot * S::kStepTileBytes, &params.v_map, &kv_full[slot],
                                   S::kStepPanelBytes, span.k_start + (kBanded ? n_first + step : step) * S::kStep,
                                   kv_head, span.coord);
      }
    }
    return;
  }

  // ---- consumers: 64 query rows each ----
  claim_registers<kBanded ? kBandedConsumerRegisters : kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  const int row0 = m0 + consumer * 64 + accumulator_row(lane, warp, 0);  // this thread's rows: row0, row0 + 8
  const uint8_t* const padding = p.key_padding == nullptr ? nullptr : p.key_padding + seq * p.key_padding_seq_stride;
  const float scale_log2 = p.scale * kLog2e;
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    lse[r] = lse_log2(args, seq, head, span.q_start + row, row < span.q_len);
    delta[r] = delta_at(args, seq, head, span.q_start + row, row < span.q_len);
  }
  const uint32_t q_address = smem_u32(q_tile) + consumer * kConsumerRowBytes;  // 8 KiB: stays atom-aligned
  const uint32_t dout_address = smem_u32(dout_tile) + consumer * kConsumerRowBytes;

  float dq[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) dq[i] = 0.f;
  if (num_steps > 0) mbarrier_wait(q_full, 0);
  for (int step = 0; step < num_steps; ++step) {
    const int slot = step % kGradStages, n0 = (kBanded ? n_first + step : step) * S::kStep;
    const uint32_t k_address = smem_u32(k_tiles + slot * S::kStepTileBytes);
    const uint32_t v_address = smem_u32(v_tiles + slot * S::kStepTileBytes);
    float s[S::kStep / 2], dp[S::kStep / 2];
    mbarrier_wait(&kv_full[slot], (step / kGradStages) & 1);
    scores_and_output_grads<T, kD>(s, dp, q_address, dout_address, k_address, v_address);
    // The banded kernel: this thread's two rows' key intervals (held during this loop only).
    [[maybe_unused]] SequenceBand::KeyInterval keys[2];
    if constexpr (kBanded) {
      soft_cap_tanh(s, params);
      const SequenceBand band = problem_band(p, span);
      keys[0] = band.row_keys(row0);
      keys[1] = band.row_keys(row0 + 8);
    }
    // Element 4 j + 2 r + c: query row0 + 8 r, key n0 + column (j, c).
#pragma unroll
    for (int j = 0; j < S::kStep / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = n0 + accumulator_column(lane, j, c);
        const bool key_ok = key_allowed(padding, p.key_padding_token_stride, key, span.k_len);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = 4 * j + 2 * r + c;
          if constexpr (kBanded) {
            const bool allowed = key_ok & keys[r].contains(key);
            const CappedScore capped = capped_score(s[i], params);
            const float probability = allowed ? exp2_ftz(fmaf(capped.score, scale_log2, -lse[r])) : 0.f;
            dp[i] = probability * (dp[i] - delta[r]) * capped.slope;
          } else {
            const bool allowed = key_ok && (!p.causal || key <= row0 + 8 * r);
            const float probability = allowed ? exp2_ftz(fmaf(s[i], scale_log2, -lse[r])) : 0.f;
            dp[i] = probability * (dp[i] - delta[r]);
          }
        }
      }
    }
    uint32_t dsa[S::kStep / 16][4];
    pack_a<T, S::kStep>(dp, dsa);
    wgmma_fence();
    issue_rs<T, kD, S::kStep>(dq, dsa, k_address, S::kStepPanelBytes);
    wgmma_wait<0>();
    fence_registers(dq);
    fence_registers(dsa);
    mbarrier_arrive(&kv_empty[slot]);
  }

  store_rows<T, kD>(dq, static_cast<T*>(args.dq) + seq * args.dq_strides.seq + head * args.dq_strides.head +
                            static_cast<int64_t>(span.q_start) * args.dq_strides.token,
                    args.dq_strides.token, row0, span.q_len, p.scale, lane);
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// One pass: dq = dq_accum in q's dtype, 4 elements a thread (16-byte loads, 8-byte stores);
// grid (tokens x heads / rows a block, seqs). Rows outside every sequence were never added to:
// zeros.
template <typename T, int kD>
__global__ void __launch_bounds__(kWarpgroupThreads) convert_dq_kernel(const AttentionBackwardArgs args, int64_t tokens,
                                                                        int heads) {
  constexpr int kThreadsPerRow = kD / 4, kRowsPerBlock = kWarpgroupThreads / kThreadsPerRow;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  if (row >= tokens * heads) return;
  const int64_t token = row / heads, head = row % heads, seq = blockIdx.y, column = 4 * (threadIdx.x % kThreadsPerRow);
  const Strides3& a = args.dq_accum_strides;
  const Strides3& d = args.dq_strides;
  const float4 value =
      *reinterpret_cast<const float4*>(args.dq_accum + seq * a.seq + head * a.head + token * a.token + column);
  T* out = static_cast<T*>(args.dq) + seq * d.seq + head * d.head + token * d.token + column;
  *reinterpret_cast<uint2*>(out) = make_uint2(pack2<T>(value.x, value.y), pack2<T>(value.z, value.w));
}

// Builds the tensor maps and launches the kernels (host side; compiled for sm_90a): the two
// passes, or with args.dq_accum the one pass and the convert.
template <typename T, int kD>
cudaError_t run_backward(const AttentionBackwardArgs& args, DType dtype, cudaStream_t stream) {
  using S = GradShape<kD>;
  const AttentionProblem& p = args.problem;
  const int seqs = p.cu_seqlens_q != nullptr ? 1 : p.num_seqs, kv_heads = p.num_heads / p.group_size;
  // The pass that owns keys loads K, V in 128-row boxes and Q, dO in step-row ones; the
  // other the other way round.
  const auto make_maps = [&](BackwardParams* params, int q_rows, int k_rows) -> cudaError_t {
    params->args = args;
    if (cudaError_t e = make_tile_map(&params->q_map, dtype, p.q, p.q_strides, p.q_tokens, p.num_heads, seqs, kD, q_rows);
        e != cudaSuccess) {
      return e;
    }
    if (cudaError_t e = make_tile_map(&params->dout_map, dtype, args.dout, args.dout_strides, p.q_tokens, p.num_heads,
                                      seqs, kD, q_rows);
        e != cudaSuccess) {
      return e;
    }
    if (cudaError_t e = make_tile_map(&params->k_map, dtype, p.k, p.k_strides, p.k_tokens, kv_heads, seqs, kD, k_rows);
        e != cudaSuccess) {
      return e;
    }
    return make_tile_map(&params->v_map, dtype, p.v, p.v_strides, p.k_tokens, kv_heads, seqs, kD, k_rows);
  };
  constexpr int kSmem = S::kSmemBytes;
  const dim3 key_grid(static_cast<unsigned>((p.max_seqlen_k + kGradBlock - 1) / kGradBlock), kv_heads, p.num_seqs);
  const dim3 query_grid(static_cast<unsigned>((p.max_seqlen_q + kGradBlock - 1) / kGradBlock), p.num_heads,
                        p.num_seqs);
  const bool one_pass = args.dq_accum != nullptr;
  const bool banded = attention_has_band_or_softcap(p);
  const auto set_caps = [&](BackwardParams* params) {
    params->cap_in = p.softcap > 0.f ? p.scale / p.softcap : 0.f;
    params->cap_out = p.softcap > 0.f ? p.softcap / p.scale : 0.f;
  };
  if (key_grid.x > 0 && key_grid.y > 0 && key_grid.z > 0) {
    BackwardParams params{};
    if (cudaError_t e = make_maps(&params, S::kStep, kGradBlock); e != cudaSuccess) return e;
    set_caps(&params);
    auto kernel = one_pass ? (banded ? key_grad_kernel<T, kD, true, true> : key_grad_kernel<T, kD, true, false>)
                           : (banded ? key_grad_kernel<T, kD, false, true> : key_grad_kernel<T, kD, false, false>);
    const int smem = one_pass ? S::kOnePassSmemBytes : kSmem;
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        e != cudaSuccess) {
      return e;
    }
    kernel<<<key_grid, kThreads, smem, stream>>>(params);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (one_pass) {
    const int64_t rows = static_cast<int64_t>(p.q_tokens) * p.num_heads;
    constexpr int kRowsPerBlock = kWarpgroupThreads / (kD / 4);
    const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock), seqs);
    if (grid.x == 0 || grid.y == 0) return cudaSuccess;
    convert_dq_kernel<T, kD><<<grid, kWarpgroupThreads, 0, stream>>>(args, p.q_tokens, p.num_heads);
    return cudaGetLastError();
  }
  if (query_grid.x > 0 && query_grid.y > 0 && query_grid.z > 0) {
    BackwardParams params{};
    if (cudaError_t e = make_maps(&params, kGradBlock, S::kStep); e != cudaSuccess) return e;
    set_caps(&params);
    auto kernel = banded ? query_grad_kernel<T, kD, true> : query_grad_kernel<T, kD, false>;
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
        e != cudaSuccess) {
      return e;
    }
    kernel<<<query_grid, kThreads, kSmem, stream>>>(params);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace attention_sm90
}  // namespace tformer
