// Host interface of the sm_90a (Hopper: TMA + wgmma, warp-specialized) attention forward in
// csrc/attention_sm90/. csrc/attention/attention_dispatch.cu calls attention_sm90_forward_path
// and, when it answers kSm90a, launch_attention_forward_sm90; everything else stays on the
// sm_80 kernels, which also take the backward (same out and lse).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <string>

#include "attention/attention.h"

namespace tformer {

// Head dims the sm_90a forward is compiled for (exactly; others take the sm_80 kernels).
constexpr int kAttentionSm90HeadDims[] = {64, 128};

// Set to a non-empty value other than "0" to keep every attention forward on the sm_80
// kernels (A/B benchmarks, the GPU sweep).
constexpr const char* kForceSm80Variable = "TFORMER_ATTENTION_FORCE_SM80";

enum class AttentionPath { kSm80, kSm90a };

// Which kernels run this forward, and why not sm_90a when not ("" when sm_90a). Reads the
// current device's compute capability and kForceSm80Variable; logs each new decision to
// stderr once per process (no silent fallback).
AttentionPath attention_sm90_forward_path(DType dtype, const AttentionForwardArgs& args, std::string* why_not);

// The same decision from what is known before the tensors are laid out (dtype, head dim,
// device), for tformer's Python side: "sm90a" or "sm80: <reason>".
std::string attention_forward_path_name(DType dtype, int head_dim, int device);

cudaError_t launch_attention_forward_sm90(DType dtype, const AttentionForwardArgs& args, cudaStream_t stream);

namespace attention_sm90 {

constexpr int kBoxColumns = 64;  // a TMA box row: 128 bytes of 16-bit elements (the swizzle width)
constexpr int kBoxRows = 128;    // = the kernel's query and key block

// Launches the forward kernel for T = __half or __nv_bfloat16 and head dim kD (defined in
// forward_sm90.cuh, instantiated in forward_sm90_hdim<kD>.cu).
template <typename T, int kD> cudaError_t run_forward(const AttentionForwardArgs& args, DType dtype, cudaStream_t stream);

// A 4-d TMA map (head dim, token, head, sequence) of q, k or v for 64 x 128 boxes, 128-byte
// swizzled; tokens beyond `tokens` read as zeros.
cudaError_t make_tile_map(CUtensorMap* map, DType dtype, const void* base, const Strides3& strides, int64_t tokens,
                          int heads, int seqs, int head_dim);

}  // namespace attention_sm90
}  // namespace tformer
