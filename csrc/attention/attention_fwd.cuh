// Flash attention forward (FlashAttention-2, Dao 2023, Algorithm 1) on mma.sync tensor cores.
//
// A block of 4 warps holds 64 query rows (16 per warp) in shared memory and streams the
// keys and values of its (sequence, kv head) through double-buffered cp.async tiles: the
// loads of step j + 1 are in flight while step j computes. Per step a warp computes
// S = Q K^T (16 x kBlockN, fp32), masks it, updates its rows' running max and sum (online
// softmax, in log2 units: p = exp2(s * scale * log2(e) - m)), rescales its output
// accumulator and adds P V with P taken straight from registers. Memory is O(S): only out
// and the float32 log-sum-exp are written.
#pragma once

#include "attention/block_shapes.h"
#include "attention/launch_templates.h"
#include "attention/tiles.cuh"

namespace tformer {
namespace attention {

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) forward_kernel(const AttentionForwardArgs args) {
  using Shape = ForwardShape<kD>;
  constexpr int kM = Shape::kBlockM, kN = Shape::kBlockN, kStride = smem_stride<kD>();
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

  load_tile_async<T, kM, kD>(q_tile, q, p.q_strides.token, m0, bounds.q_len, p.head_dim);
  if (num_steps > 0) {
    load_tile_async<T, kN, kD>(k_tiles, k, p.k_strides.token, 0, bounds.k_len, p.head_dim);
    load_tile_async<T, kN, kD>(v_tiles, v, p.v_strides.token, 0, bounds.k_len, p.head_dim);
  }
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row0 = m0 + warp * kRowsPerWarp;  // this warp's first query row
  const float scale_log2 = p.scale * kLog2e;
  float acc[kD / 8][4];
  zero(acc);
  // Lane rows: warp_row0 + lane / 4 (r = 0) and + 8 (r = 1).
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units; -inf while no key was allowed
  float row_sum[2] = {0.f, 0.f};              // this lane's part; the quad's sum at the end

  for (int step = 0; step < num_steps; ++step) {
    const int buffer = step & 1;
    if (step + 1 < num_steps) {  // prefetch the next step into the other buffer
      const int next = (step + 1) * kN;
      load_tile_async<T, kN, kD>(k_tiles + (buffer ^ 1) * kN * kStride, k, p.k_strides.token, next, bounds.k_len,
                                 p.head_dim);
      load_tile_async<T, kN, kD>(v_tiles + (buffer ^ 1) * kN * kStride, v, p.v_strides.token, next, bounds.k_len,
                                 p.head_dim);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning "this step"
    cp_async_wait<1>();
    __syncthreads();

    float s[kN / 8][4];
    zero(s);
    warp_gemm_abt<T, kN, kD>(s, q_tile + warp * kRowsPerWarp * kStride, k_tiles + buffer * kN * kStride, kStride,
                             lane);
    for_each_score<kN>(mask, warp_row0, step * kN, lane, [&](int j, int e, int, bool allowed) {
      s[j][e] = allowed ? s[j][e] * scale_log2 : -INFINITY;
    });
    // Online softmax (FA2 Algorithm 1, lines 8-10). A row with no allowed key so far keeps
    // max -inf; exponentiating against 0 instead keeps exp2(-inf - -inf) = NaN out.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float step_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) step_max = fmaxf(step_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      const float new_max = fmaxf(row_max[r], quad_max(step_max));
      const float safe_max = new_max == -INFINITY ? 0.f : new_max;
      const float alpha = exp2f(row_max[r] - safe_max);  // 0 when row_max was -inf
      row_max[r] = new_max;
      row_sum[r] *= alpha;
#pragma unroll
      for (int d = 0; d < kD / 8; ++d) {
        acc[d][2 * r] *= alpha;
        acc[d][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - safe_max);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - safe_max);
        row_sum[r] += s[j][2 * r] + s[j][2 * r + 1];
      }
    }
    warp_gemm_pb<T, kN, kD>(acc, s, v_tiles + buffer * kN * kStride, kStride, lane);
    __syncthreads();  // the next step's prefetch overwrites the buffer read here
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (num_steps == 0: the Q tile)

  // Fully masked rows have sum 0: output 0 and lse = -inf, as the reference's safe softmax.
  float inverse[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    inverse[r] = sum == 0.f ? 0.f : 1.f / sum;
    lse[r] = sum == 0.f ? -INFINITY : (row_max[r] + log2f(sum)) * kLn2;
  }
  T* out = slab(static_cast<T*>(args.out), args.out_strides, seq, head, bounds.q_start);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row0 + lane / 4 + r * 8;
    if (row >= bounds.q_len) continue;
    T* out_row = out + static_cast<int64_t>(row) * args.out_strides.token;
#pragma unroll
    for (int d = 0; d < kD / 8; ++d) {
      const int col = d * 8 + 2 * (lane % 4);
      if (col < p.head_dim) {  // head_dim is a multiple of 8: col + 1 is in range too
        *reinterpret_cast<uint32_t*>(out_row + col) = pack2<T>(acc[d][2 * r] * inverse[r], acc[d][2 * r + 1] * inverse[r]);
      }
    }
    if (lane % 4 == 0) *slab(args.lse, args.lse_strides, seq, head, bounds.q_start + row) = lse[r];
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
  kernel<<<grid, kThreads, Shape::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace attention
}  // namespace tformer
