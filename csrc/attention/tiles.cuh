// Building blocks of the attention kernels: the block shape, per-sequence bounds, the mask,
// shared-memory tiles filled by cp.async, and the two warp-level matrix products every pass
// is made of (FlashAttention-2's S = Q K^T and O += P V shapes).
//
// Each warp owns whole rows of its block's (M or N) side, in row tiles of 16 (the M of
// mma.m16n8k16), so the softmax statistics and the accumulators of a row never leave the
// warp (FA2, Section 3.3: split the rows, not the reduction, across warps). The warps per
// block and row tiles per warp are each pass's (block_shapes.h).
#pragma once

#include <cuda_runtime.h>
#include <math.h>

#include <cstdint>

#include "attention/attention.h"
#include "attention/mma.cuh"

namespace tformer {
namespace attention {

constexpr int kTileRows = 16;  // the M of mma.m16n8k16
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
  // The band (AttentionProblem): key j is in query i's band when
  // i + offset - left <= j <= i + offset + right; a bound < 0 is unbounded.
  int offset, left, right;

  // Key `col` exists and is not padding.
  __device__ __forceinline__ bool key_ok(int col) const {
    return col < k_len && (padding == nullptr || padding[col * padding_stride] == 0);
  }
  // Query `row` exists and key `col` lies in its band.
  __device__ __forceinline__ bool query_sees(int row, int col) const {
    return row < q_len && (right < 0 || col <= row + offset + right) && (left < 0 || col >= row + offset - left);
  }
  // Keys [first, end) that rows [row_begin, row_end) may see: the union of their bands.
  __device__ __forceinline__ int first_key(int row_begin) const {
    return left < 0 ? 0 : max(0, row_begin + offset - left);
  }
  __device__ __forceinline__ int key_end(int row_end) const {
    return right < 0 ? k_len : max(0, min(k_len, row_end + offset + right));
  }
  // Rows [first, end) whose bands reach keys [col_begin, col_end).
  __device__ __forceinline__ int first_row(int col_begin) const {
    return right < 0 ? 0 : max(0, col_begin - offset - right);
  }
  __device__ __forceinline__ int row_end(int col_end) const {
    return left < 0 ? q_len : max(0, min(q_len, col_end - offset + left));
  }
};

// Calls fn(t, j, e, r, allowed) for each element of a warp's kTiles x 16 x kN score
// fragments (mma m16n8 accumulators: element e = 2 r + c of block j of row tile t is query
// row0 + 16 t + lane / 4 + 8 r, key n0 + 8 j + 2 (lane % 4) + c), `allowed` saying whether
// that query attends that key. The key part of the mask is evaluated once per key.
template <int kTiles, int kN, typename Fn>
__device__ __forceinline__ void for_each_score(const KeyMask& mask, int row0, int n0, int lane, Fn&& fn) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = n0 + j * 8 + 2 * (lane % 4) + c;
      const bool key_ok = mask.key_ok(col);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          fn(t, j, 2 * r + c, r, key_ok && mask.query_sees(row0 + t * 16 + lane / 4 + r * 8, col));
        }
      }
    }
  }
}

__device__ __forceinline__ KeyMask key_mask(const AttentionProblem& p, int seq, const SequenceBounds& b) {
  const uint8_t* padding = p.key_padding == nullptr ? nullptr : p.key_padding + seq * p.key_padding_seq_stride;
  return {padding, p.key_padding_token_stride, b.q_len, b.k_len, p.bottom_right ? b.k_len - b.q_len : 0,
          p.window_left, p.window_right};
}

// Whether the band cuts the block of rows [row_first, row_last] x keys [n0, n0 + kN): some
// key of it lies outside some row's band.
template <int kN>
__device__ __forceinline__ bool band_cuts_block(const KeyMask& mask, int row_first, int row_last, int n0) {
  return (mask.right >= 0 && n0 + kN - 1 > row_first + mask.offset + mask.right) ||
         (mask.left >= 0 && n0 < row_last + mask.offset - mask.left);
}

// Whether a (query rows m0 .. m0 + kM) x (keys n0 .. n0 + kN) block needs the mask: it holds
// padding keys, keys or rows past the sequence, or keys outside some row's band. Every other
// block runs with no mask arithmetic at all (FA2 masks only the boundary blocks).
template <int kM, int kN>
__device__ __forceinline__ bool block_needs_mask(const KeyMask& mask, int m0, int n0) {
  return mask.padding != nullptr || n0 + kN > mask.k_len || m0 + kM > mask.q_len ||
         band_cuts_block<kN>(mask, m0, m0 + kM - 1, n0);
}

// As block_needs_mask, for a pass that never stores rows past q_len (the forward, the dQ
// pass): those rows need no mask.
template <int kN>
__device__ __forceinline__ bool stored_rows_need_mask(const KeyMask& mask, int m0, int row_end, int n0) {
  return mask.padding != nullptr || n0 + kN > mask.k_len || band_cuts_block<kN>(mask, m0, row_end - 1, n0);
}

// Soft-capping of raw q.k products, in log2 units for exp2: softcap * tanh(x * scale / softcap)
// * log2(e) when softcap > 0, else x * scale * log2(e). tanh() returns the tanh too, which the
// backward's derivative 1 - tanh^2 needs.
struct ScoreMap {
  float scale_log2;  // scale * log2(e), uncapped
  float cap_in;      // scale / softcap
  float cap_out;     // softcap * log2(e)
  bool capped;

  __device__ __forceinline__ float tanh(float x) const { return tanhf(x * cap_in); }
  __device__ __forceinline__ float operator()(float x) const {
    return capped ? tanh(x) * cap_out : x * scale_log2;
  }
};

__device__ __forceinline__ ScoreMap score_map(const AttentionProblem& p) {
  const bool capped = p.softcap > 0.f;
  return {p.scale * kLog2e, capped ? p.scale / p.softcap : 0.f, p.softcap * kLog2e, capped};
}

// The first element of (seq, head, token = first) of a strided tensor.
template <typename T>
__device__ __forceinline__ T* slab(T* base, const Strides3& s, int seq, int head, int first) {
  return base + seq * s.seq + head * s.head + static_cast<int64_t>(first) * s.token;
}

// Asynchronously copies rows row0 .. row0 + kRows of a (token, dim) slab into a shared tile
// with the kBlockThreads threads of a block; rows >= len and columns >= head_dim are zero-filled,
// never read (any length, any head dim that is a multiple of 8).
template <int kBlockThreads, typename T, int kRows, int kD>
__device__ __forceinline__ void load_tile_async(T* tile, const T* slab_base, int64_t token_stride, int row0, int len,
                                                int head_dim) {
  constexpr int kChunksPerRow = kD / 8;  // 16-byte chunks
  // Kept rolled: unrolled, ptxas hoists each copy's 64-bit source address out of the key loop,
  // and with the forward's 32-row-a-warp accumulators those spill (hd 128: 4 LDL.64 a step).
#pragma unroll 1
  for (int i = threadIdx.x; i < kRows * kChunksPerRow; i += kBlockThreads) {
    const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * 8;
    const int row = row0 + r;
    const bool valid = row < len && c < head_dim;
    const T* src = valid ? slab_base + static_cast<int64_t>(row) * token_stride + c : slab_base;
    cp_async_16(tile + r * smem_stride<kD>() + c, src, valid);
  }
}

// acc (kTiles x 16 x kN) += A (kTiles x 16 x kK) * B^T, A and B row-major in shared memory with
// row stride `stride`: A's 16 kTiles rows start at `a`, B's kN rows at `b`. Each B fragment is
// loaded once and used by all kTiles row tiles (S = Q K^T, dP = dO V^T, ...).
template <typename T, int kTiles, int kN, int kK>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[kTiles][kN / 8][4], const T* a, const T* b, int stride,
                                              int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "tiles are multiples of 16");
#pragma unroll
  for (int kk = 0; kk < kK; kk += 16) {
    uint32_t af[kTiles][4];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      // Matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0..a3.
      ldmatrix_x4(af[t], a + (t * 16 + lane % 16) * stride + kk + (lane / 16) * 8);
    }
#pragma unroll
    for (int n = 0; n < kN; n += 16) {
      uint32_t bf[4];
      // Matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15): B rows are
      // n, so the untransposed load gives b0, b1 of two n-tiles.
      ldmatrix_x4(bf, b + (n + lane % 8 + (lane / 16) * 8) * stride + kk + ((lane / 8) % 2) * 8);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        mma_16x8x16<T>(acc[t][n / 8], af[t], bf[0], bf[1]);
        mma_16x8x16<T>(acc[t][n / 8 + 1], af[t], bf[2], bf[3]);
      }
    }
  }
}

// acc (kTiles x 16 x kD) += P (kTiles x 16 x kK, fp32 accumulator fragments, rounded to T) * B,
// B (kK x kD) row-major in shared memory at `b`. The accumulator layout of two n-tiles is
// exactly the A layout of one k-step, so P never leaves registers (O += P V, dV += P^T dO,
// dQ += dS K, ...); each B fragment serves all kTiles row tiles.
template <typename T, int kTiles, int kK, int kD>
__device__ __forceinline__ void warp_gemm_pb(float (&acc)[kTiles][kD / 8][4], const float (&p)[kTiles][kK / 8][4],
                                             const T* b, int stride, int lane) {
  static_assert(kK % 16 == 0 && kD % 16 == 0, "tiles are multiples of 16");
#pragma unroll
  for (int kk = 0; kk < kK; kk += 16) {
    const int j = kk / 8;
    uint32_t af[kTiles][4];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      af[t][0] = pack2<T>(p[t][j][0], p[t][j][1]);
      af[t][1] = pack2<T>(p[t][j][2], p[t][j][3]);
      af[t][2] = pack2<T>(p[t][j + 1][0], p[t][j + 1][1]);
      af[t][3] = pack2<T>(p[t][j + 1][2], p[t][j + 1][3]);
    }
#pragma unroll
    for (int d = 0; d < kD; d += 16) {
      uint32_t bf[4];
      // Matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), stored with
      // k as the row: the transposed load gives b0, b1 of two n-tiles.
      ldmatrix_x4_trans(bf, b + (kk + lane % 8 + ((lane / 8) % 2) * 8) * stride + d + (lane / 16) * 8);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        mma_16x8x16<T>(acc[t][d / 8], af[t], bf[0], bf[1]);
        mma_16x8x16<T>(acc[t][d / 8 + 1], af[t], bf[2], bf[3]);
      }
    }
  }
}

// Epilogue, step 1: writes a warp's kTiles x 16 x kD accumulator (times factor[t][r] for the
// lane's rows) as T into the warp's own rows of a shared tile (row stride `stride`). With
// the 8-element row padding the 32 lanes' 4-byte writes fall in distinct banks.
template <typename T, int kTiles, int kD>
__device__ __forceinline__ void stage_rows(T* tile, int stride, const float (&acc)[kTiles][kD / 8][4],
                                           const float (&factor)[kTiles][2], int lane) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      T* row = tile + (t * 16 + lane / 4 + r * 8) * stride;
#pragma unroll
      for (int d = 0; d < kD / 8; ++d) {
        *reinterpret_cast<uint32_t*>(row + d * 8 + 2 * (lane % 4)) =
            pack2<T>(acc[t][d][2 * r] * factor[t][r], acc[t][d][2 * r + 1] * factor[t][r]);
      }
    }
  }
}

// Epilogue, step 2: copies a warp's kRows staged rows to rows row0 .. row0 + kRows of a slab
// in 16-byte stores (consecutive lanes write consecutive chunks of a row: full 128-byte
// lines); rows >= len and columns >= head_dim are skipped. The slab's rows must be 16-byte
// aligned (the bindings allocate the outputs contiguous, head dims are multiples of 8).
template <typename T, int kRows, int kD>
__device__ __forceinline__ void store_staged_rows(T* slab_base, int64_t token_stride, const T* tile, int stride,
                                                  int row0, int len, int head_dim, int lane) {
  constexpr int kChunksPerRow = kD / 8;
#pragma unroll
  for (int i = lane; i < kRows * kChunksPerRow; i += 32) {
    const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * 8;
    if (row0 + r < len && c < head_dim) {
      *reinterpret_cast<uint4*>(slab_base + static_cast<int64_t>(row0 + r) * token_stride + c) =
          *reinterpret_cast<const uint4*>(tile + r * stride + c);
    }
  }
}

template <int kTiles>
__device__ __forceinline__ void zero(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}
template <int kTiles, int kCols>
__device__ __forceinline__ void zero(float (&acc)[kTiles][kCols][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) zero(acc[t]);
}

// Opts a kernel into more than the default 48 KiB of dynamic shared memory when it needs it.
template <typename Kernel>
inline cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace attention
}  // namespace tformer
