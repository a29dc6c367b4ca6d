// LayerNorm / RMSNorm backward for the input. With xhat = (x - mean) * rstd and
// g = dy * weight, the gradient of x is rstd * (g - mean(g) - xhat * mean(g * xhat))
// (RMSNorm: mean = 0 and no mean(g) term). Pass 1 reduces the two row means, pass 2 writes
// dx, adding the gradient that reached residual_out directly (the fused residual add).
#include "common/row_kernels.cuh"
#include "layer_norm/layer_norm.h"

namespace tformer {
namespace {

template <typename T, int kWarps>
__global__ void __launch_bounds__(kBlockThreads) norm_backward_input_kernel(NormBackwardArgs args) {
  constexpr int kVec = kVectorWidth<T>;
  constexpr int kLanes = kTeamLanes<kWarps>;
  __shared__ float2 shared[kWarps];
  const T* dy = static_cast<const T*>(args.dy);
  const T* dresidual_out = static_cast<const T*>(args.dresidual_out);
  const T* input = static_cast<const T*>(args.input);
  T* dx = static_cast<T*>(args.dx);
  const int n = args.n;

  for_each_team_row<kWarps>(args.rows, [&](int64_t row, int lane) {
    const int64_t start = row * n;
    const float mean = args.mean != nullptr ? args.mean[row] : 0.f;
    const float rstd = args.rstd[row];

    // Loads one chunk of the row and forms xhat and g in place.
    auto load_chunk = [&](auto width, int col, float* xhat, float* g) {
      constexpr int W = decltype(width)::value;
      float v[W], d[W], w[W];
      load_floats<W>(input + start + col, v);
      load_floats<W>(dy + start + col, d);
      if (args.weight != nullptr) load_params<W>(args.weight, col, w);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        xhat[i] = (v[i] - mean) * rstd;
        g[i] = args.weight != nullptr ? d[i] * w[i] : d[i];
      }
    };

    float2 sums = make_float2(0.f, 0.f);  // (sum g, sum g * xhat)
    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float xhat[W], g[W];
      load_chunk(width, col, xhat, g);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        sums.x += g[i];
        sums.y += g[i] * xhat[i];
      }
    });
    sums = team_reduce<kWarps>(sums, AddFloat2{}, shared);
    const float mean_g = args.rms ? 0.f : sums.x / n;
    const float mean_g_xhat = sums.y / n;

    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float xhat[W], g[W];
      load_chunk(width, col, xhat, g);
      float out[W];
#pragma unroll
      for (int i = 0; i < W; ++i) out[i] = rstd * (g[i] - mean_g - xhat[i] * mean_g_xhat);
      if (dresidual_out != nullptr) {
        float extra[W];
        load_floats<W>(dresidual_out + start + col, extra);
#pragma unroll
        for (int i = 0; i < W; ++i) out[i] += extra[i];
      }
      store_floats<W>(dx + start + col, out);
    });
  });
}

}  // namespace

cudaError_t launch_norm_backward_input(DType dtype, const NormBackwardArgs& args, cudaStream_t stream) {
  return launch_row_kernel(dtype, args, stream, [](auto tag, auto warps) {
    return norm_backward_input_kernel<typename decltype(tag)::type, decltype(warps)::value>;
  });
}

}  // namespace tformer
