// Flash attention (FlashAttention-2, Dao 2023) on tensor cores: host launchers of the
// torch-free kernels in csrc/attention/*.cu.
//
// Layouts. Every tensor is addressed as (sequence, head, token, dim) through element strides,
// so q, k and v may be strided views (e.g. split from a fused QKV projection); the dim stride
// must be 1 and every other stride and base pointer 16-byte aligned (the kernels move rows in
// 16-byte cp.async chunks). Padded batch: sequence = batch index, token stride = the seq dim.
// Packed (cu_seqlens given): the sequence stride is 0 and sequence i holds tokens
// cu_seqlens[i] .. cu_seqlens[i+1]. lse and delta are float32 with (sequence, head, token)
// strides in the same way.
//
// Semantics (those of tformer.ops.attention): the causal/sliding-window band of
// AttentionProblem (top-left or bottom-right aligned, per sequence) and soft-capping; key_padding
// True removes a key; grouped-query attention: query head h reads key/value head h / group_size;
// a query row with no allowed key gives zeros and lse = -inf, and zero gradients.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace tformer {

// Head dims the kernels are compiled for. A head dim d (a multiple of 8, <= 256) runs in the
// smallest bucket >= d, its extra lanes loaded as zeros and never stored.
constexpr int kAttentionHeadDimBuckets[] = {32, 64, 96, 128, 256};
constexpr int kAttentionMaxHeadDim = 256;

// Strides in elements of a (sequence, head, token, dim) addressed tensor; dim stride is 1.
struct Strides3 {
  int64_t seq = 0;
  int64_t head = 0;
  int64_t token = 0;
};

struct AttentionProblem {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides3 q_strides, k_strides, v_strides;
  // (num_seqs, Sk) bool as bytes, True = padding key; nullptr when there is none.
  const uint8_t* key_padding = nullptr;
  int64_t key_padding_seq_stride = 0;
  int64_t key_padding_token_stride = 0;
  // (num_seqs + 1,) int32 token offsets; both nullptr for a padded batch.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int num_seqs = 0;
  int num_heads = 0;     // query heads
  int group_size = 1;    // query heads per key/value head
  int max_seqlen_q = 0;  // the padded length, or a bound on every packed length
  int max_seqlen_k = 0;
  // Rows of q's and k's token axis (Sq / Sk, or the packed totals): the extent of the sm_90a
  // path's TMA maps, which must not read past the tensors.
  int64_t q_tokens = 0;
  int64_t k_tokens = 0;
  int head_dim = 0;
  float scale = 1.f;
  // Plain top-left causal (the band left = -1, right = 0, not bottom-right): the band the sm_90a
  // kernels' unbanded variants implement (any other band or a softcap takes their banded
  // variants). The sm_80 kernels read the band fields below instead.
  bool causal = false;
  // The band (tformer/ops/attention_mask.py's Band): query i of a sequence of q_len queries
  // attends key j of k_len keys when i + offset - window_left <= j <= i + offset + window_right,
  // offset = k_len - q_len when bottom_right, else 0; a bound of -1 is unbounded. causal=True
  // is window_right = 0.
  int window_left = -1;
  int window_right = -1;
  bool bottom_right = false;
  // Logit soft-capping (Gemma 2): scaled scores s become softcap * tanh(s / softcap) before the
  // softmax; 0 disables it.
  float softcap = 0.f;
};

// Whether the problem needs more than full or top-left causal attention without soft-capping
// (on sm_90a: the kernels' banded variants).
inline bool attention_has_band_or_softcap(const AttentionProblem& p) {
  return p.window_left >= 0 || (p.window_right >= 0 && (p.window_right > 0 || p.bottom_right)) || p.softcap > 0.f;
}

struct AttentionForwardArgs {
  AttentionProblem problem;
  void* out = nullptr;  // q's dtype
  Strides3 out_strides;
  float* lse = nullptr;  // natural-log log-sum-exp of the scaled, masked scores
  Strides3 lse_strides;  // (seq, head, token); .token is the row stride
  // Run the sm_80 kernels even where the sm_90a ones could (the registry's "cuda:sm80" variant):
  // a choice made by the caller, never read from the environment here.
  bool force_sm80 = false;
};

struct AttentionBackwardArgs {
  AttentionProblem problem;
  const void* out = nullptr;
  Strides3 out_strides;
  const void* dout = nullptr;
  Strides3 dout_strides;
  const float* lse = nullptr;
  float* delta = nullptr;  // workspace with lse's layout: rowsum(dout * out)
  Strides3 lse_strides;    // of lse and delta
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides3 dq_strides, dk_strides, dv_strides;
  // Expanded dK/dV (attention_backward_expands): float32 per-query-head partials with k's
  // layout but num_heads heads, summed over each group afterwards; nullptr: grouped dK/dV.
  float* dk_partial = nullptr;
  float* dv_partial = nullptr;
  Strides3 partial_strides;  // of both partials
  // dQ by float32 atomics (the sm_90a backward's one pass): a zeroed float32 workspace with q's
  // shape, summed into by the dK/dV pass and converted into dq after it; nullptr: dQ from a
  // pass of its own, deterministic. The sm_80 kernels ignore it (always that pass).
  float* dq_accum = nullptr;
  Strides3 dq_accum_strides;
  // 8-warp, 128-key dK/dV blocks (attention_key_grad_wide); read at head dim 128 only, where
  // both shapes are built (smaller head dims are always wide, 256 never).
  bool key_grad_wide = false;
  // As AttentionForwardArgs::force_sm80, for the backward's passes.
  bool force_sm80 = false;
};

// The bucket a head dim runs in, or 0 when it is not supported (not a multiple of 8, or > 256).
inline int attention_head_dim_bucket(int head_dim) {
  if (head_dim <= 0 || head_dim % 8 != 0) return 0;
  for (int bucket : kAttentionHeadDimBuckets) {
    if (head_dim <= bucket) return bucket;
  }
  return 0;
}

// The most dynamic shared memory any pass takes for this head dim (0 if unsupported); the
// bindings compare it with the device's opt-in limit before launching.
int attention_shared_memory_bytes(int head_dim);

// out, lse. dtype is kFloat16 or kBFloat16.
cudaError_t launch_attention_forward(DType dtype, const AttentionForwardArgs& args, cudaStream_t stream);

// Whether the backward computes dK/dV per query head (FlashAttention-2's GQA/MQA backward)
// rather than per key/value head: when group_size > 1, the grouped dK/dV launch would have
// fewer than 2 blocks per SM (`sm_count` SMs) and the two float32 partials, 2 x key_tokens x
// num_heads x head_dim floats (key_tokens: batch x Sk, or total_k packed), fit in 256 MiB.
// The caller then allocates the partials (AttentionBackwardArgs::dk_partial, dv_partial).
bool attention_backward_expands(const AttentionProblem& problem, int64_t key_tokens, int sm_count,
                                bool key_grad_wide);

// Whether the dK/dV pass runs 8-warp, 128-key blocks for this head dim on a device whose blocks
// may opt in to `smem_optin_bytes` of shared memory: always up to head dim 96, at 128 when the
// 102.5 KiB fit (sm80: 163 KiB, sm90: 227 KiB; not sm86/sm89's 99 KiB), never at 256.
bool attention_key_grad_wide(int head_dim, int smem_optin_bytes);

// dq, dk, dv (deterministic unless args.dq_accum is set). Writes delta first.
cudaError_t launch_attention_backward(DType dtype, const AttentionBackwardArgs& args, cudaStream_t stream);

}  // namespace tformer
