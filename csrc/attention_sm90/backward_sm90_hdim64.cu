// sm_90a backward kernels (dK/dV, dQ) for head dim 64, fp16 and bf16 (one translation unit per
// head dim, so they compile in parallel; built for sm_90a only when setup.py's arch list has 9.0).
#include "attention_sm90/backward_sm90.cuh"

namespace tformer {
namespace attention_sm90 {

template cudaError_t run_backward<__half, 64>(const AttentionBackwardArgs&, DType, cudaStream_t);
template cudaError_t run_backward<__nv_bfloat16, 64>(const AttentionBackwardArgs&, DType, cudaStream_t);

}  // namespace attention_sm90
}  // namespace tformer
