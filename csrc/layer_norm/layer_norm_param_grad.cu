// LayerNorm / RMSNorm weight and bias gradients: column sums over all rows of dy * xhat and
// dy. Deterministic two-stage reduction (no float atomics): stage 1 gives each block a tile
// of 32 columns by one chunk of rows and writes that chunk's partial sums; stage 2 adds the
// chunks of each column in chunk order.
#include <algorithm>
#include <initializer_list>

#include "common/row_kernels.cuh"
#include "layer_norm/layer_norm.h"

namespace tformer {
namespace {

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
    norm_param_partial_kernel(NormParamGradArgs args, int64_t rows_per_chunk, float* partial_weight,
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

__global__ void sum_chunks_kernel(const float* partial, int64_t chunks, int n, float* out) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float total = 0.f;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c * n + col];
  out[col] = total;
}

template <typename T>
cudaError_t launch_partials(const NormParamGradArgs& args, const ChunkPlan& plan, float* partial_weight,
                            float* partial_bias, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(args.n, kTileColumns)), static_cast<unsigned>(plan.chunks));
  norm_param_partial_kernel<T><<<grid, dim3(kTileColumns, kTileRows), 0, stream>>>(
      args, plan.rows_per_chunk, partial_weight, partial_bias);
  return cudaGetLastError();
}

}  // namespace

int64_t norm_param_grad_workspace_floats(int64_t rows, int n) {
  if (rows == 0 || n == 0) return 0;
  return 2 * plan_chunks(rows, n).chunks * n;
}

cudaError_t launch_norm_backward_params(DType dtype, const NormParamGradArgs& args, float* workspace,
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
  const unsigned blocks = static_cast<unsigned>(ceil_div(args.n, kBlockThreads));
  if (partial_weight != nullptr) {
    sum_chunks_kernel<<<blocks, kBlockThreads, 0, stream>>>(partial_weight, plan.chunks, args.n, args.dweight);
  }
  if (partial_bias != nullptr) {
    sum_chunks_kernel<<<blocks, kBlockThreads, 0, stream>>>(partial_bias, plan.chunks, args.n, args.dbias);
  }
  return cudaGetLastError();
}

}  // namespace tformer
