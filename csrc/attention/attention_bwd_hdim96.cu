// Backward kernels (delta, dK/dV, dQ) for head dims in the 96 bucket, fp16 and bf16.
#include "attention/attention_bwd.cuh"

namespace tformer {
namespace attention {

template cudaError_t run_backward<__half, 96>(const AttentionBackwardArgs&, cudaStream_t);
template cudaError_t run_backward<__nv_bfloat16, 96>(const AttentionBackwardArgs&, cudaStream_t);

}  // namespace attention
}  // namespace tformer
