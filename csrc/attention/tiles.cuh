// Building blocks of the attention kernels: the block shape, per-sequence bounds, the mask,
// shared-memory tiles filled by cp.async, and the two warp-level matrix products every pass
// is made of (FlashAttention-2's S = Q K^T and O += P V shapes).
//
// Every kernel runs 4 warps; each warp owns 16 rows of its block's (M or N) side, so the
// softmax statistics and the accumulators of a row never leave the warp (FA2, Section 3.3:
// split the rows, not the reduction, across warps).
#pragma once

#include <cuda_runtime.h>
#include <math.h>

#include <cstdint>

#include "attention/attention.h"
#include "attention/mma.cuh"

namespace tformer {
namespace attention {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 16;  // the M of mma.m16n8k16
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory tiles hold kD columns plus 8 of padding per row: consecutive rows then start
// 16 bytes apart modulo 128, so the 8 row addresses of one ldmatrix fall in distinct banks.
template <int kD> constexpr int smem_stride() { return kD + 8; }

struct SequenceBounds {
  int q_start, q_len, k_start, k_len;
};

__device__ __forceinline__ SequenceBounds sequence_bounds(const AttentionProblem& p, int seq) {
  if (p.cu_seqlens_q != nullptr) {
    const int q_start = p.cu_seqlens_q[seq], k_start = p.cu_seqlens_k[seq];
    return {q_start, p.cu_seqlens_q[seq + 1] - q_start, k_start, p.cu_seqlens_k[seq + 1] - k_start};
  }
  return {0, p.max_seqlen_q, 0, p.max_seqlen_k};
}

// Whether query `row` may attend key `col` (both indices within the sequence), in two parts
// so the kernels evaluate the key part (a global load with padding) once per key, not once
// per (row, key) pair.
struct KeyMask {
  const uint8_t* padding;  // this sequence's row of the key padding mask, or nullptr
  int64_t padding_stride;
  int q_len, k_len;
  bool causal;

  // Key `col` exists and is not padding.
  __device__ __forceinline__ bool key_ok(int col) const {
    return col < k_len && (padding == nullptr || padding[col * padding_stride] == 0);
  }
  // Query `row` exists and, under causal (top-left aligned), reaches key `col`.
  __device__ __forceinline__ bool query_sees(int row, int col) const {
    return row < q_len && (!causal || col <= row);
  }
};

// Calls fn(j, e, r, allowed) for each element of a warp's 16 x kN score fragment (mma
// m16n8 accumulators: element e = 2 r + c of block j is query row0 + lane / 4 + 8 r, key
// n0 + 8 j + 2 (lane % 4) + c), `allowed` saying whether that query attends that key. The
// key part of the mask is evaluated once per key.
template <int kN, typename Fn>
__device__ __forceinline__ void for_each_score(const KeyMask& mask, int row0, int n0, int lane, Fn&& fn) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = n0 + j * 8 + 2 * (lane % 4) + c;
      const bool key_ok = mask.key_ok(col);
#pragma unroll
      for (int r = 0; r < 2; ++r) fn(j, 2 * r + c, r, key_ok && mask.query_sees(row0 + lane / 4 + r * 8, col));
    }
  }
}

__device__ __forceinline__ KeyMask key_mask(const AttentionProblem& p, int seq, const SequenceBounds& b) {
  const uint8_t* padding = p.key_padding == nullptr ? nullptr : p.key_padding + seq * p.key_padding_seq_stride;
  return {padding, p.key_padding_token_stride, b.q_len, b.k_len, p.causal};
}

// The first element of (seq, head, token = first) of a strided tensor.
template <typename T>
__device__ __forceinline__ T* slab(T* base, const Strides3& s, int seq, int head, int first) {
  return base + seq * s.seq + head * s.head + static_cast<int64_t>(first) * s.token;
}

// Asynchronously copies rows row0 .. row0 + kRows of a (token, dim) slab into a shared tile;
// rows >= len and columns >= head_dim are zero-filled, never read (any length, any head dim
// that is a multiple of 8).
template <typename T, int kRows, int kD>
__device__ __forceinline__ void load_tile_async(T* tile, const T* slab_base, int64_t token_stride, int row0, int len,
                                                int head_dim) {
  constexpr int kChunksPerRow = kD / 8;  // 16-byte chunks
  for (int i = threadIdx.x; i < kRows * kChunksPerRow; i += kThreads) {
    const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * 8;
    const int row = row0 + r;
    const bool valid = row < len && c < head_dim;
    const T* src = valid ? slab_base + static_cast<int64_t>(row) * token_stride + c : slab_base;
    cp_async_16(tile + r * smem_stride<kD>() + c, src, valid);
  }
}

// acc (16 x kN) += A (16 x kK) * B^T, A and B row-major in shared memory with row stride
// `stride`: A's 16 rows start at `a`, B's kN rows at `b`. (S = Q K^T, dP = dO V^T, ...)
template <typename T, int kN, int kK>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[kN / 8][4], const T* a, const T* b, int stride,
                                              int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "tiles are multiples of 16");
#pragma unroll
  for (int kk = 0; kk < kK; kk += 16) {
    uint32_t af[4];
    // Matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0..a3.
    ldmatrix_x4(af, a + (lane % 16) * stride + kk + (lane / 16) * 8);
#pragma unroll
    for (int n = 0; n < kN; n += 16) {
      uint32_t bf[4];
      // Matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15): B rows are
      // n, so the untransposed load gives b0, b1 of two n-tiles.
      ldmatrix_x4(bf, b + (n + lane % 8 + (lane / 16) * 8) * stride + kk + ((lane / 8) % 2) * 8);
      mma_16x8x16<T>(acc[n / 8], af, bf[0], bf[1]);
      mma_16x8x16<T>(acc[n / 8 + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 x kD) += P (16 x kK, fp32 accumulator fragments, rounded to T) * B, B (kK x kD)
// row-major in shared memory at `b`. The accumulator layout of two n-tiles is exactly the A
// layout of one k-step, so P never leaves registers (O += P V, dV += P^T dO, dQ += dS K, ...).
template <typename T, int kK, int kD>
__device__ __forceinline__ void warp_gemm_pb(float (&acc)[kD / 8][4], const float (&p)[kK / 8][4], const T* b,
                                             int stride, int lane) {
  static_assert(kK % 16 == 0 && kD % 16 == 0, "tiles are multiples of 16");
#pragma unroll
  for (int kk = 0; kk < kK; kk += 16) {
    const int j = kk / 8;
    const uint32_t af[4] = {pack2<T>(p[j][0], p[j][1]), pack2<T>(p[j][2], p[j][3]), pack2<T>(p[j + 1][0], p[j + 1][1]),
                            pack2<T>(p[j + 1][2], p[j + 1][3])};
#pragma unroll
    for (int d = 0; d < kD; d += 16) {
      uint32_t bf[4];
      // Matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), stored with
      // k as the row: the transposed load gives b0, b1 of two n-tiles.
      ldmatrix_x4_trans(bf, b + (kk + lane % 8 + ((lane / 8) % 2) * 8) * stride + d + (lane / 16) * 8);
      mma_16x8x16<T>(acc[d / 8], af, bf[0], bf[1]);
      mma_16x8x16<T>(acc[d / 8 + 1], af, bf[2], bf[3]);
    }
  }
}

// Stores a warp's 16 x kD accumulator (times `factor`) as T to rows row0 + 0..15 of a slab;
// rows >= len and columns >= head_dim are skipped.
template <typename T, int kD>
__device__ __forceinline__ void store_rows(T* slab_base, int64_t token_stride, const float (&acc)[kD / 8][4],
                                           float factor, int row0, int len, int head_dim, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + lane / 4 + half * 8;
    if (row >= len) continue;
    T* out = slab_base + static_cast<int64_t>(row) * token_stride;
#pragma unroll
    for (int d = 0; d < kD / 8; ++d) {
      const int col = d * 8 + 2 * (lane % 4);
      if (col < head_dim) {  // head_dim is a multiple of 8: col + 1 is in range too
        *reinterpret_cast<uint32_t*>(out + col) =
            pack2<T>(acc[d][2 * half] * factor, acc[d][2 * half + 1] * factor);
      }
    }
  }
}

template <int kTiles>
__device__ __forceinline__ void zero(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Reductions over the 4 lanes (a quad) that share an accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Opts a kernel into more than the default 48 KiB of dynamic shared memory when it needs it.
template <typename Kernel>
inline cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace attention
}  // namespace tformer
