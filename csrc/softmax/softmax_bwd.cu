// Softmax backward: dx = scale * y * (dy - sum(dy * y)), from the saved output y. Removed
// entries and fully masked rows have y = 0, so their gradient is exactly 0.
#include "common/row_kernels.cuh"
#include "softmax/softmax.h"

namespace tformer {
namespace {

template <typename T, int kWarps>
__global__ void __launch_bounds__(kBlockThreads) softmax_backward_kernel(SoftmaxBackwardArgs args) {
  constexpr int kVec = kVectorWidth<T>;
  constexpr int kLanes = kTeamLanes<kWarps>;
  __shared__ float shared[kWarps];
  const T* dy = static_cast<const T*>(args.dy);
  const T* y = static_cast<const T*>(args.y);
  T* dx = static_cast<T*>(args.dx);
  const int n = args.n;

  for_each_team_row<kWarps>(args.rows, [&](int64_t row, int lane) {
    const int64_t start = row * n;
    float dot = 0.f;
    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float g[W], p[W];
      load_floats<W>(dy + start + col, g);
      load_floats<W>(y + start + col, p);
#pragma unroll
      for (int i = 0; i < W; ++i) dot += g[i] * p[i];
    });
    dot = team_reduce<kWarps>(dot, AddFloat{}, shared);

    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float g[W], p[W];
      load_floats<W>(dy + start + col, g);
      load_floats<W>(y + start + col, p);
#pragma unroll
      for (int i = 0; i < W; ++i) g[i] = args.scale * p[i] * (g[i] - dot);
      store_floats<W>(dx + start + col, g);
    });
  });
}

}  // namespace

cudaError_t launch_softmax_backward(DType dtype, const SoftmaxBackwardArgs& args, cudaStream_t stream) {
  return launch_row_kernel(dtype, args, stream, [](auto tag, auto warps) {
    return softmax_backward_kernel<typename decltype(tag)::type, decltype(warps)::value>;
  });
}

}  // namespace tformer
