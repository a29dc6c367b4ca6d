// Flash attention forward (FlashAttention-2, Dao 2023, Algorithm 1) on mma.sync tensor cores.
//
// A block of 4 warps holds 128 query rows (32 per warp, as two 16-row mma tiles; 64 and 16 at
// head dim 256) in shared memory and streams the keys and values of its (sequence, kv head)
// through double-buffered cp.async tiles: the loads of step j + 1 are in flight while step j
// computes. Only key blocks that meet the block's band (causal, sliding window) are visited.
// Per step a warp computes S = Q K^T (32 x kBlockN, fp32), soft-caps it (softcap > 0), masks
// it only when the block crosses a boundary (padding, a band edge, the sequence end), updates its rows'
// running max and sum (online softmax, in log2 units: p = exp2(s * scale * log2(e) - m)),
// rescales its output accumulator and adds P V with P taken straight from registers. The
// output is staged through the warp's own rows of the Q tile and leaves in 16-byte stores.
// Memory is O(S): only out and the float32 log-sum-exp are written.
#pragma once

#include <type_traits>

#include "attention/block_shapes.h"
#include "attention/launch_templates.h"
#include "attention/tiles.cuh"

namespace tformer {
namespace attention {

template <typename T, int kD>
__global__ void __launch_bounds__(ForwardShape<kD>::kWarps * 32) forward_kernel(const AttentionForwardArgs args) {
  using Shape = ForwardShape<kD>;
  constexpr int kM = Shape::kBlockM, kN = Shape::kBlockN, kStride = smem_stride<kD>();
  constexpr int kThreads = Shape::kWarps * 32, kTiles = Shape::kRowTiles, kWarpRows = Shape::kWarpRows;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* q_tile = reinterpret_cast<T*>(shared_bytes);
  T* k_tiles = q_tile + kM * kStride;       // two buffers
  T* v_tiles = k_tiles + 2 * kN * kStride;  // two buffers

  const AttentionProblem& p = args.problem;
  const int m0 = blockIdx.x * kM, head = blockIdx.y, seq = blockIdx.z;
  const SequenceBounds bounds = sequence_bounds(p, seq);
  if (m0 >= bounds.q_len) return;  // packed: this sequence is shorter than max_seqlen_q
  const int kv_head = head / p.group_size;
  const KeyMask mask = key_mask(p, seq, bounds);
  const T* q = slab(static_cast<const T*>(p.q), p.q_strides, seq, head, bounds.q_start);
  const T* k = slab(static_cast<const T*>(p.k), p.k_strides, seq, kv_head, bounds.k_start);
  const T* v = slab(static_cast<const T*>(p.v), p.v_strides, seq, kv_head, bounds.k_start);

  // Only the key blocks that meet some row's band are visited (blocks left of a sliding window
  // or right of the causal diagonal are skipped, not masked): keys [first_key, key_end).
  const int row_end = min(m0 + kM, bounds.q_len);
  const int first_block = mask.first_key(m0) / kN;
  const int key_end = mask.key_end(row_end);
  const int num_steps = max(0, static_cast<int>(ceil_div(key_end, kN)) - first_block);
  const int n_first = first_block * kN;
  load_tile_async<kThreads, T, kM, kD>(q_tile, q, p.q_strides.token, m0, bounds.q_len, p.head_dim);
  if (num_steps > 0) {
    load_tile_async<kThreads, T, kN, kD>(k_tiles, k, p.k_strides.token, n_first, bounds.k_len, p.head_dim);
    load_tile_async<kThreads, T, kN, kD>(v_tiles, v, p.v_strides.token, n_first, bounds.k_len, p.head_dim);
  }
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row0 = m0 + warp * kWarpRows;  // this warp's first query row
  const ScoreMap score = score_map(p);
  float acc[kTiles][kD / 8][4];
  zero(acc);
  // Lane rows: warp_row0 + 16 t + lane / 4 (r = 0) and + 8 (r = 1).
  float row_max[kTiles][2], row_sum[kTiles][2];  // max in log2 units, -inf while no key was allowed
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    row_max[t][0] = row_max[t][1] = -INFINITY;
    row_sum[t][0] = row_sum[t][1] = 0.f;  // this lane's part; the quad's sum at the end
  }

  auto run_step = [&](int step, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    const int buffer = step & 1;
    cp_async_wait<0>();
    __syncthreads();  // this step's tiles are in; every warp is done with the other buffer
    if (step + 1 < num_steps) {  // prefetch the next step into the other buffer
      const int next = n_first + (step + 1) * kN;
      load_tile_async<kThreads, T, kN, kD>(k_tiles + (buffer ^ 1) * kN * kStride, k, p.k_strides.token, next,
                                           bounds.k_len, p.head_dim);
      load_tile_async<kThreads, T, kN, kD>(v_tiles + (buffer ^ 1) * kN * kStride, v, p.v_strides.token, next,
                                           bounds.k_len, p.head_dim);
      cp_async_commit();
    }

    float s[kTiles][kN / 8][4];
    zero(s);
    warp_gemm_abt<T, kTiles, kN, kD>(s, q_tile + warp * kWarpRows * kStride, k_tiles + buffer * kN * kStride,
                                     kStride, lane);
    if constexpr (kMasked) {
      for_each_score<kTiles, kN>(mask, warp_row0, n_first + step * kN, lane,
                                 [&](int t, int j, int e, int, bool allowed) {
                                   s[t][j][e] = allowed ? score(s[t][j][e]) : -INFINITY;
                                 });
    } else {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[t][j][e] = score(s[t][j][e]);
        }
      }
    }
    // Online softmax (FA2 Algorithm 1, lines 8-10). A row with no allowed key so far keeps
    // max -inf; exponentiating against 0 instead keeps exp2(-inf - -inf) = NaN out.
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float step_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) step_max = fmaxf(step_max, fmaxf(s[t][j][2 * r], s[t][j][2 * r + 1]));
        const float new_max = fmaxf(row_max[t][r], quad_max(step_max));
        const float safe_max = new_max == -INFINITY ? 0.f : new_max;
        const float alpha = exp2f(row_max[t][r] - safe_max);  // 0 when row_max was -inf
        row_max[t][r] = new_max;
        row_sum[t][r] *= alpha;
#pragma unroll
        for (int d = 0; d < kD / 8; ++d) {
          acc[t][d][2 * r] *= alpha;
          acc[t][d][2 * r + 1] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) {
          s[t][j][2 * r] = exp2f(s[t][j][2 * r] - safe_max);
          s[t][j][2 * r + 1] = exp2f(s[t][j][2 * r + 1] - safe_max);
          row_sum[t][r] += s[t][j][2 * r] + s[t][j][2 * r + 1];
        }
      }
    }
    warp_gemm_pb<T, kTiles, kN, kD>(acc, s, v_tiles + buffer * kN * kStride, kStride, lane);
  };
  for (int step = 0; step < num_steps; ++step) {
    if (stored_rows_need_mask<kN>(mask, m0, row_end, n_first + step * kN)) {
      run_step(step, std::true_type{});
    } else {
      run_step(step, std::false_type{});
    }
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (num_steps == 0: the Q tile)
  __syncthreads();     // every warp is done with the tiles before the output overwrites Q

  // Fully masked rows have sum 0: output 0 and lse = -inf, as the reference's safe softmax.
  float inverse[kTiles][2], lse[kTiles][2];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(row_sum[t][r]);
      inverse[t][r] = sum == 0.f ? 0.f : 1.f / sum;
      lse[t][r] = sum == 0.f ? -INFINITY : (row_max[t][r] + log2f(sum)) * kLn2;
    }
  }
  // The warp's own rows of the Q tile (no other warp reads them) stage O for 16-byte stores.
  T* out_tile = q_tile + warp * kWarpRows * kStride;
  stage_rows<T, kTiles, kD>(out_tile, kStride, acc, inverse, lane);
  __syncwarp();
  store_staged_rows<T, kWarpRows, kD>(slab(static_cast<T*>(args.out), args.out_strides, seq, head, bounds.q_start),
                                      args.out_strides.token, out_tile, kStride, warp_row0, bounds.q_len, p.head_dim,
                                      lane);
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + t * 16 + lane / 4 + r * 8;
      if (row < bounds.q_len && lane % 4 == 0) *slab(args.lse, args.lse_strides, seq, head, bounds.q_start + row) = lse[t][r];
    }
  }
}

template <typename T, int kD>
cudaError_t run_forward(const AttentionForwardArgs& args, cudaStream_t stream) {
  using Shape = ForwardShape<kD>;
  const dim3 grid(static_cast<unsigned>(ceil_div(args.problem.max_seqlen_q, Shape::kBlockM)), args.problem.num_heads,
                  args.problem.num_seqs);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  auto kernel = forward_kernel<T, kD>;
  if (cudaError_t error = allow_shared_memory(kernel, Shape::kSmemBytes); error != cudaSuccess) return error;
  kernel<<<grid, Shape::kWarps * 32, Shape::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace attention
}  // namespace tformer
