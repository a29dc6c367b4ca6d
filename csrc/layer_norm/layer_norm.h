// LayerNorm and RMSNorm over the last dimension: host launchers of the torch-free kernels.
//
// Layout: `rows` contiguous rows of `n` elements of one dtype (x, residual, y, residual_out,
// dy, dx), each base 16-byte aligned; weight, bias and their gradients are float32 (n,);
// mean and rstd are float32 (rows,). Statistics and all arithmetic are float32.
// Each launcher returns the CUDA error of its launches (cudaSuccess when fine).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace tformer {

struct NormForwardArgs {
  const void* x;
  const void* residual;  // nullable: then x itself is normalized
  const float* weight;   // nullable
  const float* bias;     // nullable; always null for RMSNorm
  void* y;
  void* residual_out;  // x + residual rounded to x's dtype; written iff residual != nullptr
  float* mean;         // LayerNorm only (nullptr for RMSNorm)
  float* rstd;
  int64_t rows;
  int n;
  float eps;
  bool rms;  // RMSNorm: no mean subtraction, no bias
};

struct NormBackwardArgs {
  const void* dy;
  const void* dresidual_out;  // nullable: gradient flowing into residual_out
  const void* input;          // the normalized tensor: residual_out with a residual, else x
  const float* weight;        // nullable
  const float* mean;          // nullptr for RMSNorm
  const float* rstd;
  void* dx;  // gradient of x (and of residual, which is the same)
  int64_t rows;
  int n;
  bool rms;
};

struct NormParamGradArgs {
  const void* dy;
  const void* input;
  const float* mean;  // nullptr for RMSNorm
  const float* rstd;
  float* dweight;  // nullable
  float* dbias;    // nullable
  int64_t rows;
  int n;
  bool rms;
};

cudaError_t launch_norm_forward(DType dtype, const NormForwardArgs& args, cudaStream_t stream);

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight (RMSNorm drops mean(g)),
// plus dresidual_out.
cudaError_t launch_norm_backward_input(DType dtype, const NormBackwardArgs& args, cudaStream_t stream);

// dweight = sum over rows of dy * xhat, dbias = sum of dy, without float atomics: per-chunk
// partial sums into `workspace`, then one ordered sum per column, so results are bitwise
// reproducible. `workspace` holds norm_param_grad_workspace_floats(rows, n) floats.
int64_t norm_param_grad_workspace_floats(int64_t rows, int n);
cudaError_t launch_norm_backward_params(DType dtype, const NormParamGradArgs& args, float* workspace,
                                        cudaStream_t stream);

}  // namespace tformer
