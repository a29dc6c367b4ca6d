// Flash attention backward (FlashAttention-2, Dao 2023, Algorithm 2) on mma.sync tensor
// cores, split into two passes as in its Section 3.2 so that no atomics are needed and the
// result is deterministic:
//
//   key_grad_kernel    one block of 8 warps per 128 keys of a (sequence, kv head); it loops
//                      over the query heads of the group (grouped-query attention) and their
//                      query blocks in a fixed order, accumulating dK and dV in registers,
//                      with the next query block's Q and dO loading (cp.async) while the
//                      current one computes. Expanded (grouped-query attention on few SMs,
//                      attention_backward_expands): one block per query head instead, writing
//                      float32 partials that group_sum_kernel adds up in a fixed order.
//   query_grad_kernel  one block per 64 query rows of a (sequence, query head), looping over
//                      key blocks, accumulating dQ in registers.
//
// Only blocks that meet the band (causal, sliding window) are visited; blocks that cross no
// boundary (padding, a band edge, a sequence end) run without mask arithmetic; dK, dV and dQ leave through shared memory in 16-byte stores.
//
// Both recompute P = exp2(S * scale * log2(e) - lse * log2(e)) from q, k and the saved
// log-sum-exp (memory O(S)); with delta_i = rowsum(dO_i * O_i) (delta_kernel, run first),
// dS = P * (dP - delta) where dP = dO V^T (soft-capped: P from softcap * tanh(S * scale /
// softcap), and dS times the derivative 1 - tanh^2). A fully masked row has lse = -inf: it is measured
// against 0 and all its scores are masked, so its P, hence its gradients, are 0.
#pragma once

#include <type_traits>

#include "attention/block_shapes.h"
#include "attention/launch_templates.h"
#include "attention/tiles.cuh"

namespace tformer {
namespace attention {

// delta = rowsum(dO * O) in float32; one warp per (row, head, sequence).
template <typename T>
__global__ void __launch_bounds__(256) delta_kernel(const AttentionBackwardArgs args) {
  const AttentionProblem& p = args.problem;
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = blockIdx.y, seq = blockIdx.z;
  const SequenceBounds bounds = sequence_bounds(p, seq);
  if (row >= bounds.q_len) return;
  const T* out = slab(static_cast<const T*>(args.out), args.out_strides, seq, head, bounds.q_start + row);
  const T* dout = slab(static_cast<const T*>(args.dout), args.dout_strides, seq, head, bounds.q_start + row);
  float sum = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) sum += to_float(out[d]) * to_float(dout[d]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) *slab(args.delta, args.lse_strides, seq, head, bounds.q_start + row) = sum;
}

// lse in log2 units, measured against 0 for fully masked rows (lse = -inf) and rows past the
// sequence, whose scores are all masked anyway.
__device__ __forceinline__ float lse_log2(const float* lse_row0, int64_t stride, int row, int len) {
  if (row >= len) return 0.f;
  const float lse = lse_row0[row * stride];
  return lse == -INFINITY ? 0.f : lse * kLog2e;
}

template <typename T, int kD, bool kExpanded, bool kWide>
__global__ void __launch_bounds__(KeyGradShape<kD, kWide>::kWarps * 32)
    key_grad_kernel(const AttentionBackwardArgs args) {
  using Shape = KeyGradShape<kD, kWide>;
  constexpr int kM = Shape::kBlockM, kN = Shape::kBlockN, kStride = smem_stride<kD>();
  constexpr int kThreads = Shape::kWarps * 32;
  constexpr int kColumns = Shape::kColumns;  // of dK and dV, from column col0 on
  static_assert(kN == Shape::kWarps * kTileRows, "each warp owns 16 keys");
  static_assert(kM <= kThreads, "one thread per query row loads its lse and delta");
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* k_tile = reinterpret_cast<T*>(shared_bytes);
  T* v_tile = k_tile + kN * kStride;
  T* q_tiles = v_tile + kN * kStride;        // two buffers
  T* dout_tiles = q_tiles + 2 * kM * kStride;  // two buffers
  float* lse_tiles = reinterpret_cast<float*>(dout_tiles + 2 * kM * kStride);  // two buffers, log2 units
  float* delta_tiles = lse_tiles + 2 * kM;                                      // two buffers

  const AttentionProblem& p = args.problem;
  // Grouped: blockIdx.y is a kv head, summing over its group's query heads. Expanded:
  // blockIdx.y is a query head, writing that head's partial dK and dV.
  const int kv_head = kExpanded ? blockIdx.y / p.group_size : blockIdx.y;
  const int first_head = kExpanded ? blockIdx.y : kv_head * p.group_size;
  const int num_heads_here = kExpanded ? 1 : p.group_size;
  const int n0 = (blockIdx.x / Shape::kColumnSplit) * kN, seq = blockIdx.z;
  const int col0 = (blockIdx.x % Shape::kColumnSplit) * kColumns;
  const SequenceBounds bounds = sequence_bounds(p, seq);
  if (n0 >= bounds.k_len || col0 >= p.head_dim) return;
  const KeyMask mask = key_mask(p, seq, bounds);
  load_tile_async<kThreads, T, kN, kD>(k_tile,
                                       slab(static_cast<const T*>(p.k), p.k_strides, seq, kv_head, bounds.k_start),
                                       p.k_strides.token, n0, bounds.k_len, p.head_dim);
  load_tile_async<kThreads, T, kN, kD>(v_tile,
                                       slab(static_cast<const T*>(p.v), p.v_strides, seq, kv_head, bounds.k_start),
                                       p.v_strides.token, n0, bounds.k_len, p.head_dim);

  // Steps in a fixed order (deterministic sums): the query heads of the block, and for each
  // its query blocks from m_begin to m_end, the rows whose bands reach this block's keys
  // (query blocks above the causal diagonal or below a sliding window are skipped).
  const int m_begin = (mask.first_row(n0) / kM) * kM;
  const int m_end = mask.row_end(min(n0 + kN, bounds.k_len));
  const int blocks_per_head = m_end > m_begin ? static_cast<int>(ceil_div(m_end - m_begin, kM)) : 0;
  const int num_steps = num_heads_here * blocks_per_head;
  auto step_head = [&](int step) { return first_head + step / blocks_per_head; };
  auto step_m0 = [&](int step) { return m_begin + (step % blocks_per_head) * kM; };
  // Q and dO of a step into a buffer (one cp.async group, K and V joining the first).
  auto load_query_block = [&](int step, int buffer) {
    const int head = step_head(step), m0 = step_m0(step);
    load_tile_async<kThreads, T, kM, kD>(q_tiles + buffer * kM * kStride,
                                         slab(static_cast<const T*>(p.q), p.q_strides, seq, head, bounds.q_start),
                                         p.q_strides.token, m0, bounds.q_len, p.head_dim);
    load_tile_async<kThreads, T, kM, kD>(
        dout_tiles + buffer * kM * kStride,
        slab(static_cast<const T*>(args.dout), args.dout_strides, seq, head, bounds.q_start),
        args.dout_strides.token, m0, bounds.q_len, p.head_dim);
    cp_async_commit();
  };
  // lse (log2 units) and delta of this thread's row (threadIdx.x < kM) of a step's block.
  auto load_row_stats = [&](int step, float& row_lse, float& row_delta) {
    const int head = step_head(step), row = step_m0(step) + static_cast<int>(threadIdx.x);
    row_lse = lse_log2(slab(args.lse, args.lse_strides, seq, head, bounds.q_start), args.lse_strides.token, row,
                       bounds.q_len);
    const float* delta = slab(static_cast<const float*>(args.delta), args.lse_strides, seq, head, bounds.q_start);
    row_delta = row < bounds.q_len ? delta[row * args.lse_strides.token] : 0.f;
  };
  if (num_steps > 0) {
    load_query_block(0, 0);
    if (threadIdx.x < kM) load_row_stats(0, lse_tiles[threadIdx.x], delta_tiles[threadIdx.x]);
  } else {
    cp_async_commit();
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_key0 = n0 + warp * kTileRows;  // this warp's first key
  const ScoreMap score = score_map(p);
  float dk[1][kColumns / 8][4], dv[1][kColumns / 8][4];
  zero(dk);
  zero(dv);
  // This lane's keys (warp_key0 + lane / 4 and + 8) are fixed for the whole kernel.
  const bool key_ok[2] = {mask.key_ok(warp_key0 + lane / 4), mask.key_ok(warp_key0 + lane / 4 + 8)};

  auto compute = [&](int m0, int buffer, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    const T* q_tile = q_tiles + buffer * kM * kStride;
    const T* dout_tile = dout_tiles + buffer * kM * kStride;
    const float* lse_tile = lse_tiles + buffer * kM;
    const float* delta_tile = delta_tiles + buffer * kM;
    // S^T = K Q^T and dP^T = V dO^T (this warp's 16 keys x kM queries); then
    // P^T = exp2(score(S^T) - lse) and dS^T = P^T * (dP^T - delta), times the soft-cap's
    // derivative 1 - tanh^2 when softcap > 0.
    float pt[1][kM / 8][4];
    zero(pt);
    warp_gemm_abt<T, 1, kM, kD>(pt, k_tile + warp * kTileRows * kStride, q_tile, kStride, lane);
    float dst[1][kM / 8][4];
    zero(dst);
    warp_gemm_abt<T, 1, kM, kD>(dst, v_tile + warp * kTileRows * kStride, dout_tile, kStride, lane);
#pragma unroll
    for (int j = 0; j < kM / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // (key lane / 4 + 8 (e / 2), query 2 (lane % 4) + e % 2)
        const int i = j * 8 + 2 * (lane % 4) + (e % 2);
        float prob, slope = 1.f;
        if (score.capped) {
          const float t = score.tanh(pt[0][j][e]);
          prob = exp2f(t * score.cap_out - lse_tile[i]);
          slope = 1.f - t * t;
        } else {
          prob = exp2f(pt[0][j][e] * score.scale_log2 - lse_tile[i]);
        }
        if constexpr (kMasked) {
          const int key = warp_key0 + lane / 4 + (e / 2) * 8;
          if (!(key_ok[e / 2] && mask.query_sees(m0 + i, key))) prob = 0.f;
        }
        pt[0][j][e] = prob;
        dst[0][j][e] = prob * (dst[0][j][e] - delta_tile[i]) * slope;
      }
    }
    warp_gemm_pb<T, 1, kM, kColumns>(dv, pt, dout_tile + col0, kStride, lane);   // dV += P^T dO
    warp_gemm_pb<T, 1, kM, kColumns>(dk, dst, q_tile + col0, kStride, lane);  // dK += dS^T Q, scaled at the end
  };

  for (int step = 0; step < num_steps; ++step) {
    const int buffer = step & 1;
    cp_async_wait<0>();
    __syncthreads();  // this step's tiles are in; every warp is done with the other buffers
    const bool prefetch = step + 1 < num_steps;
    float next_lse = 0.f, next_delta = 0.f;
    if (prefetch) {  // the next query block loads while this one computes
      load_query_block(step + 1, buffer ^ 1);
      if (threadIdx.x < kM) load_row_stats(step + 1, next_lse, next_delta);
    }
    const int m0 = step_m0(step);
    if (block_needs_mask<kM, kN>(mask, m0, n0)) {
      compute(m0, buffer, std::true_type{});
    } else {
      compute(m0, buffer, std::false_type{});
    }
    if (prefetch && threadIdx.x < kM) {  // read by the next step, after its barrier
      lse_tiles[(buffer ^ 1) * kM + threadIdx.x] = next_lse;
      delta_tiles[(buffer ^ 1) * kM + threadIdx.x] = next_delta;
    }
  }
  cp_async_wait<0>();  // nothing in flight at exit (no query block: the K and V tiles)
  __syncthreads();     // every thread's copies into the K and V tiles are done before the staging

  // Every key of the block is written, zeros included (keys no query may see).
  const int columns_left = p.head_dim - col0;
  if constexpr (kExpanded) {
    // float32 partials of this query head, 8-byte stores straight from the accumulators.
    float* dk_out = slab(args.dk_partial, args.partial_strides, seq, first_head, bounds.k_start) + col0;
    float* dv_out = slab(args.dv_partial, args.partial_strides, seq, first_head, bounds.k_start) + col0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = warp_key0 + lane / 4 + r * 8;
      if (key >= bounds.k_len) continue;
      const int64_t offset = static_cast<int64_t>(key) * args.partial_strides.token;
#pragma unroll
      for (int d = 0; d < kColumns / 8; ++d) {
        const int col = d * 8 + 2 * (lane % 4);
        if (col < columns_left) {  // head_dim is a multiple of 8: col + 1 is in range too
          *reinterpret_cast<float2*>(dk_out + offset + col) =
              make_float2(dk[0][d][2 * r] * p.scale, dk[0][d][2 * r + 1] * p.scale);
          *reinterpret_cast<float2*>(dv_out + offset + col) = make_float2(dv[0][d][2 * r], dv[0][d][2 * r + 1]);
        }
      }
    }
  } else {
    // The warp's own rows of the K and V tiles (no other warp reads them) stage dK and dV.
    T* dk_stage = k_tile + warp * kTileRows * kStride;
    T* dv_stage = v_tile + warp * kTileRows * kStride;
    const float dk_factor[1][2] = {{p.scale, p.scale}}, dv_factor[1][2] = {{1.f, 1.f}};
    stage_rows<T, 1, kColumns>(dk_stage, kStride, dk, dk_factor, lane);
    stage_rows<T, 1, kColumns>(dv_stage, kStride, dv, dv_factor, lane);
    __syncwarp();
    store_staged_rows<T, kTileRows, kColumns>(
        slab(static_cast<T*>(args.dk), args.dk_strides, seq, kv_head, bounds.k_start) + col0, args.dk_strides.token,
        dk_stage, kStride, warp_key0, bounds.k_len, columns_left, lane);
    store_staged_rows<T, kTileRows, kColumns>(
        slab(static_cast<T*>(args.dv), args.dv_strides, seq, kv_head, bounds.k_start) + col0, args.dv_strides.token,
        dv_stage, kStride, warp_key0, bounds.k_len, columns_left, lane);
  }
}

// Expanded dK/dV: dK and dV of a key/value head = the sum of its group's float32 partials in
// head order (g = 0, 1, ...: deterministic), rounded once to T. One thread per 8 columns of a
// key: two 16-byte loads per partial, one 16-byte store.
template <typename T>
__global__ void __launch_bounds__(256) group_sum_kernel(const AttentionBackwardArgs args) {
  const AttentionProblem& p = args.problem;
  const int chunks = p.head_dim / 8;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  const int kv_head = blockIdx.y, seq = blockIdx.z;
  const SequenceBounds bounds = sequence_bounds(p, seq);
  if (index >= static_cast<int64_t>(bounds.k_len) * chunks) return;
  const int key = static_cast<int>(index / chunks), col = static_cast<int>(index % chunks) * 8;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    const float* partial = which == 0 ? args.dk_partial : args.dv_partial;
    float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int g = 0; g < p.group_size; ++g) {
      const float* src =
          slab(partial, args.partial_strides, seq, kv_head * p.group_size + g, bounds.k_start + key) + col;
      const float4 lo = *reinterpret_cast<const float4*>(src), hi = *reinterpret_cast<const float4*>(src + 4);
      sum[0] += lo.x, sum[1] += lo.y, sum[2] += lo.z, sum[3] += lo.w;
      sum[4] += hi.x, sum[5] += hi.y, sum[6] += hi.z, sum[7] += hi.w;
    }
    T* grad = slab(static_cast<T*>(which == 0 ? args.dk : args.dv), which == 0 ? args.dk_strides : args.dv_strides,
                   seq, kv_head, bounds.k_start + key) + col;
    *reinterpret_cast<uint4*>(grad) = make_uint4(pack2<T>(sum[0], sum[1]), pack2<T>(sum[2], sum[3]),
                                                 pack2<T>(sum[4], sum[5]), pack2<T>(sum[6], sum[7]));
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(QueryGradShape<kD>::kWarps * 32) query_grad_kernel(const AttentionBackwardArgs args) {
  using Shape = QueryGradShape<kD>;
  constexpr int kM = Shape::kBlockM, kN = Shape::kBlockN, kStride = smem_stride<kD>();
  constexpr int kThreads = Shape::kWarps * 32;
  static_assert(kM == Shape::kWarps * kTileRows, "each warp owns 16 query rows");
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* q_tile = reinterpret_cast<T*>(shared_bytes);
  T* dout_tile = q_tile + kM * kStride;
  T* k_tiles = dout_tile + kM * kStride;    // two buffers
  T* v_tiles = k_tiles + 2 * kN * kStride;  // two buffers

  const AttentionProblem& p = args.problem;
  const int m0 = blockIdx.x * kM, head = blockIdx.y, seq = blockIdx.z;
  const SequenceBounds bounds = sequence_bounds(p, seq);
  if (m0 >= bounds.q_len) return;
  const int kv_head = head / p.group_size;
  const KeyMask mask = key_mask(p, seq, bounds);
  const T* k = slab(static_cast<const T*>(p.k), p.k_strides, seq, kv_head, bounds.k_start);
  const T* v = slab(static_cast<const T*>(p.v), p.v_strides, seq, kv_head, bounds.k_start);
  // As in the forward: only the key blocks that meet the block's bands.
  const int row_end = min(m0 + kM, bounds.q_len);
  const int first_block = mask.first_key(m0) / kN;
  const int key_end = mask.key_end(row_end);
  const int num_steps = max(0, static_cast<int>(ceil_div(key_end, kN)) - first_block);
  const int n_first = first_block * kN;

  load_tile_async<kThreads, T, kM, kD>(q_tile,
                                       slab(static_cast<const T*>(p.q), p.q_strides, seq, head, bounds.q_start),
                                       p.q_strides.token, m0, bounds.q_len, p.head_dim);
  load_tile_async<kThreads, T, kM, kD>(
      dout_tile, slab(static_cast<const T*>(args.dout), args.dout_strides, seq, head, bounds.q_start),
      args.dout_strides.token, m0, bounds.q_len, p.head_dim);
  if (num_steps > 0) {
    load_tile_async<kThreads, T, kN, kD>(k_tiles, k, p.k_strides.token, n_first, bounds.k_len, p.head_dim);
    load_tile_async<kThreads, T, kN, kD>(v_tiles, v, p.v_strides.token, n_first, bounds.k_len, p.head_dim);
  }
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row0 = m0 + warp * kTileRows;
  const ScoreMap score = score_map(p);
  const float* lse = slab(args.lse, args.lse_strides, seq, head, bounds.q_start);
  const float* delta = slab(static_cast<const float*>(args.delta), args.lse_strides, seq, head, bounds.q_start);
  float row_lse[2], row_delta[2];  // lane rows warp_row0 + lane / 4 (+ 8)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row0 + lane / 4 + r * 8;
    row_lse[r] = lse_log2(lse, args.lse_strides.token, row, bounds.q_len);
    row_delta[r] = row < bounds.q_len ? delta[row * args.lse_strides.token] : 0.f;
  }
  float dq[1][kD / 8][4];
  zero(dq);

  auto run_step = [&](int step, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    const int buffer = step & 1;
    cp_async_wait<0>();
    __syncthreads();  // this step's tiles are in; every warp is done with the other buffer
    if (step + 1 < num_steps) {
      const int next = n_first + (step + 1) * kN;
      load_tile_async<kThreads, T, kN, kD>(k_tiles + (buffer ^ 1) * kN * kStride, k, p.k_strides.token, next,
                                           bounds.k_len, p.head_dim);
      load_tile_async<kThreads, T, kN, kD>(v_tiles + (buffer ^ 1) * kN * kStride, v, p.v_strides.token, next,
                                           bounds.k_len, p.head_dim);
      cp_async_commit();
    }
    const T* k_tile = k_tiles + buffer * kN * kStride;
    const T* v_tile = v_tiles + buffer * kN * kStride;

    float pr[1][kN / 8][4];  // P, then dS
    zero(pr);
    warp_gemm_abt<T, 1, kN, kD>(pr, q_tile + warp * kTileRows * kStride, k_tile, kStride, lane);
    float dp[1][kN / 8][4];
    zero(dp);
    warp_gemm_abt<T, 1, kN, kD>(dp, dout_tile + warp * kTileRows * kStride, v_tile, kStride, lane);
    // dS = P * (dP - delta) (times 1 - tanh^2 when soft-capped), P = exp2(score(S) - lse).
    auto grad_score = [&](float raw, float dp_value, int r) {
      float prob, slope = 1.f;
      if (score.capped) {
        const float t = score.tanh(raw);
        prob = exp2f(t * score.cap_out - row_lse[r]);
        slope = 1.f - t * t;
      } else {
        prob = exp2f(raw * score.scale_log2 - row_lse[r]);
      }
      return prob * (dp_value - row_delta[r]) * slope;
    };
    if constexpr (kMasked) {
      for_each_score<1, kN>(mask, warp_row0, n_first + step * kN, lane, [&](int, int j, int e, int r, bool allowed) {
        pr[0][j][e] = allowed ? grad_score(pr[0][j][e], dp[0][j][e], r) : 0.f;
      });
    } else {
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) pr[0][j][e] = grad_score(pr[0][j][e], dp[0][j][e], e / 2);
      }
    }
    warp_gemm_pb<T, 1, kN, kD>(dq, pr, k_tile, kStride, lane);  // dQ += dS K (scaled at the end)
  };
  for (int step = 0; step < num_steps; ++step) {
    if (stored_rows_need_mask<kN>(mask, m0, row_end, n_first + step * kN)) {
      run_step(step, std::true_type{});
    } else {
      run_step(step, std::false_type{});
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the tiles before dQ overwrites Q

  // The warp's own rows of the Q tile (no other warp reads them) stage dQ for 16-byte stores.
  T* dq_stage = q_tile + warp * kTileRows * kStride;
  const float dq_factor[1][2] = {{p.scale, p.scale}};
  stage_rows<T, 1, kD>(dq_stage, kStride, dq, dq_factor, lane);
  __syncwarp();
  store_staged_rows<T, kTileRows, kD>(slab(static_cast<T*>(args.dq), args.dq_strides, seq, head, bounds.q_start),
                                      args.dq_strides.token, dq_stage, kStride, warp_row0, bounds.q_len, p.head_dim,
                                      lane);
}

template <int kThreads, typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int smem_bytes, const AttentionBackwardArgs& args,
                   cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (cudaError_t error = allow_shared_memory(kernel, smem_bytes); error != cudaSuccess) return error;
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

// The dK/dV pass (grouped, or expanded plus the group sum) in one block shape.
template <typename T, int kD, bool kWide>
cudaError_t run_key_grad(const AttentionBackwardArgs& args, cudaStream_t stream) {
  using KeyShape = KeyGradShape<kD, kWide>;
  const AttentionProblem& p = args.problem;
  const unsigned key_blocks =
      static_cast<unsigned>(ceil_div(p.max_seqlen_k, KeyShape::kBlockN) * KeyShape::kColumnSplit);
  if (args.dk_partial == nullptr) {  // grouped: one block per key/value head sums its group
    const dim3 key_grid(key_blocks, p.num_heads / p.group_size, p.num_seqs);
    return launch<KeyShape::kWarps * 32>(key_grad_kernel<T, kD, false, kWide>, key_grid, KeyShape::kSmemBytes, args,
                                         stream);
  }
  const dim3 key_grid(key_blocks, p.num_heads, p.num_seqs);
  if (cudaError_t error = launch<KeyShape::kWarps * 32>(key_grad_kernel<T, kD, true, kWide>, key_grid,
                                                        KeyShape::kSmemBytes, args, stream);
      error != cudaSuccess) {
    return error;
  }
  const dim3 sum_grid(static_cast<unsigned>(ceil_div(int64_t{p.max_seqlen_k} * (p.head_dim / 8), 256)),
                      p.num_heads / p.group_size, p.num_seqs);
  return launch<256>(group_sum_kernel<T>, sum_grid, 0, args, stream);
}

template <typename T>
cudaError_t run_delta(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionProblem& p = args.problem;
  const dim3 delta_grid(static_cast<unsigned>(ceil_div(p.max_seqlen_q, 8)), p.num_heads, p.num_seqs);
  if (delta_grid.x == 0 || delta_grid.y == 0 || delta_grid.z == 0) return cudaSuccess;
  delta_kernel<T><<<delta_grid, 256, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t run_backward(const AttentionBackwardArgs& args, cudaStream_t stream) {
  using QueryShape = QueryGradShape<kD>;
  const AttentionProblem& p = args.problem;
  if (cudaError_t error = run_delta<T>(args, stream); error != cudaSuccess) return error;
  cudaError_t key_grad = cudaSuccess;
  if constexpr (kD == 128) {  // both shapes built; the bindings chose by the device's shared memory
    key_grad = args.key_grad_wide ? run_key_grad<T, kD, true>(args, stream) : run_key_grad<T, kD, false>(args, stream);
  } else {
    key_grad = run_key_grad<T, kD, (kD <= 96)>(args, stream);
  }
  if (key_grad != cudaSuccess) return key_grad;
  const dim3 query_grid(static_cast<unsigned>(ceil_div(p.max_seqlen_q, QueryShape::kBlockM)), p.num_heads,
                        p.num_seqs);
  return launch<QueryShape::kWarps * 32>(query_grad_kernel<T, kD>, query_grid, QueryShape::kSmemBytes, args, stream);
}

}  // namespace attention
}  // namespace tformer
