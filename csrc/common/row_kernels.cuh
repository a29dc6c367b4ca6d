// Building blocks shared by the row-wise kernels (LayerNorm, RMSNorm, softmax): dtype
// conversion, 128-bit vector loads, the walk over one row, and the reductions of a row's
// team of threads (one warp for short rows, one block for long rows).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/convert.cuh"
#include "common/dtype.h"

namespace tformer {

// Every row kernel runs 256-thread blocks: 8 rows per block (a warp each) for short rows,
// 1 row per block (8 warps) for long rows.
constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
// Rows up to this length go one per warp: at most 1024 / 32 = 32 elements per lane, so a
// warp-shuffle reduction is enough; longer rows need a block to keep enough loads in flight.
constexpr int kMaxWarpRowLength = 1024;
// Cap on the grid; the kernels loop over rows with a grid stride beyond it.
constexpr int64_t kMaxGridBlocks = 1 << 20;

// fp32 arithmetic everywhere: to_float / from_float (common/convert.cuh) at loads and stores.

// Elements per 128-bit access.
template <typename T> constexpr int kVectorWidth = static_cast<int>(16 / sizeof(T));

template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

// p must be aligned to V elements.
template <int V, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_float(pack.v[i]);
}

// 32-bit word `w` of `in` rounded to T: one float, or two 16-bit values with in[2w] low.
template <typename T, int V>
__device__ __forceinline__ uint32_t pack_word(const float (&in)[V], int w) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(in[w]);
  } else {
    const T lo = from_float<T>(in[2 * w]), hi = from_float<T>(in[2 * w + 1]);
    return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&lo)) |
           (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
  }
}

// One 16-byte (or 8-byte) global store of 32-bit words, p aligned to its size. Inline PTX:
// a plain store of a Pack or a uint4 may be split by the compiler into one store per element
// or per word, and the __stwb intrinsic is a strong store. "memory": later loads of the same
// row (LayerNorm's pass 2 re-reads residual_out) must not move above it.
__device__ __forceinline__ void store_words(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
__device__ __forceinline__ void store_words(void* p, uint32_t a, uint32_t b) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b) : "memory");
}

// p must be aligned to V elements; V elements of T are one 128-bit store (or 64-bit for V = 2
// floats), assembled in 32-bit words.
template <int V, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[V]) {
  constexpr int kWords = V * static_cast<int>(sizeof(T)) / 4;
  if constexpr (kWords == 4) {
    store_words(p, pack_word<T>(in, 0), pack_word<T>(in, 1), pack_word<T>(in, 2), pack_word<T>(in, 3));
  } else if constexpr (kWords == 2) {
    store_words(p, pack_word<T>(in, 0), pack_word<T>(in, 1));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = from_float<T>(in[i]);
  }
}

// W consecutive values of a float32 parameter vector (weight, bias) from p[col]: 128-bit loads
// when p + col is 16-byte aligned (always, for rows whose length is a multiple of the vector
// width), scalar loads otherwise. The branch is the same for a whole row.
template <int W>
__device__ __forceinline__ void load_params(const float* p, int col, float (&out)[W]) {
  if constexpr (W % 4 == 0) {
    if ((reinterpret_cast<uintptr_t>(p + col) & 15) == 0) {
#pragma unroll
      for (int i = 0; i < W; i += 4) {
        const float4 f = *reinterpret_cast<const float4*>(p + col + i);
        out[i] = f.x, out[i + 1] = f.y, out[i + 2] = f.z, out[i + 3] = f.w;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < W; ++i) out[i] = p[col + i];
}

template <int V>
using Width = std::integral_constant<int, V>;

// Calls fn(Width<W>{}, col) so that every column of the row [row_start, row_start + n) of
// an array whose base is 16-byte aligned is visited once by one of `lanes` threads: a
// scalar head up to the first aligned element (rows of a length that is not a multiple of
// kVec start unaligned), an aligned kVec-wide body, a scalar tail. W is 1 or kVec.
template <int kVec, typename Fn>
__device__ __forceinline__ void for_each_column(int64_t row_start, int n, int lane, int lanes, Fn&& fn) {
  const int misalign = static_cast<int>(row_start % kVec);
  const int head = min(n, misalign == 0 ? 0 : kVec - misalign);
  for (int col = lane; col < head; col += lanes) fn(Width<1>{}, col);
  const int body = (n - head) / kVec;
  for (int i = lane; i < body; i += lanes) fn(Width<kVec>{}, head + i * kVec);
  for (int col = head + body * kVec + lane; col < n; col += lanes) fn(Width<1>{}, col);
}

// ---- which rows a thread works on ---------------------------------------------------------
// A row's team is kWarps warps (kTeamLanes<kWarps> threads); a block holds kBlockThreads /
// kTeamLanes teams, and the grid strides over the rows beyond its size.
template <int kWarps> constexpr int kTeamLanes = kWarps * kWarpSize;

// Calls body(row, lane) for every row of this thread's team, lane being the thread's index
// within the team. A team's threads see the same rows, so a body may reduce over the team.
template <int kWarps, typename Body>
__device__ __forceinline__ void for_each_team_row(int64_t rows, Body&& body) {
  constexpr int kLanes = kTeamLanes<kWarps>;
  constexpr int kTeams = kBlockThreads / kLanes;
  const int lane = threadIdx.x % kLanes;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / kLanes; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kTeams) {
    body(row, lane);
  }
}

// ---- reductions over a row's team of kWarps warps ------------------------------------------
// Values are combined in a fixed order and the result is taken from one place, so every
// thread of the team sees the same bits and reruns give the same bits.
__device__ __forceinline__ float shuffle_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
__device__ __forceinline__ float2 shuffle_xor(float2 v, int mask) {
  return make_float2(__shfl_xor_sync(0xffffffffu, v.x, mask), __shfl_xor_sync(0xffffffffu, v.y, mask));
}
__device__ __forceinline__ float3 shuffle_xor(float3 v, int mask) {
  return make_float3(__shfl_xor_sync(0xffffffffu, v.x, mask), __shfl_xor_sync(0xffffffffu, v.y, mask),
                     __shfl_xor_sync(0xffffffffu, v.z, mask));
}
__device__ __forceinline__ float shuffle_lane0(float v) { return __shfl_sync(0xffffffffu, v, 0); }
__device__ __forceinline__ float2 shuffle_lane0(float2 v) { return make_float2(shuffle_lane0(v.x), shuffle_lane0(v.y)); }
__device__ __forceinline__ float3 shuffle_lane0(float3 v) {
  return make_float3(shuffle_lane0(v.x), shuffle_lane0(v.y), shuffle_lane0(v.z));
}

// `shared` holds kWarps values; with kWarps > 1 the whole block must call this (the team is
// the block), because it synchronizes the block.
template <int kWarps, typename T, typename Combine>
__device__ __forceinline__ T team_reduce(T value, Combine combine, T* shared) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value = combine(value, shuffle_xor(value, offset));
  value = shuffle_lane0(value);
  if constexpr (kWarps > 1) {
    const int warp = threadIdx.x / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) shared[warp] = value;
    __syncthreads();
    value = shared[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) value = combine(value, shared[w]);
    __syncthreads();  // shared is reused by the next reduction
  }
  return value;
}

struct AddFloat {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct AddFloat2 {
  __device__ __forceinline__ float2 operator()(float2 a, float2 b) const { return make_float2(a.x + b.x, a.y + b.y); }
};

// Launch shape of a row kernel: which team size, and how many blocks.
struct RowLaunch {
  bool block_per_row;
  int64_t blocks;
};

inline RowLaunch choose_row_launch(int64_t rows, int n) {
  const bool block_per_row = n > kMaxWarpRowLength;
  const int64_t rows_per_block = block_per_row ? 1 : kBlockThreads / kWarpSize;
  int64_t blocks = ceil_div(rows, rows_per_block);
  if (blocks > kMaxGridBlocks) blocks = kMaxGridBlocks;
  return {block_per_row, blocks};
}

// Calls launch(warps, blocks) with the team size choose_row_launch picks: warps is an
// std::integral_constant, kBlockThreads / kWarpSize for a block per row, 1 for a warp per row.
template <typename Launch>
cudaError_t launch_rows(int64_t rows, int n, Launch&& launch) {
  const RowLaunch plan = choose_row_launch(rows, n);
  if (plan.block_per_row) {
    launch(std::integral_constant<int, kBlockThreads / kWarpSize>{}, plan.blocks);
  } else {
    launch(std::integral_constant<int, 1>{}, plan.blocks);
  }
  return cudaGetLastError();
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the element type that dtype names.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(TypeTag<float>{});
    case DType::kFloat16: return fn(TypeTag<__half>{});
    case DType::kBFloat16: return fn(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Launches a row kernel over args.rows rows of args.n elements (nothing when either is 0):
// kernel_for(TypeTag<T>{}, warps) names the instance for dtype's element type and the team
// size launch_rows picks; every row kernel takes its argument struct by value.
template <typename Args, typename KernelFor>
cudaError_t launch_row_kernel(DType dtype, const Args& args, cudaStream_t stream, KernelFor&& kernel_for) {
  if (args.rows == 0 || args.n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch_rows(args.rows, args.n, [&](auto warps, int64_t blocks) {
      kernel_for(tag, warps)<<<blocks, kBlockThreads, 0, stream>>>(args);
    });
  });
}

}  // namespace tformer
