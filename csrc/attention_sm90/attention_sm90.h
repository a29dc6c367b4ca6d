// Host interface of the sm_90a (Hopper: TMA + wgmma, warp-specialized) attention kernels in
// csrc/attention_sm90/. csrc/attention/attention_dispatch.cu asks attention_sm90_forward_path
// (attention_sm90_backward_path) and, when it answers kSm90a, launches the forward (the dK/dV
// and dQ passes); everything else stays on the sm_80 kernels. Both paths share the out and lse
// layout, so a forward on one and a backward on the other agree.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <string>

#include "attention/attention.h"
#include "attention_sm90/contracts.h"  // box, register and pipeline constants

namespace tformer {

// Head dims the sm_90a kernels are compiled for (exactly; others take the sm_80 kernels).
constexpr int kAttentionSm90HeadDims[] = {64, 128};

enum class AttentionPath { kSm80, kSm90a };

// Which kernels run this forward, and why not sm_90a when not ("" when sm_90a). Reads the
// current device's compute capability and args.force_sm80 (the caller's choice: tformer's
// registry passes it for the "cuda:sm80" variant); logs each new decision to stderr once per
// process (no silent fallback).
AttentionPath attention_sm90_forward_path(DType dtype, const AttentionForwardArgs& args, std::string* why_not);

// The same decision from what is known before the tensors are laid out (dtype, head dim,
// device, force_sm80), for tformer's Python side: "sm90a" or "sm80: <reason>".
std::string attention_forward_path_name(DType dtype, int head_dim, int device, bool force_sm80);

cudaError_t launch_attention_forward_sm90(DType dtype, const AttentionForwardArgs& args, cudaStream_t stream);

// The backward's decision, as the forward's (with the backward's own args.force_sm80), plus dO's
// layout and the expanded GQA dK/dV (args.dk_partial: the sm_80 kernels' float32 partials).
AttentionPath attention_sm90_backward_path(DType dtype, const AttentionBackwardArgs& args, std::string* why_not);
std::string attention_backward_path_name(DType dtype, int head_dim, int device, bool force_sm80);

// delta (the sm_80 delta_kernel), then dK/dV and dQ.
cudaError_t launch_attention_backward_sm90(DType dtype, const AttentionBackwardArgs& args, cudaStream_t stream);

namespace attention_sm90 {

constexpr float kLog2e = 1.4426950408889634f;

// Launches the forward kernel for T = __half or __nv_bfloat16 and head dim kD (defined in
// forward_sm90.cuh, instantiated in forward_sm90_hdim<kD>.cu).
template <typename T, int kD> cudaError_t run_forward(const AttentionForwardArgs& args, DType dtype, cudaStream_t stream);

// Launches the backward's dK/dV and dQ kernels (backward_sm90.cuh, instantiated in
// backward_sm90_hdim<kD>.cu); delta = rowsum(dO * O) must be in args.delta already.
template <typename T, int kD> cudaError_t run_backward(const AttentionBackwardArgs& args, DType dtype, cudaStream_t stream);

// A 4-d TMA map (head dim, token, head, sequence) of q, k, v, dO for 64 x box_rows boxes,
// 128-byte swizzled; tokens beyond `tokens` read as zeros.
cudaError_t make_tile_map(CUtensorMap* map, DType dtype, const void* base, const Strides3& strides, int64_t tokens,
                          int heads, int seqs, int head_dim, int box_rows = kBoxRows);

}  // namespace attention_sm90
}  // namespace tformer
