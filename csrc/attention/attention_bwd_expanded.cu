// The dK/dV pass's two choices (attention.h): grouped or expanded (attention_backward_expands),
// and the block shape (attention_key_grad_wide); the kernels are in attention_bwd.cuh.
#include "attention/attention.h"
#include "attention/block_shapes.h"

namespace tformer {

namespace {

// Below ~2 blocks per SM an SM cannot hide one block's latency behind another's, and each of
// the few blocks does group_size times the work (B = 1, Hq = 32, Hkv = 1, S = 2048: 16 grouped
// blocks of 128 keys on 132 SMs). Same rule as the Triton backward (kernels/attention_bwd.py).
constexpr int kExpandedBlocksPerSm = 2;
// The partials should not surprise a nearly full GPU with a large allocation.
constexpr int64_t kExpandedMaxBytes = int64_t{256} << 20;

template <int kD, bool kWide = (kD <= 96)> int64_t grouped_blocks(const AttentionProblem& p) {
  using Shape = attention::KeyGradShape<kD, kWide>;
  return (p.max_seqlen_k + int64_t{Shape::kBlockN} - 1) / Shape::kBlockN * Shape::kColumnSplit *
         (p.num_heads / p.group_size) * p.num_seqs;
}

}  // namespace

bool attention_key_grad_wide(int head_dim, int smem_optin_bytes) {
  const int bucket = attention_head_dim_bucket(head_dim);
  if (bucket == 0 || bucket > 128) return false;
  return bucket < 128 || attention::KeyGradShape<128, true>::kSmemBytes <= smem_optin_bytes;
}

bool attention_backward_expands(const AttentionProblem& problem, int64_t key_tokens, int sm_count,
                                bool key_grad_wide) {
  if (problem.group_size <= 1 || sm_count <= 0) return false;
  int64_t blocks = 0;
  switch (attention_head_dim_bucket(problem.head_dim)) {
    case 32: blocks = grouped_blocks<32>(problem); break;
    case 64: blocks = grouped_blocks<64>(problem); break;
    case 96: blocks = grouped_blocks<96>(problem); break;
    case 128: blocks = key_grad_wide ? grouped_blocks<128, true>(problem) : grouped_blocks<128>(problem); break;
    case 256: blocks = grouped_blocks<256>(problem); break;
    default: return false;
  }
  const int64_t partial_bytes = 2 * 4 * key_tokens * problem.num_heads * problem.head_dim;
  return blocks < int64_t{kExpandedBlocksPerSm} * sm_count && partial_bytes <= kExpandedMaxBytes;
}

}  // namespace tformer
