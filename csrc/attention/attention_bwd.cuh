// Flash attention backward (FlashAttention-2, Dao 2023, Algorithm 2) on mma.sync tensor
// cores, split into two passes as in its Section 3.2 so that no atomics are needed and the
// result is deterministic:
//
//   key_grad_kernel    one block per kBlockN keys of a (sequence, kv head); it loops over the
//                      query heads of the group (grouped-query attention) and their query
//                      blocks in a fixed order, accumulating dK and dV in registers.
//   query_grad_kernel  one block per 64 query rows of a (sequence, query head), looping over
//                      key blocks, accumulating dQ in registers.
//
// Both recompute P = exp2(S * scale * log2(e) - lse * log2(e)) from q, k and the saved
// log-sum-exp (memory O(S)); with delta_i = rowsum(dO_i * O_i) (delta_kernel, run first),
// dS = P * (dP - delta) where dP = dO V^T. A fully masked row has lse = -inf: it is measured
// against 0 and all its scores are masked, so its P, hence its gradients, are 0.
#pragma once

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

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) key_grad_kernel(const AttentionBackwardArgs args) {
  using Shape = KeyGradShape<kD>;
  constexpr int kM = Shape::kBlockM, kN = Shape::kBlockN, kStride = smem_stride<kD>();
  constexpr int kColumns = Shape::kColumns;  // of dK and dV, from column col0 on
  static_assert(kN == kWarps * kRowsPerWarp, "each warp owns 16 keys");
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* k_tile = reinterpret_cast<T*>(shared_bytes);
  T* v_tile = k_tile + kN * kStride;
  T* q_tile = v_tile + kN * kStride;
  T* dout_tile = q_tile + kM * kStride;
  float* lse_tile = reinterpret_cast<float*>(dout_tile + kM * kStride);  // log2 units
  float* delta_tile = lse_tile + kM;

  const AttentionProblem& p = args.problem;
  const int n0 = (blockIdx.x / Shape::kColumnSplit) * kN, kv_head = blockIdx.y, seq = blockIdx.z;
  const int col0 = (blockIdx.x % Shape::kColumnSplit) * kColumns;
  const SequenceBounds bounds = sequence_bounds(p, seq);
  if (n0 >= bounds.k_len || col0 >= p.head_dim) return;
  const KeyMask mask = key_mask(p, seq, bounds);
  load_tile_async<T, kN, kD>(k_tile, slab(static_cast<const T*>(p.k), p.k_strides, seq, kv_head, bounds.k_start),
                             p.k_strides.token, n0, bounds.k_len, p.head_dim);
  load_tile_async<T, kN, kD>(v_tile, slab(static_cast<const T*>(p.v), p.v_strides, seq, kv_head, bounds.k_start),
                             p.v_strides.token, n0, bounds.k_len, p.head_dim);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_key0 = n0 + warp * kRowsPerWarp;  // this warp's first key
  const float scale_log2 = p.scale * kLog2e;
  float dk[kColumns / 8][4], dv[kColumns / 8][4];
  zero(dk);
  zero(dv);
  // This lane's keys (warp_key0 + lane / 4 and + 8) are fixed for the whole kernel.
  const bool key_ok[2] = {mask.key_ok(warp_key0 + lane / 4), mask.key_ok(warp_key0 + lane / 4 + 8)};
  // Causal: key j is seen only by rows i >= j, so query blocks above n0 are skipped.
  const int m_begin = p.causal ? (n0 / kM) * kM : 0;

  // A fixed order over the group's query heads and their blocks: deterministic sums.
  for (int g = 0; g < p.group_size; ++g) {
    const int head = kv_head * p.group_size + g;
    const T* q = slab(static_cast<const T*>(p.q), p.q_strides, seq, head, bounds.q_start);
    const T* dout = slab(static_cast<const T*>(args.dout), args.dout_strides, seq, head, bounds.q_start);
    const float* lse = slab(args.lse, args.lse_strides, seq, head, bounds.q_start);
    const float* delta = slab(static_cast<const float*>(args.delta), args.lse_strides, seq, head, bounds.q_start);
    for (int m0 = m_begin; m0 < bounds.q_len; m0 += kM) {
      load_tile_async<T, kM, kD>(q_tile, q, p.q_strides.token, m0, bounds.q_len, p.head_dim);
      load_tile_async<T, kM, kD>(dout_tile, dout, args.dout_strides.token, m0, bounds.q_len, p.head_dim);
      cp_async_commit();
      for (int i = threadIdx.x; i < kM; i += kThreads) {
        const int row = m0 + i;
        lse_tile[i] = lse_log2(lse, args.lse_strides.token, row, bounds.q_len);
        delta_tile[i] = row < bounds.q_len ? delta[row * args.lse_strides.token] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

      // P^T (this warp's 16 keys x kM queries) = exp2(K Q^T * scale * log2(e) - lse).
      float pt[kM / 8][4];
      zero(pt);
      warp_gemm_abt<T, kM, kD>(pt, k_tile + warp * kRowsPerWarp * kStride, q_tile, kStride, lane);
#pragma unroll
      for (int j = 0; j < kM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // (key lane / 4 + 8 (e / 2), query 2 (lane % 4) + e % 2)
          const int key = warp_key0 + lane / 4 + (e / 2) * 8, i = j * 8 + 2 * (lane % 4) + (e % 2);
          pt[j][e] = key_ok[e / 2] && mask.query_sees(m0 + i, key) ? exp2f(pt[j][e] * scale_log2 - lse_tile[i])
                                                                   : 0.f;
        }
      }
      warp_gemm_pb<T, kM, kColumns>(dv, pt, dout_tile + col0, kStride, lane);  // dV += P^T dO

      // dS^T = P^T * (dP^T - delta), dP^T = V dO^T.
      float dst[kM / 8][4];
      zero(dst);
      warp_gemm_abt<T, kM, kD>(dst, v_tile + warp * kRowsPerWarp * kStride, dout_tile, kStride, lane);
#pragma unroll
      for (int j = 0; j < kM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = j * 8 + 2 * (lane % 4) + (e % 2);
          dst[j][e] = pt[j][e] * (dst[j][e] - delta_tile[i]);
        }
      }
      warp_gemm_pb<T, kM, kColumns>(dk, dst, q_tile + col0, kStride, lane);  // dK += dS^T Q, scaled at the end
      __syncthreads();  // the next block's loads overwrite the tiles read here
    }
  }
  cp_async_wait<0>();  // nothing in flight at exit (no query block: the K and V tiles)

  // Every key of the block is written, zeros included (keys no query may see).
  store_rows<T, kColumns>(slab(static_cast<T*>(args.dk), args.dk_strides, seq, kv_head, bounds.k_start) + col0,
                          args.dk_strides.token, dk, p.scale, warp_key0, bounds.k_len, p.head_dim - col0, lane);
  store_rows<T, kColumns>(slab(static_cast<T*>(args.dv), args.dv_strides, seq, kv_head, bounds.k_start) + col0,
                          args.dv_strides.token, dv, 1.f, warp_key0, bounds.k_len, p.head_dim - col0, lane);
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) query_grad_kernel(const AttentionBackwardArgs args) {
  using Shape = QueryGradShape<kD>;
  constexpr int kM = Shape::kBlockM, kN = Shape::kBlockN, kStride = smem_stride<kD>();
  static_assert(kM == kWarps * kRowsPerWarp, "each warp owns 16 query rows");
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
  const int key_end = p.causal ? min(bounds.k_len, m0 + kM) : bounds.k_len;
  const int num_steps = static_cast<int>(ceil_div(key_end, kN));

  load_tile_async<T, kM, kD>(q_tile, slab(static_cast<const T*>(p.q), p.q_strides, seq, head, bounds.q_start),
                             p.q_strides.token, m0, bounds.q_len, p.head_dim);
  load_tile_async<T, kM, kD>(dout_tile,
                             slab(static_cast<const T*>(args.dout), args.dout_strides, seq, head, bounds.q_start),
                             args.dout_strides.token, m0, bounds.q_len, p.head_dim);
  if (num_steps > 0) {
    load_tile_async<T, kN, kD>(k_tiles, k, p.k_strides.token, 0, bounds.k_len, p.head_dim);
    load_tile_async<T, kN, kD>(v_tiles, v, p.v_strides.token, 0, bounds.k_len, p.head_dim);
  }
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row0 = m0 + warp * kRowsPerWarp;
  const float scale_log2 = p.scale * kLog2e;
  const float* lse = slab(args.lse, args.lse_strides, seq, head, bounds.q_start);
  const float* delta = slab(static_cast<const float*>(args.delta), args.lse_strides, seq, head, bounds.q_start);
  float row_lse[2], row_delta[2];  // lane rows warp_row0 + lane / 4 (+ 8)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row0 + lane / 4 + r * 8;
    row_lse[r] = lse_log2(lse, args.lse_strides.token, row, bounds.q_len);
    row_delta[r] = row < bounds.q_len ? delta[row * args.lse_strides.token] : 0.f;
  }
  float dq[kD / 8][4];
  zero(dq);

  for (int step = 0; step < num_steps; ++step) {
    const int buffer = step & 1;
    if (step + 1 < num_steps) {
      const int next = (step + 1) * kN;
      load_tile_async<T, kN, kD>(k_tiles + (buffer ^ 1) * kN * kStride, k, p.k_strides.token, next, bounds.k_len,
                                 p.head_dim);
      load_tile_async<T, kN, kD>(v_tiles + (buffer ^ 1) * kN * kStride, v, p.v_strides.token, next, bounds.k_len,
                                 p.head_dim);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_tile = k_tiles + buffer * kN * kStride;
    const T* v_tile = v_tiles + buffer * kN * kStride;

    float pr[kN / 8][4];  // P, then dS
    zero(pr);
    warp_gemm_abt<T, kN, kD>(pr, q_tile + warp * kRowsPerWarp * kStride, k_tile, kStride, lane);
    float dp[kN / 8][4];
    zero(dp);
    warp_gemm_abt<T, kN, kD>(dp, dout_tile + warp * kRowsPerWarp * kStride, v_tile, kStride, lane);
    for_each_score<kN>(mask, warp_row0, step * kN, lane, [&](int j, int e, int r, bool allowed) {
      const float prob = allowed ? exp2f(pr[j][e] * scale_log2 - row_lse[r]) : 0.f;
      pr[j][e] = prob * (dp[j][e] - row_delta[r]);  // dS
    });
    warp_gemm_pb<T, kN, kD>(dq, pr, k_tile, kStride, lane);  // dQ += dS K (scaled at the end)
    __syncthreads();
  }
  cp_async_wait<0>();
  store_rows<T, kD>(slab(static_cast<T*>(args.dq), args.dq_strides, seq, head, bounds.q_start), args.dq_strides.token,
                    dq, p.scale, warp_row0, bounds.q_len, p.head_dim, lane);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int smem_bytes, const AttentionBackwardArgs& args,
                   cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (cudaError_t error = allow_shared_memory(kernel, smem_bytes); error != cudaSuccess) return error;
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t run_backward(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionProblem& p = args.problem;
  const dim3 delta_grid(static_cast<unsigned>(ceil_div(p.max_seqlen_q, 8)), p.num_heads, p.num_seqs);
  if (delta_grid.x > 0 && delta_grid.y > 0 && delta_grid.z > 0) {
    delta_kernel<T><<<delta_grid, 256, 0, stream>>>(args);
    if (cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  }
  const dim3 key_grid(static_cast<unsigned>(ceil_div(p.max_seqlen_k, KeyGradShape<kD>::kBlockN) *
                                            KeyGradShape<kD>::kColumnSplit),
                      p.num_heads / p.group_size, p.num_seqs);
  if (cudaError_t error = launch(key_grad_kernel<T, kD>, key_grid, KeyGradShape<kD>::kSmemBytes, args, stream);
      error != cudaSuccess) {
    return error;
  }
  const dim3 query_grid(static_cast<unsigned>(ceil_div(p.max_seqlen_q, QueryGradShape<kD>::kBlockM)), p.num_heads,
                        p.num_seqs);
  return launch(query_grad_kernel<T, kD>, query_grid, QueryGradShape<kD>::kSmemBytes, args, stream);
}

}  // namespace attention
}  // namespace tformer
