// Backward kernels (delta, dK/dV, dQ) for head dims in the 64 bucket, fp16 and bf16.
#include "attention/attention_bwd.cuh"

namespace tformer {
namespace attention {

template cudaError_t run_backward<__half, 64>(const AttentionBackwardArgs&, cudaStream_t);
template cudaError_t run_backward<__nv_bfloat16, 64>(const AttentionBackwardArgs&, cudaStream_t);
template cudaError_t run_delta<__half>(const AttentionBackwardArgs&, cudaStream_t);
template cudaError_t run_delta<__nv_bfloat16>(const AttentionBackwardArgs&, cudaStream_t);

}  // namespace attention
}  // namespace tformer
