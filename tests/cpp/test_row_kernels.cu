// GPU test of the torch-free row kernels (LayerNorm, RMSNorm, softmax; forward and
// backward) against a float64 reference computed here on the host. Run through ctest;
// exits 77 (ctest's skip code, SKIP_RETURN_CODE) when no CUDA device is visible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "layer_norm/layer_norm.h"
#include "softmax/softmax.h"

using namespace tformer;

namespace {

int failures = 0;

#define CUDA_OK(expr)                                                                       \
  do {                                                                                      \
    cudaError_t error_ = (expr);                                                            \
    if (error_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(error_)); \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

template <typename T> T to_t(float v);
template <> float to_t<float>(float v) { return v; }
template <> __half to_t<__half>(float v) { return __float2half(v); }
template <> __nv_bfloat16 to_t<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
float to_f(float v) { return v; }
float to_f(__half v) { return __half2float(v); }
float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kFloat32; }
template <> DType dtype_of<__half>() { return DType::kFloat16; }
template <> DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

template <typename T> double tolerance();
template <> double tolerance<float>() { return 1e-4; }
template <> double tolerance<__half>() { return 1e-2; }
template <> double tolerance<__nv_bfloat16>() { return 6e-2; }

// Host values rounded to T, so the reference sees exactly what the kernel reads.
template <typename T>
std::vector<float> random_values(size_t count, std::mt19937& rng, float offset = 0.f) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> values(count);
  for (float& v : values) v = to_f(to_t<T>(offset + normal(rng)));
  return values;
}

// A device buffer of T (or float) filled from host floats.
template <typename T>
struct Device {
  T* ptr = nullptr;
  size_t count = 0;
  explicit Device(size_t n) : count(n) { CUDA_OK(cudaMalloc(&ptr, sizeof(T) * (n ? n : 1))); }
  explicit Device(const std::vector<float>& host) : Device(host.size()) {
    std::vector<T> converted(host.size());
    for (size_t i = 0; i < host.size(); ++i) converted[i] = to_t<T>(host[i]);
    CUDA_OK(cudaMemcpy(ptr, converted.data(), sizeof(T) * count, cudaMemcpyHostToDevice));
  }
  ~Device() { cudaFree(ptr); }
  std::vector<float> host() const {
    std::vector<T> raw(count);
    CUDA_OK(cudaMemcpy(raw.data(), ptr, sizeof(T) * count, cudaMemcpyDeviceToHost));
    std::vector<float> out(count);
    for (size_t i = 0; i < count; ++i) out[i] = to_f(raw[i]);
    return out;
  }
};

void expect_close(const std::string& what, const std::vector<float>& actual, const std::vector<double>& expected,
                  double tol) {
  double worst = 0.0;
  size_t worst_at = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double error = std::fabs(actual[i] - expected[i]) / (1.0 + std::fabs(expected[i]));
    if (!(error <= worst)) {  // also catches NaN
      worst = std::isnan(error) ? INFINITY : error;
      worst_at = i;
    }
  }
  const bool ok = worst <= tol;
  if (!ok) ++failures;
  std::printf("%s %-48s max scaled error %.3g (tol %.1g) at %zu\n", ok ? "PASS" : "FAIL", what.c_str(), worst, tol,
              worst_at);
}

// LayerNorm or RMSNorm with residual, weight and bias; forward and all gradients.
template <typename T>
void test_norm(int64_t rows, int n, bool rms, std::mt19937& rng) {
  const std::string name = std::string(rms ? "rms_norm " : "layer_norm ") + dtype_name(dtype_of<T>()) + " " +
                           std::to_string(rows) + "x" + std::to_string(n);
  const size_t count = static_cast<size_t>(rows) * n;
  const std::vector<float> x = random_values<T>(count, rng, 3.f), residual = random_values<T>(count, rng);
  const std::vector<float> dy = random_values<T>(count, rng), dres = random_values<T>(count, rng);
  const std::vector<float> weight = random_values<float>(n, rng, 1.f), bias = random_values<float>(n, rng);
  Device<T> d_x(x), d_residual(residual), d_dy(dy), d_dres(dres), d_y(count), d_sum(count), d_dx(count);
  Device<float> d_weight(weight), d_bias(bias), d_mean(rows), d_rstd(rows), d_dweight(n), d_dbias(n);
  Device<float> workspace(norm_backward_workspace_floats(rows, n));

  NormForwardArgs forward{d_x.ptr, d_residual.ptr, d_weight.ptr, rms ? nullptr : d_bias.ptr, d_y.ptr, d_sum.ptr,
                          rms ? nullptr : d_mean.ptr, d_rstd.ptr, rows, n, 1e-5f, rms};
  CUDA_OK(launch_norm_forward(dtype_of<T>(), forward, nullptr));
  NormBackwardArgs backward{d_dy.ptr, d_dres.ptr, d_sum.ptr, d_weight.ptr, rms ? nullptr : d_mean.ptr, d_rstd.ptr,
                            d_dx.ptr, d_dweight.ptr, rms ? nullptr : d_dbias.ptr, rows, n, rms};
  CUDA_OK(launch_norm_backward(dtype_of<T>(), backward, workspace.ptr, nullptr));
  CUDA_OK(cudaDeviceSynchronize());

  std::vector<double> y(count), dx(count), dweight(n, 0.0), dbias(n, 0.0), sum(count);
  for (int64_t r = 0; r < rows; ++r) {
    const size_t s = static_cast<size_t>(r) * n;
    double mean = 0.0, var = 0.0;
    for (int c = 0; c < n; ++c) sum[s + c] = to_f(to_t<T>(x[s + c] + residual[s + c]));
    if (!rms) {
      for (int c = 0; c < n; ++c) mean += sum[s + c];
      mean /= n;
    }
    for (int c = 0; c < n; ++c) var += (sum[s + c] - mean) * (sum[s + c] - mean);
    const double rstd = 1.0 / std::sqrt(var / n + 1e-5);
    double mean_g = 0.0, mean_gx = 0.0;
    for (int c = 0; c < n; ++c) {
      const double xhat = (sum[s + c] - mean) * rstd, g = dy[s + c] * weight[c];
      y[s + c] = xhat * weight[c] + (rms ? 0.0 : bias[c]);
      mean_g += g / n;
      mean_gx += g * xhat / n;
      dweight[c] += dy[s + c] * xhat;
      dbias[c] += dy[s + c];
    }
    for (int c = 0; c < n; ++c) {
      const double xhat = (sum[s + c] - mean) * rstd, g = dy[s + c] * weight[c];
      dx[s + c] = rstd * (g - (rms ? 0.0 : mean_g) - xhat * mean_gx) + dres[s + c];
    }
  }
  const double tol = tolerance<T>();
  expect_close(name + " residual_out", d_sum.host(), sum, 0.0);
  expect_close(name + " y", d_y.host(), y, tol);
  expect_close(name + " dx", d_dx.host(), dx, tol);
  // Column sums over many rows: compare relative to their size.
  expect_close(name + " dweight", d_dweight.host(), dweight, tol * std::sqrt(static_cast<double>(rows)));
  if (!rms) expect_close(name + " dbias", d_dbias.host(), dbias, tol * std::sqrt(static_cast<double>(rows)));
}

// Softmax over (batch, heads, rows, n) with a bool mask broadcast over heads (stride 0),
// one fully masked row per batch; forward and backward.
template <typename T>
void test_softmax(int batch, int heads, int rows, int n, std::mt19937& rng) {
  const std::string name = std::string("softmax ") + dtype_name(dtype_of<T>()) + " n=" + std::to_string(n);
  const int64_t total_rows = static_cast<int64_t>(batch) * heads * rows;
  const size_t count = static_cast<size_t>(total_rows) * n;
  const float scale = 0.3f;
  const std::vector<float> x = random_values<T>(count, rng), dy = random_values<T>(count, rng);
  std::vector<unsigned char> mask(static_cast<size_t>(batch) * rows * n);  // (batch, 1, rows, n)
  for (size_t i = 0; i < mask.size(); ++i) mask[i] = (rng() % 4) != 0;
  for (int b = 0; b < batch; ++b)
    for (int c = 0; c < n; ++c) mask[(static_cast<size_t>(b) * rows + 1) * n + c] = 0;  // row 1: fully masked
  Device<T> d_x(x), d_dy(dy), d_y(count), d_dx(count);
  bool* d_mask = nullptr;
  CUDA_OK(cudaMalloc(&d_mask, mask.size()));
  CUDA_OK(cudaMemcpy(d_mask, mask.data(), mask.size(), cudaMemcpyHostToDevice));

  SoftmaxForwardArgs forward{};
  forward.x = d_x.ptr;
  forward.y = d_y.ptr;
  forward.mask.data = d_mask;
  forward.mask.kind = MaskKind::kBool;
  forward.mask.row_dims = 3;  // (batch, heads, rows) with strides (rows * n, 0, n)
  forward.mask.sizes[0] = batch, forward.mask.sizes[1] = heads, forward.mask.sizes[2] = rows;
  forward.mask.strides[0] = static_cast<int64_t>(rows) * n, forward.mask.strides[1] = 0, forward.mask.strides[2] = n;
  forward.mask.column_stride = 1;
  forward.rows = total_rows;
  forward.n = n;
  forward.scale = scale;
  CUDA_OK(launch_softmax_forward(dtype_of<T>(), forward, nullptr));
  const std::vector<float> y_kernel = d_y.host();  // backward reads the kernel's own y
  SoftmaxBackwardArgs backward{d_dy.ptr, d_y.ptr, d_dx.ptr, total_rows, n, scale};
  CUDA_OK(launch_softmax_backward(dtype_of<T>(), backward, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  cudaFree(d_mask);

  std::vector<double> y(count), dx(count);
  for (int64_t r = 0; r < total_rows; ++r) {
    const int b = static_cast<int>(r / (static_cast<int64_t>(heads) * rows)), i = static_cast<int>(r % rows);
    const size_t s = static_cast<size_t>(r) * n, m = (static_cast<size_t>(b) * rows + i) * n;
    double top = -INFINITY, denom = 0.0, dot = 0.0;
    for (int c = 0; c < n; ++c)
      if (mask[m + c]) top = std::fmax(top, x[s + c] * static_cast<double>(scale));
    for (int c = 0; c < n; ++c) {
      y[s + c] = mask[m + c] ? std::exp(x[s + c] * static_cast<double>(scale) - top) : 0.0;
      denom += y[s + c];
    }
    for (int c = 0; c < n; ++c) {
      if (denom > 0) y[s + c] /= denom;
      dot += dy[s + c] * static_cast<double>(y_kernel[s + c]);
    }
    for (int c = 0; c < n; ++c) dx[s + c] = scale * y_kernel[s + c] * (dy[s + c] - dot);
  }
  expect_close(name + " y (fully masked rows -> 0)", y_kernel, y, tolerance<T>());
  expect_close(name + " dx", d_dx.host(), dx, tolerance<T>());
}

template <typename T>
void test_dtype(std::mt19937& rng) {
  // Row lengths: a warp per row (with and without a scalar tail), a block per row (8, 16 and
  // 32 columns per thread in the fused backward), and rows wider than the fused backward takes.
  for (int n : {1, 17, 768, 1000, 4099, 8192, 8200, 65536}) {
    test_norm<T>(37, n, /*rms=*/false, rng);
    test_norm<T>(37, n, /*rms=*/true, rng);
  }
  // Many rows: the fused backward's grid strides, and dweight/dbias add many partial rows.
  test_norm<T>(5000, 1024, /*rms=*/false, rng);
  test_norm<T>(3001, 2048, /*rms=*/true, rng);
  for (int n : {5, 128, 1023, 2053}) test_softmax<T>(2, 3, 5, n, rng);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device is visible\n");
    return 77;
  }
  std::mt19937 rng(0);
  test_dtype<float>(rng);
  test_dtype<__half>(rng);
  test_dtype<__nv_bfloat16>(rng);
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
