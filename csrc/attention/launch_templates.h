// Declarations of the per-(dtype, head-dim bucket) launchers. Each is defined in
// attention_fwd.cuh / attention_bwd.cuh and explicitly instantiated in exactly one
// attention_{fwd,bwd}_hdim<D>.cu, so the buckets compile in parallel and a change to one
// pass does not rebuild the other.
#pragma once

#include <cuda_runtime.h>

#include "attention/attention.h"

namespace tformer {
namespace attention {

template <typename T, int kD> cudaError_t run_forward(const AttentionForwardArgs& args, cudaStream_t stream);
template <typename T, int kD> cudaError_t run_backward(const AttentionBackwardArgs& args, cudaStream_t stream);
// delta = rowsum(dO * O) alone: the first step of both backwards (sm_80 and sm_90a);
// instantiated in attention_bwd_hdim64.cu.
template <typename T> cudaError_t run_delta(const AttentionBackwardArgs& args, cudaStream_t stream);

}  // namespace attention
}  // namespace tformer
