// LayerNorm / RMSNorm forward with the fused residual add. One team (warp or block) per
// row; pass 1 adds the residual and gathers statistics, pass 2 re-reads the row (from L1/L2)
// and writes y. LayerNorm statistics use Welford's update per thread and Chan et al.'s
// pairwise merge across threads, which avoids the cancellation of E[x^2] - E[x]^2.
#include "common/row_kernels.cuh"
#include "layer_norm/layer_norm.h"

namespace tformer {
namespace {

// Welford state (mean, M2, count) packed in a float3 so that it shuffles like the others.
__device__ __forceinline__ float3 welford_add(float3 s, float v) {
  s.z += 1.f;
  const float delta = v - s.x;
  // The fast divide (2 ulp): the IEEE one's slow-path call cost a stack frame and spills here.
  s.x += __fdividef(delta, s.z);
  s.y += delta * (v - s.x);
  return s;
}

struct WelfordMerge {
  // Chan, Golub & LeVeque (1979): combine two partial (mean, M2, count).
  __device__ __forceinline__ float3 operator()(float3 a, float3 b) const {
    if (b.z == 0.f) return a;
    if (a.z == 0.f) return b;
    const float count = a.z + b.z;
    const float delta = b.x - a.x;
    const float b_share = b.z / count;
    return make_float3(a.x + delta * b_share, a.y + b.y + delta * delta * a.z * b_share, count);
  }
};

template <typename T, int kWarps>
__global__ void __launch_bounds__(kBlockThreads) norm_forward_kernel(NormForwardArgs args) {
  constexpr int kVec = kVectorWidth<T>;
  constexpr int kLanes = kTeamLanes<kWarps>;
  __shared__ float3 shared[kWarps];
  const T* x = static_cast<const T*>(args.x);
  const T* residual = static_cast<const T*>(args.residual);
  T* residual_out = static_cast<T*>(args.residual_out);
  T* y = static_cast<T*>(args.y);
  // Pass 2 reads the summed row back from residual_out, written by this same thread.
  const T* input = residual != nullptr ? residual_out : x;
  const int n = args.n;

  for_each_team_row<kWarps>(args.rows, [&](int64_t row, int lane) {
    const int64_t start = row * n;
    float3 stats = make_float3(0.f, 0.f, 0.f);  // RMSNorm keeps its sum of squares in .y
    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float v[W];
      load_floats<W>(x + start + col, v);
      if (residual != nullptr) {
        float r[W];
        load_floats<W>(residual + start + col, r);
        // Round the sum to T before normalizing, so that y == norm(residual_out) exactly.
#pragma unroll
        for (int i = 0; i < W; ++i) v[i] = to_float(from_float<T>(v[i] + r[i]));
        store_floats<W>(residual_out + start + col, v);
      }
#pragma unroll
      for (int i = 0; i < W; ++i) {
        if (args.rms) stats.y += v[i] * v[i];
        else stats = welford_add(stats, v[i]);
      }
    });

    float mean = 0.f, variance;
    if (args.rms) {
      variance = team_reduce<kWarps>(stats.y, AddFloat{}, reinterpret_cast<float*>(shared)) / n;
    } else {
      stats = team_reduce<kWarps>(stats, WelfordMerge{}, shared);
      mean = stats.x;
      variance = stats.y / n;  // biased, as torch.nn.LayerNorm
    }
    const float rstd = rsqrtf(variance + args.eps);
    if (lane == 0) {
      if (args.mean != nullptr) args.mean[row] = mean;
      args.rstd[row] = rstd;
    }

    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float v[W];
      load_floats<W>(input + start + col, v);
#pragma unroll
      for (int i = 0; i < W; ++i) v[i] = (v[i] - mean) * rstd;
      if (args.weight != nullptr) {
        float w[W];
        load_params<W>(args.weight, col, w);
#pragma unroll
        for (int i = 0; i < W; ++i) v[i] *= w[i];
      }
      if (args.bias != nullptr) {
        float b[W];
        load_params<W>(args.bias, col, b);
#pragma unroll
        for (int i = 0; i < W; ++i) v[i] += b[i];
      }
      store_floats<W>(y + start + col, v);
    });
  });
}

}  // namespace

cudaError_t launch_norm_forward(DType dtype, const NormForwardArgs& args, cudaStream_t stream) {
  return launch_row_kernel(dtype, args, stream, [](auto tag, auto warps) {
    return norm_forward_kernel<typename decltype(tag)::type, decltype(warps)::value>;
  });
}

}  // namespace tformer
