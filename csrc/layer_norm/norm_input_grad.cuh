// The input gradient of LayerNorm / RMSNorm for one row, shared by the fused backward
// (layer_norm_bwd.cu) and the wide-row one (layer_norm_bwd_wide.cu). With g = dy * weight and
// xhat = (x - mean) * rstd: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), mean(g) = 0 for
// RMSNorm (no mean was subtracted).
#pragma once

namespace tformer {

struct NormInputGrad {
  float rstd, mean_g, mean_g_xhat;
  __device__ __forceinline__ float operator()(float g, float xhat) const {
    return rstd * (g - mean_g - xhat * mean_g_xhat);
  }
};

// From the row's (sum g, sum g * xhat), already reduced over the row's team.
__device__ __forceinline__ NormInputGrad norm_input_grad(float2 sums, int n, bool rms, float rstd) {
  return {rstd, rms ? 0.f : sums.x / n, sums.y / n};
}

}  // namespace tformer
