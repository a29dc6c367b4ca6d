// LayerNorm / RMSNorm backward, fused: one read of dy and x gives dx and this block's partial
// sums of dweight and dbias. With xhat = (x - mean) * rstd and g = dy * weight, the gradient
// of x is rstd * (g - mean(g) - xhat * mean(g * xhat)) (RMSNorm: mean = 0, no mean(g) term),
// plus the gradient that reached residual_out directly (the fused residual add).
//
// Each thread keeps its columns of the row in registers between the row reduction and the
// dx store, and adds dy * xhat and dy for the same columns into fp32 accumulators over every
// row its team owns. A block then writes one partial row of each (num_blocks, n), and
// sum_partial_rows (layer_norm_bwd_wide.cu) adds the partial rows in a fixed order: no float
// atomics, so the gradients are bitwise reproducible. Traffic per row: read dy and x, write
// dx; the partials add 2 * num_blocks * n floats per gradient, about 2 * 264 rows in all.
// Rows wider than kMaxFusedRowLength take the two-kernel path in layer_norm_bwd_wide.cu.
#include <algorithm>

#include "common/row_kernels.cuh"
#include "layer_norm/layer_norm.h"
#include "layer_norm/norm_input_grad.cuh"

namespace tformer {
namespace {

// Columns one thread holds per row (a row's team covers n <= kSlots * lanes).
constexpr int kMaxSlots = 32;
// Resident blocks per SM (__launch_bounds__), and so the partial grid's blocks per SM: up to
// 16 slots, dy, x and the two accumulators fit 128 registers (2 blocks); 32 slots need up to
// 255 (ptxas -v: 128 spilled 300-600 bytes), so one block of 8 warps per SM.
template <int kSlots> constexpr int kFusedBlocksPerSm = kSlots > 16 ? 1 : 2;

// Slot s of a thread is column column_of(c) + i, s = c * kVec + i: with kAligned (n a
// multiple of the vector width, so every row starts 16-byte aligned) c counts kVec-wide
// vectors, lane-interleaved; otherwise kVec = 1 and c counts scalars. Every row maps a column
// to the same thread and slot, so the accumulators add the same column over rows.
template <typename T, int kWarps, int kSlots, bool kAligned>
__global__ void __launch_bounds__(kBlockThreads, kFusedBlocksPerSm<kSlots>)
    norm_backward_fused_kernel(NormBackwardArgs args, float* partial_weight, float* partial_bias) {
  constexpr int kVec = kAligned ? kVectorWidth<T> : 1;
  constexpr int kChunks = kSlots / kVec;
  constexpr int kLanes = kTeamLanes<kWarps>;
  constexpr int kTeams = kBlockThreads / kLanes;
  static_assert(kSlots % kVec == 0, "a thread's slots are whole vectors");
  __shared__ float2 shared[kWarps];
  // The teams of a block (warps, for rows <= kMaxWarpRowLength) add their partials here, in
  // team order, before the block writes its partial row.
  __shared__ float team_sums[kTeams > 1 ? kMaxWarpRowLength : 1];

  const T* dy = static_cast<const T*>(args.dy);
  const T* dresidual_out = static_cast<const T*>(args.dresidual_out);
  const T* input = static_cast<const T*>(args.input);
  T* dx = static_cast<T*>(args.dx);
  const int n = args.n;
  const int lane = threadIdx.x % kLanes;
  auto column_of = [&](int c) { return (lane + c * kLanes) * kVec; };

  float acc_weight[kSlots], acc_bias[kSlots];  // sums over this team's rows of dy * xhat, dy
#pragma unroll
  for (int s = 0; s < kSlots; ++s) acc_weight[s] = acc_bias[s] = 0.f;

  for_each_team_row<kWarps>(args.rows, [&](int64_t row, int) {
    const int64_t start = row * n;  // 64-bit: rows * n may pass 2^31
    const float mean = args.mean != nullptr ? args.mean[row] : 0.f;
    const float rstd = args.rstd[row];

    // Every load of the row is issued before any arithmetic: kChunks of dy and x in flight.
    Pack<T, kVec> dy_in[kChunks], x_in[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (column_of(c) < n) {
        dy_in[c] = *reinterpret_cast<const Pack<T, kVec>*>(dy + start + column_of(c));
        x_in[c] = *reinterpret_cast<const Pack<T, kVec>*>(input + start + column_of(c));
      }
    }
    // g and xhat of chunk c (the weight is re-read from L1 rather than kept in registers).
    auto unpack = [&](int c, float (&g)[kVec], float (&xhat)[kVec]) {
      float w[kVec];
      if (args.weight != nullptr) load_params<kVec>(args.weight, column_of(c), w);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        xhat[i] = (to_float(x_in[c].v[i]) - mean) * rstd;
        g[i] = args.weight != nullptr ? to_float(dy_in[c].v[i]) * w[i] : to_float(dy_in[c].v[i]);
      }
    };

    float2 sums = make_float2(0.f, 0.f);  // (sum g, sum g * xhat)
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (column_of(c) >= n) continue;
      float g[kVec], xhat[kVec];
      unpack(c, g, xhat);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        sums.x += g[i];
        sums.y += g[i] * xhat[i];
      }
    }
    const NormInputGrad input_grad = norm_input_grad(team_reduce<kWarps>(sums, AddFloat2{}, shared), n, args.rms, rstd);

#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int col = column_of(c);
      if (col >= n) continue;
      float g[kVec], xhat[kVec], out[kVec];
      unpack(c, g, xhat);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        out[i] = input_grad(g[i], xhat[i]);
        const float d = to_float(dy_in[c].v[i]);
        acc_weight[c * kVec + i] += d * xhat[i];
        acc_bias[c * kVec + i] += d;
      }
      if (dresidual_out != nullptr) {
        float extra[kVec];
        load_floats<kVec>(dresidual_out + start + col, extra);
#pragma unroll
        for (int i = 0; i < kVec; ++i) out[i] += extra[i];
      }
      store_floats<kVec>(dx + start + col, out);
    }
  });

  // This block's partial row of one gradient. The pointers are the same for the whole block,
  // so every thread takes the same branches and reaches the same barriers.
  auto write_partial = [&](const float (&acc)[kSlots], float* partial) {
    float* out = partial + static_cast<int64_t>(blockIdx.x) * n;
    if constexpr (kTeams == 1) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          if (column_of(c) < n) out[column_of(c) + i] = acc[c * kVec + i];
        }
      }
    } else {
      const int team = threadIdx.x / kLanes;
      for (int t = 0; t < kTeams; ++t) {
        if (team == t) {
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
#pragma unroll
            for (int i = 0; i < kVec; ++i) {
              const int col = column_of(c) + i;
              if (column_of(c) < n) team_sums[col] = t == 0 ? acc[c * kVec + i] : team_sums[col] + acc[c * kVec + i];
            }
          }
        }
        __syncthreads();
      }
      for (int col = threadIdx.x; col < n; col += kBlockThreads) out[col] = team_sums[col];
      __syncthreads();  // team_sums is reused for the next gradient
    }
  };
  if (partial_weight != nullptr) write_partial(acc_weight, partial_weight);
  if (partial_bias != nullptr) write_partial(acc_bias, partial_bias);
}

// Columns per thread for rows of n columns on `lanes` threads: 8, 16 or 32 (0: too wide).
int fused_slots(int n, int lanes) {
  const int64_t needed = ceil_div(n, lanes);
  for (int slots : {8, 16, kMaxSlots}) {
    if (needed <= slots) return slots;
  }
  return 0;
}

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 1;
  }
  return std::max(sms, 1);
}

// Blocks of the fused kernel, and so rows of its partial buffers: enough to fill the GPU,
// never more than there are row teams.
int64_t fused_blocks(int64_t rows, int n) {
  const RowLaunch plan = choose_row_launch(rows, n);
  const int64_t teams_per_block = plan.block_per_row ? 1 : kBlockThreads / kWarpSize;
  const int blocks_per_sm = fused_slots(n, plan.block_per_row ? kBlockThreads : kWarpSize) > 16
                              ? kFusedBlocksPerSm<kMaxSlots> : kFusedBlocksPerSm<16>;
  return std::max<int64_t>(1, std::min(ceil_div(rows, teams_per_block),
                                       static_cast<int64_t>(sm_count()) * blocks_per_sm));
}

template <typename T, int kWarps>
void launch_fused(const NormBackwardArgs& args, int64_t blocks, float* partial_weight, float* partial_bias,
                  cudaStream_t stream) {
  const bool aligned = args.n % kVectorWidth<T> == 0;
  auto go = [&](auto slots, auto is_aligned) {
    norm_backward_fused_kernel<T, kWarps, decltype(slots)::value, decltype(is_aligned)::value>
        <<<blocks, kBlockThreads, 0, stream>>>(args, partial_weight, partial_bias);
  };
  auto with_alignment = [&](auto slots) {
    if (aligned) go(slots, std::true_type{});
    else go(slots, std::false_type{});
  };
  switch (fused_slots(args.n, kTeamLanes<kWarps>)) {
    case 8: with_alignment(Width<8>{}); break;
    case 16: with_alignment(Width<16>{}); break;
    default: with_alignment(Width<kMaxSlots>{}); break;
  }
}

}  // namespace

int64_t norm_backward_workspace_floats(int64_t rows, int n) {
  if (rows == 0 || n == 0) return 0;
  if (n > kMaxFusedRowLength) return norm_param_grad_workspace_floats(rows, n);
  return 2 * fused_blocks(rows, n) * n;
}

cudaError_t launch_norm_backward(DType dtype, const NormBackwardArgs& args, float* workspace,
                                 cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  if (args.n > kMaxFusedRowLength || args.rows == 0) {
    const cudaError_t error = launch_norm_backward_input(dtype, args, stream);
    if (error != cudaSuccess) return error;
    return launch_norm_backward_params(dtype, args, workspace, stream);
  }
  const int64_t blocks = fused_blocks(args.rows, args.n);
  float* partial_weight = args.dweight != nullptr ? workspace : nullptr;
  float* partial_bias = args.dbias != nullptr ? workspace + blocks * args.n : nullptr;
  const cudaError_t error = dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (choose_row_launch(args.rows, args.n).block_per_row) {
      launch_fused<T, kBlockThreads / kWarpSize>(args, blocks, partial_weight, partial_bias, stream);
    } else {
      launch_fused<T, 1>(args, blocks, partial_weight, partial_bias, stream);
    }
    return cudaGetLastError();
  });
  if (error != cudaSuccess) return error;
  for (auto [partial, grad] : {std::pair{partial_weight, args.dweight}, std::pair{partial_bias, args.dbias}}) {
    if (partial == nullptr) continue;
    const cudaError_t sum_error = launch_sum_partial_rows(partial, blocks, args.n, grad, stream);
    if (sum_error != cudaSuccess) return sum_error;
  }
  return cudaSuccess;
}

}  // namespace tformer
