// LayerNorm / RMSNorm backward for rows wider than kMaxFusedRowLength, whose columns do not
// fit in one block's registers (layer_norm_bwd.cu fuses everything else into one kernel):
//  - the input gradient, two passes over the row: pass 1 reduces the two row means, pass 2
//    re-reads dy and x (from L1/L2) and writes dx (formula in norm_input_grad.cuh);
//  - dweight = sum over rows of dy * xhat, dbias = sum of dy, without float atomics: a block
//    per tile of 32 columns by one chunk of rows writes that chunk's partial sums, then
//    sum_partial_rows adds the chunks of each column in chunk order (it also reduces the
//    fused kernel's partial rows).
#include <algorithm>
#include <initializer_list>
#include <utility>

#include "common/row_kernels.cuh"
#include "layer_norm/layer_norm.h"
#include "layer_norm/norm_input_grad.cuh"

namespace tformer {
namespace {

template <typename T, int kWarps>
__global__ void __launch_bounds__(kBlockThreads) norm_backward_input_kernel(NormBackwardArgs args) {
  constexpr int kVec = kVectorWidth<T>;
  constexpr int kLanes = kTeamLanes<kWarps>;
  __shared__ float2 shared[kWarps];
  const T* dy = static_cast<const T*>(args.dy);
  const T* dresidual_out = static_cast<const T*>(args.dresidual_out);
  const T* input = static_cast<const T*>(args.input);
  T* dx = static_cast<T*>(args.dx);
  const int n = args.n;

  for_each_team_row<kWarps>(args.rows, [&](int64_t row, int lane) {
    const int64_t start = row * n;
    const float mean = args.mean != nullptr ? args.mean[row] : 0.f;
    const float rstd = args.rstd[row];

    // Loads one chunk of the row and forms xhat and g in place.
    auto load_chunk = [&](auto width, int col, float* xhat, float* g) {
      constexpr int W = decltype(width)::value;
      float v[W], d[W], w[W];
      load_floats<W>(input + start + col, v);
      load_floats<W>(dy + start + col, d);
      if (args.weight != nullptr) load_params<W>(args.weight, col, w);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        xhat[i] = (v[i] - mean) * rstd;
        g[i] = args.weight != nullptr ? d[i] * w[i] : d[i];
      }
    };

    float2 sums = make_float2(0.f, 0.f);  // (sum g, sum g * xhat)
    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float xhat[W], g[W];
      load_chunk(width, col, xhat, g);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        sums.x += g[i];
        sums.y += g[i] * xhat[i];
      }
    });
    const NormInputGrad input_grad = norm_input_grad(team_reduce<kWarps>(sums, AddFloat2{}, shared), n, args.rms, rstd);

    for_each_column<kVec>(start, n, lane, kLanes, [&](auto width, int col) {
      constexpr int W = decltype(width)::value;
      float xhat[W], g[W];
      load_chunk(width, col, xhat, g);
      float out[W];
#pragma unroll
      for (int i = 0; i < W; ++i) out[i] = input_grad(g[i], xhat[i]);
      if (dresidual_out != nullptr) {
        float extra[W];
        load_floats<W>(dresidual_out + start + col, extra);
#pragma unroll
        for (int i = 0; i < W; ++i) out[i] += extra[i];
      }
      store_floats<W>(dx + start + col, out);
    });
  });
}

constexpr int kTileColumns = 32;  // threadIdx.x: one column each, so a warp reads 32 adjacent elements
constexpr int kTileRows = 8;      // threadIdx.y: rows of the chunk, interleaved
// Enough blocks to fill a large GPU several times over; bounds the workspace to
// kMaxChunks * n floats per gradient.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMaxChunks = 512;

struct ChunkPlan {
  int64_t chunks;
  int64_t rows_per_chunk;
};

ChunkPlan plan_chunks(int64_t rows, int n) {
  const int64_t column_tiles = ceil_div(n, kTileColumns);
  int64_t chunks = ceil_div(kTargetBlocks, column_tiles);
  chunks = std::min(chunks, std::min(kMaxChunks, ceil_div(rows, kTileRows)));
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  return {ceil_div(rows, rows_per_chunk), rows_per_chunk};
}

template <typename T>
__global__ void __launch_bounds__(kTileColumns * kTileRows)
    norm_param_partial_kernel(NormBackwardArgs args, int64_t rows_per_chunk, float* partial_weight,
                              float* partial_bias) {
  __shared__ float tile[2][kTileRows][kTileColumns + 1];
  const T* dy = static_cast<const T*>(args.dy);
  const T* input = static_cast<const T*>(args.input);
  const int col = blockIdx.x * kTileColumns + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t begin = chunk * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < args.rows ? begin + rows_per_chunk : args.rows;

  float sum_weight = 0.f, sum_bias = 0.f;
  if (col < args.n) {
    for (int64_t row = begin + threadIdx.y; row < end; row += kTileRows) {
      const int64_t index = row * args.n + col;
      const float g = to_float(dy[index]);
      const float mean = args.mean != nullptr ? args.mean[row] : 0.f;
      sum_weight += g * (to_float(input[index]) - mean) * args.rstd[row];
      sum_bias += g;
    }
  }
  tile[0][threadIdx.y][threadIdx.x] = sum_weight;
  tile[1][threadIdx.y][threadIdx.x] = sum_bias;
  __syncthreads();
  if (threadIdx.y == 0 && col < args.n) {
    for (int r = 1; r < kTileRows; ++r) {
      sum_weight += tile[0][r][threadIdx.x];
      sum_bias += tile[1][r][threadIdx.x];
    }
    if (partial_weight != nullptr) partial_weight[chunk * args.n + col] = sum_weight;
    if (partial_bias != nullptr) partial_bias[chunk * args.n + col] = sum_bias;
  }
}

// out[col] = sum over r of partial[r][col], r in order. A block is 32 columns by 8 slices of
// rows; slice j adds rows j, j + 8, ..., then slice 0 adds the slices in order. The order
// depends only on the number of partial rows, so the sum is bitwise reproducible.
constexpr int kSumSlices = 8;

__global__ void __launch_bounds__(kTileColumns * kSumSlices)
    sum_partial_rows_kernel(const float* partial, int64_t partial_rows, int n, float* out) {
  __shared__ float slices[kSumSlices][kTileColumns + 1];
  const int col = blockIdx.x * kTileColumns + threadIdx.x;
  float total = 0.f;
  if (col < n) {
    for (int64_t r = threadIdx.y; r < partial_rows; r += kSumSlices) total += partial[r * n + col];
  }
  slices[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    for (int j = 1; j < kSumSlices; ++j) total += slices[j][threadIdx.x];
    out[col] = total;
  }
}

template <typename T>
cudaError_t launch_partials(const NormBackwardArgs& args, const ChunkPlan& plan, float* partial_weight,
                            float* partial_bias, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(args.n, kTileColumns)), static_cast<unsigned>(plan.chunks));
  norm_param_partial_kernel<T><<<grid, dim3(kTileColumns, kTileRows), 0, stream>>>(
      args, plan.rows_per_chunk, partial_weight, partial_bias);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_norm_backward_input(DType dtype, const NormBackwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.n == 0) return cudaSuccess;
  constexpr int kWarps = kBlockThreads / kWarpSize;  // rows this wide take a block each
  const int64_t blocks = std::min(args.rows, kMaxGridBlocks);
  return dispatch_dtype(dtype, [&](auto tag) {
    norm_backward_input_kernel<typename decltype(tag)::type, kWarps><<<blocks, kBlockThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

int64_t norm_param_grad_workspace_floats(int64_t rows, int n) {
  if (rows == 0 || n == 0) return 0;
  return 2 * plan_chunks(rows, n).chunks * n;
}

cudaError_t launch_norm_backward_params(DType dtype, const NormBackwardArgs& args, float* workspace,
                                        cudaStream_t stream) {
  if (args.n == 0 || (args.dweight == nullptr && args.dbias == nullptr)) return cudaSuccess;
  if (args.rows == 0) {  // a sum over no rows
    for (float* grad : {args.dweight, args.dbias}) {
      if (grad == nullptr) continue;
      const cudaError_t error = cudaMemsetAsync(grad, 0, sizeof(float) * args.n, stream);
      if (error != cudaSuccess) return error;
    }
    return cudaSuccess;
  }
  const ChunkPlan plan = plan_chunks(args.rows, args.n);
  float* partial_weight = args.dweight != nullptr ? workspace : nullptr;
  float* partial_bias = args.dbias != nullptr ? workspace + plan.chunks * args.n : nullptr;
  const cudaError_t error = dispatch_dtype(dtype, [&](auto tag) {
    return launch_partials<typename decltype(tag)::type>(args, plan, partial_weight, partial_bias, stream);
  });
  if (error != cudaSuccess) return error;
  for (auto [partial, grad] : {std::pair{partial_weight, args.dweight}, std::pair{partial_bias, args.dbias}}) {
    if (partial == nullptr) continue;
    const cudaError_t sum_error = launch_sum_partial_rows(partial, plan.chunks, args.n, grad, stream);
    if (sum_error != cudaSuccess) return sum_error;
  }
  return cudaSuccess;
}

cudaError_t launch_sum_partial_rows(const float* partial, int64_t partial_rows, int n, float* out,
                                    cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(n, kTileColumns));
  sum_partial_rows_kernel<<<blocks, dim3(kTileColumns, kSumSlices), 0, stream>>>(partial, partial_rows, n, out);
  return cudaGetLastError();
}

}  // namespace tformer
