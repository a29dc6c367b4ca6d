// Softmax forward with scale and mask. One team (warp or block) per row. Pass 1 keeps an
// online (max, sum of exp) pair per thread (Milakov & Gimelshein, "Online normalizer
// calculation for softmax", 2018) and merges the pairs across the team; pass 2 re-reads the
// row and writes exp(s - max) / sum. Removed entries are -inf; a row where every entry is
// -inf has max taken as 0 and sum as 1, so it gives zeros instead of NaN.
#include <math.h>

#include "common/row_kernels.cuh"
#include "softmax/softmax.h"

namespace tformer {
namespace {

// Offset of a row's first mask element, in elements of the mask's own type.
__device__ __forceinline__ int64_t mask_row_offset(const MaskLayout& mask, int64_t row) {
  int64_t offset = 0;
  for (int d = mask.row_dims - 1; d >= 0; --d) {
    offset += (row % mask.sizes[d]) * mask.strides[d];
    row /= mask.sizes[d];
  }
  return offset;
}

// The scaled, masked score of one element; the mask kind is uniform over the grid, so the
// switch does not diverge.
__device__ __forceinline__ float masked_score(float x, float scale, const MaskLayout& mask, int64_t index) {
  const float score = x * scale;
  switch (mask.kind) {
    case MaskKind::kNone: return score;
    case MaskKind::kBool: return static_cast<const bool*>(mask.data)[index] ? score : -INFINITY;
    case MaskKind::kFloat32: return score + static_cast<const float*>(mask.data)[index];
    case MaskKind::kFloat16: return score + to_float(static_cast<const __half*>(mask.data)[index]);
    case MaskKind::kBFloat16: return score + to_float(static_cast<const __nv_bfloat16*>(mask.data)[index]);
  }
  return score;
}

// (running max, sum of exp(score - max)); -inf scores add nothing, which also keeps
// exp(-inf - -inf) = NaN out of the sum.
__device__ __forceinline__ float2 online_add(float2 state, float score) {
  if (score == -INFINITY) return state;
  if (score > state.x) {
    state.y = state.y * expf(state.x - score) + 1.f;  // expf(-inf) = 0 for an empty state
    state.x = score;
  } else {
    state.y += expf(score - state.x);
  }
  return state;
}

struct OnlineMerge {
  __device__ __forceinline__ float2 operator()(float2 a, float2 b) const {
    const float top = fmaxf(a.x, b.x);
    if (top == -INFINITY) return a;  // both empty
    const float sum_a = a.x == -INFINITY ? 0.f : a.y * expf(a.x - top);
    const float sum_b = b.x == -INFINITY ? 0.f : b.y * expf(b.x - top);
    return make_float2(top, sum_a + sum_b);
  }
};

template <typename T, int kWarps>
__global__ void __launch_bounds__(kBlockThreads) softmax_forward_kernel(SoftmaxForwardArgs args) {
  constexpr int kVec = kVectorWidth<T>;
  constexpr int kLanes = kTeamLanes<kWarps>;
  __shared__ float2 shared[kWarps];
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  const MaskLayout& mask = args.mask;
  const int n = args.n;

  for_each_team_row<kWarps>(args.rows, [&](int64_t row, int lane) {
    const int64_t start = row * n;
    const int64_t mask_start = mask.kind == MaskKind::kNone ? 0 : mask_row_offset(mask, row);

    auto load_scores = [&](auto width, int col, float* scores) {
      constexpr int W = decltype(width)::value;
      float v[W];
      load_floats<W>(x + start + col, v);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        scores[i] = masked_score(v[i], args.scale, mask, mask_start + (col + i) * mask.column_stride);
      }
    };

    float2 state = make_float2(-INFINITY, 0.f);
    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float scores[W];
      load_scores(width, col, scores);
#pragma unroll
      for (int i = 0; i < W; ++i) state = online_add(state, scores[i]);
    });
    state = team_reduce<kWarps>(state, OnlineMerge{}, shared);
    const bool fully_masked = state.x == -INFINITY;
    const float row_max = fully_masked ? 0.f : state.x;
    const float inv_sum = fully_masked ? 1.f : 1.f / state.y;

    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float scores[W];
      load_scores(width, col, scores);
#pragma unroll
      for (int i = 0; i < W; ++i) scores[i] = expf(scores[i] - row_max) * inv_sum;
      store_floats<W>(y + start + col, scores);
    });
  });
}

}  // namespace

cudaError_t launch_softmax_forward(DType dtype, const SoftmaxForwardArgs& args, cudaStream_t stream) {
  return launch_row_kernel(dtype, args, stream, [](auto tag, auto warps) {
    return softmax_forward_kernel<typename decltype(tag)::type, decltype(warps)::value>;
  });
}

}  // namespace tformer
