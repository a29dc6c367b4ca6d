// What every sm_90a attention block works out before its pipeline starts: its shared memory
// aligned to the 128-byte swizzle's period, its sequence's token span, and which keys a
// score may use. Shared by the forward (forward_sm90.cuh) and both backward passes.
#pragma once

#include <cstdint>

#include "attention/attention.h"
#include "attention_sm90/hopper.cuh"

namespace tformer {
namespace attention_sm90 {

// The dynamic shared memory from its first 1024-byte boundary (the kernels ask for 1 KiB of
// slack), where a TMA box written 128-byte swizzled reads back with the same pattern.
__device__ __forceinline__ unsigned char* aligned_shared(unsigned char* raw) {
  const uint32_t address = smem_u32(raw);
  return raw + (((address + 1023) & ~1023u) - address);
}

struct SequenceSpan {
  int q_start, q_len, k_start, k_len, coord;  // coord: the sequence's TMA coordinate (0 when packed)
};

// Padded batch: every sequence spans the whole token axis. Packed: cu_seqlens give the span,
// and the TMA maps hold one "sequence" of all tokens.
__device__ __forceinline__ SequenceSpan sequence_span(const AttentionProblem& p, int seq) {
  if (p.cu_seqlens_q == nullptr) return {0, p.max_seqlen_q, 0, p.max_seqlen_k, seq};
  const int q_start = p.cu_seqlens_q[seq], k_start = p.cu_seqlens_k[seq];
  return {q_start, p.cu_seqlens_q[seq + 1] - q_start, k_start, p.cu_seqlens_k[seq + 1] - k_start, 0};
}

// Key `key` exists in the sequence and is not padding (`padding`: the sequence's row of the
// key padding mask, or nullptr).
__device__ __forceinline__ bool key_allowed(const uint8_t* padding, int64_t padding_stride, int key, int k_len) {
  return key < k_len && (padding == nullptr || padding[static_cast<int64_t>(key) * padding_stride] == 0);
}

}  // namespace attention_sm90
}  // namespace tformer
