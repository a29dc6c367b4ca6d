// Softmax over the last dimension with a scale and an optional mask: host launchers of the
// torch-free kernels.
//
// Layout: x, y, dy, dx are `rows` contiguous rows of `n` elements of one dtype, each base
// 16-byte aligned. The mask has x's logical shape but any strides (a broadcast mask arrives
// as an expanded view with stride-0 dims); MaskLayout describes it. Math is float32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace tformer {

enum class MaskKind : int {
  kNone = 0,
  kBool = 1,      // True takes part, False is removed (-inf)
  kFloat32 = 2,   // added to the scaled scores
  kFloat16 = 3,
  kBFloat16 = 4,
};

// Leading (row) dimensions of the mask after merging mergeable neighbours.
constexpr int kMaxMaskRowDims = 8;

struct MaskLayout {
  const void* data = nullptr;
  MaskKind kind = MaskKind::kNone;
  int row_dims = 0;  // the row index decomposes over sizes[0..row_dims), last fastest
  int64_t sizes[kMaxMaskRowDims] = {};
  int64_t strides[kMaxMaskRowDims] = {};  // in elements
  int64_t column_stride = 0;              // in elements; 0 when broadcast along the row
};

struct SoftmaxForwardArgs {
  const void* x;
  void* y;
  MaskLayout mask;
  int64_t rows;
  int n;
  float scale;
};

struct SoftmaxBackwardArgs {
  const void* dy;
  const void* y;
  void* dx;
  int64_t rows;
  int n;
  float scale;
};

// y = softmax(x * scale + mask); a row where nothing takes part gives zeros.
cudaError_t launch_softmax_forward(DType dtype, const SoftmaxForwardArgs& args, cudaStream_t stream);

// dx = scale * y * (dy - sum(dy * y)).
cudaError_t launch_softmax_backward(DType dtype, const SoftmaxBackwardArgs& args, cudaStream_t stream);

}  // namespace tformer
