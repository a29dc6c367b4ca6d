// Host entry points: pick the (dtype, head-dim bucket) instantiation of each pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "attention/attention.h"
#include "attention/block_shapes.h"
#include "attention/launch_templates.h"
#include "attention_sm90/attention_sm90.h"

namespace tformer {

namespace {

// Functors rather than templated lambdas: the CMake build compiles CUDA as C++17.
struct Forward {
  const AttentionForwardArgs& args;
  cudaStream_t stream;
  template <typename T, int kD> cudaError_t run() const { return attention::run_forward<T, kD>(args, stream); }
};

struct Backward {
  const AttentionBackwardArgs& args;
  cudaStream_t stream;
  template <typename T, int kD> cudaError_t run() const { return attention::run_backward<T, kD>(args, stream); }
};

template <typename T, typename Pass>
cudaError_t by_head_dim(int head_dim, const Pass& pass) {
  switch (attention_head_dim_bucket(head_dim)) {
    case 32: return pass.template run<T, 32>();
    case 64: return pass.template run<T, 64>();
    case 96: return pass.template run<T, 96>();
    case 128: return pass.template run<T, 128>();
    case 256: return pass.template run<T, 256>();
    default: return cudaErrorInvalidValue;  // the bindings refuse these head dims first
  }
}

template <typename Pass>
cudaError_t by_dtype(DType dtype, int head_dim, const Pass& pass) {
  switch (dtype) {
    case DType::kFloat16: return by_head_dim<__half>(head_dim, pass);
    case DType::kBFloat16: return by_head_dim<__nv_bfloat16>(head_dim, pass);
    default: return cudaErrorInvalidValue;  // float32 is refused by the bindings
  }
}

template <int kD> int shared_memory_bytes() {
  return std::max({attention::ForwardShape<kD>::kSmemBytes, attention::KeyGradShape<kD>::kSmemBytes,
                   attention::QueryGradShape<kD>::kSmemBytes});
}

}  // namespace

cudaError_t launch_attention_forward(DType dtype, const AttentionForwardArgs& args, cudaStream_t stream) {
  // sm_90 GPUs with a build for sm_90a take the Hopper kernels (csrc/attention_sm90/).
  if (attention_sm90_forward_path(dtype, args, nullptr) == AttentionPath::kSm90a) {
    return launch_attention_forward_sm90(dtype, args, stream);
  }
  return by_dtype(dtype, args.problem.head_dim, Forward{args, stream});
}

cudaError_t launch_attention_backward(DType dtype, const AttentionBackwardArgs& args, cudaStream_t stream) {
  // Likewise the backward.
  if (attention_sm90_backward_path(dtype, args, nullptr) == AttentionPath::kSm90a) {
    return launch_attention_backward_sm90(dtype, args, stream);
  }
  return by_dtype(dtype, args.problem.head_dim, Backward{args, stream});
}

int attention_shared_memory_bytes(int head_dim) {
  switch (attention_head_dim_bucket(head_dim)) {
    case 32: return shared_memory_bytes<32>();
    case 64: return shared_memory_bytes<64>();
    case 96: return shared_memory_bytes<96>();
    case 128: return shared_memory_bytes<128>();
    case 256: return shared_memory_bytes<256>();
    default: return 0;
  }
}

}  // namespace tformer
