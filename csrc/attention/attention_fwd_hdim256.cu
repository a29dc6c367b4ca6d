// Forward kernels for head dims in the 256 bucket, fp16 and bf16 (one translation unit per
// bucket and pass, so they compile in parallel).
#include "attention/attention_fwd.cuh"

namespace tformer {
namespace attention {

template cudaError_t run_forward<__half, 256>(const AttentionForwardArgs&, cudaStream_t);
template cudaError_t run_forward<__nv_bfloat16, 256>(const AttentionForwardArgs&, cudaStream_t);

}  // namespace attention
}  // namespace tformer
