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
  void* dx;        // gradient of x (and of residual, which is the same)
  float* dweight;  // nullable: not wanted
  float* dbias;    // nullable: not wanted (always for RMSNorm)
  int64_t rows;
  int n;
  bool rms;
};

// Rows up to this length take the fused backward: one block of 256 threads holds a row's
// columns in registers, at most 32 per thread.
constexpr int kMaxFusedRowLength = 8192;

cudaError_t launch_norm_forward(DType dtype, const NormForwardArgs& args, cudaStream_t stream);

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight (RMSNorm drops mean(g)),
// plus dresidual_out; dweight = sum over rows of dy * xhat, dbias = sum of dy. No float
// atomics: per-block partial sums into `workspace`, then a fixed-order sum per column, so the
// results are bitwise reproducible. `workspace` holds norm_backward_workspace_floats(rows, n)
// floats (a count that depends on the current device's SM count).
int64_t norm_backward_workspace_floats(int64_t rows, int n);
cudaError_t launch_norm_backward(DType dtype, const NormBackwardArgs& args, float* workspace, cudaStream_t stream);

// ---- parts of launch_norm_backward (layer_norm_bwd_wide.cu) -------------------------------
// For rows wider than kMaxFusedRowLength: dx alone, and dweight/dbias from a second read of dy
// and input into norm_param_grad_workspace_floats(rows, n) floats.
cudaError_t launch_norm_backward_input(DType dtype, const NormBackwardArgs& args, cudaStream_t stream);
int64_t norm_param_grad_workspace_floats(int64_t rows, int n);
cudaError_t launch_norm_backward_params(DType dtype, const NormBackwardArgs& args, float* workspace,
                                        cudaStream_t stream);
// out[col] = the sum of partial[r][col] over r < partial_rows in order; partial is (partial_rows, n).
cudaError_t launch_sum_partial_rows(const float* partial, int64_t partial_rows, int n, float* out,
                                    cudaStream_t stream);

}  // namespace tformer
