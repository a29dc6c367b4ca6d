// Flash attention forward (FlashAttention-2, Dao 2023, Algorithm 1) on mma.sync tensor cores.
//
// A block of 4 warps holds 128 query rows (32 per warp, as two 16-row mma tiles; 64 and 16 at
// head dim 256) in shared memory and streams the keys and values of its (sequence, kv head)
// through double-buffered cp.async tiles: the loads of step j + 1 are in flight while step j
// computes. Per step a warp computes S = Q K^T (32 x kBlockN, fp32), masks it only when the
// block crosses a boundary (padding, the causal diagonal, the sequence end), updates its rows'
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

  // Causal: key blocks entirely right of this block's last row contribute nothing.
  const int key_end = p.causal ? min(bounds.k_len, m0 + kM) : bounds.k_len;
  const int num_steps = static_cast<int>(ceil_div(key_end, kN));
  // The leading steps whose kN keys all exist, none is padding and (causal) all lie at or
  // left of the block's first row m0 run without the mask; the rest (the diagonal and the
  // last partial block, or every block when there is padding) are masked. Rows past q_len
  // are never stored, so they need no mask.
  int unmasked_steps = mask.padding != nullptr ? 0 : bounds.k_len / kN;
  if (p.causal) unmasked_steps = min(unmasked_steps, (m0 + 1) / kN);
  unmasked_steps = min(unmasked_steps, num_steps);

  load_tile_async<kThreads, T, kM, kD>(q_tile, q, p.q_strides.token, m0, bounds.q_len, p.head_dim);
  if (num_steps > 0) {
    load_tile_async<kThreads, T, kN, kD>(k_tiles, k, p.k_strides.token, 0, bounds.k_len, p.head_dim);
    load_tile_async<kThreads, T, kN, kD>(v_tiles, v, p.v_strides.token, 0, bounds.k_len, p.head_dim);
  }
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row0 = m0 + warp * kWarpRows;  // this warp's first query row
  const float scale_log2 = p.scale * kLog2e;
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
      const int next = (step + 1) * kN;
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
      for_each_score<kTiles, kN>(mask, warp_row0, step * kN, lane, [&](int t, int j, int e, int, bool allowed) {
        s[t][j][e] = allowed ? s[t][j][e] * scale_log2 : -INFINITY;
      });
    } else {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[t][j][e] *= scale_log2;
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
  for (int step = 0; step < unmasked_steps; ++step) run_step(step, std::false_type{});
  for (int step = unmasked_steps; step < num_steps; ++step) run_step(step, std::true_type{});
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
