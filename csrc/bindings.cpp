// The only translation unit that sees torch: it declares the tformer::cuda_* op schemas,
// checks arguments, allocates outputs and calls the torch-free launchers in csrc/<op>/.
// Autograd and fake (meta) implementations are registered from Python, in
// tformer/backends/cuda/<op>.py. Torch headers are kept to the few needed (not
// torch/extension.h), which keeps this file's compile time small.

// Python.h first, as Python's docs require. Only the stable ABI is used (py_limited_api).
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "layer_norm/layer_norm.h"
#include "softmax/softmax.h"

// `import tformer._C` loads this library, which runs the TORCH_LIBRARY registrations below;
// the module itself is empty (the pattern of PyTorch's extension-cpp example).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace tformer {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// The C++ counterpart of C10_CUDA_KERNEL_LAUNCH_CHECK for launchers that return the error.
void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

void check_cuda(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": argument '", name, "' must be a CUDA tensor, got a tensor on ", t.device());
}

DType kernel_dtype(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": argument '", name, "' has dtype ", t.scalar_type(),
                  ", expected one of Float, Half, BFloat16");
  }
  return DType::kFloat32;  // unreachable
}

// The kernels read rows with 128-bit loads from a 16-byte aligned base. A contiguous view
// that starts mid-allocation (e.g. x[1:]) may not be aligned; it is copied once.
Tensor aligned(const Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

// x: the tensor whose rows are normalized or softmaxed.
Tensor checked_rows_input(const char* op, const char* name, const Tensor& x) {
  check_cuda(op, name, x);
  kernel_dtype(op, name, x);
  TORCH_CHECK(x.dim() >= 1, op, ": argument '", name, "' must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK(x.is_contiguous(), op, ": argument '", name, "' must be contiguous (call .contiguous()), got strides ",
              x.strides());
  TORCH_CHECK(x.size(-1) <= INT32_MAX, op, ": argument '", name, "' has rows of ", x.size(-1),
              " elements, at most 2^31 - 1 are supported");
  return aligned(x);
}

// A tensor that must match x in shape, dtype, device and layout (residual, dy, y, ...).
Tensor checked_like(const char* op, const char* name, const Tensor& t, const char* x_name, const Tensor& x) {
  check_cuda(op, name, t);
  TORCH_CHECK(t.device() == x.device(), op, ": argument '", name, "' is on ", t.device(), ", expected ", x.device(),
              " (the device of '", x_name, "')");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": argument '", name, "' has dtype ", t.scalar_type(),
              ", expected ", x.scalar_type(), " (the dtype of '", x_name, "')");
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": argument '", name, "' has shape ", t.sizes(), ", expected ", x.sizes(),
              " (the shape of '", x_name, "')");
  TORCH_CHECK(t.is_contiguous(), op, ": argument '", name, "' must be contiguous (call .contiguous()), got strides ",
              t.strides());
  return aligned(t);
}

// Weight and bias are float32 (the Python layer converts them); statistics are float32.
const float* checked_float_vector(const char* op, const char* name, const OptionalTensor& t, int64_t size,
                                  const Tensor& x) {
  if (!t.has_value()) return nullptr;
  check_cuda(op, name, *t);
  TORCH_CHECK(t->device() == x.device(), op, ": argument '", name, "' is on ", t->device(), ", expected ",
              x.device(), " (the device of 'x')");
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": argument '", name, "' has dtype ", t->scalar_type(),
              ", expected Float (float32)");
  TORCH_CHECK(t->numel() == size && t->is_contiguous(), op, ": argument '", name, "' must be a contiguous tensor of ",
              size, " elements, got shape ", t->sizes(), " and strides ", t->strides());
  return t->data_ptr<float>();
}

int64_t row_count(const Tensor& x) { return x.size(-1) == 0 ? 0 : x.numel() / x.size(-1); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

Tensor row_statistic(const Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
}

// ---- LayerNorm / RMSNorm ------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_forward(const char* op, const Tensor& x_in,
                                                        const OptionalTensor& weight, const OptionalTensor& bias,
                                                        const OptionalTensor& residual_in, double eps, bool rms) {
  const Tensor x = checked_rows_input(op, "x", x_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1);
  const Tensor residual = residual_in.has_value() ? checked_like(op, "residual", *residual_in, "x", x) : Tensor();
  NormForwardArgs args{};
  args.x = x.data_ptr();
  args.residual = residual.defined() ? residual.data_ptr() : nullptr;
  args.weight = checked_float_vector(op, "weight", weight, n, x);
  args.bias = checked_float_vector(op, "bias", bias, n, x);
  Tensor y = at::empty_like(x);
  Tensor residual_out = residual.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mean = rms ? at::empty({0}, x.options().dtype(at::kFloat)) : row_statistic(x);
  Tensor rstd = row_statistic(x);
  args.y = y.data_ptr();
  args.residual_out = residual.defined() ? residual_out.data_ptr() : nullptr;
  args.mean = rms ? nullptr : mean.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  args.rows = row_count(x);
  args.n = static_cast<int>(n);
  args.eps = static_cast<float>(eps);
  args.rms = rms;
  check_launch(launch_norm_forward(kernel_dtype(op, "x", x), args, current_stream()), op);
  return {y, residual_out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_backward(const char* op, const Tensor& dy_in,
                                                 const OptionalTensor& dresidual_out_in, const Tensor& input_in,
                                                 const OptionalTensor& weight, const OptionalTensor& mean,
                                                 const Tensor& rstd, bool weight_grad, bool bias_grad, bool rms) {
  const Tensor input = checked_rows_input(op, "input", input_in);
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor dy = checked_like(op, "dy", dy_in, "input", input);
  const Tensor dresidual_out =
      dresidual_out_in.has_value() ? checked_like(op, "dresidual_out", *dresidual_out_in, "input", input) : Tensor();
  const int64_t n = input.size(-1);
  const int64_t rows = row_count(input);
  const DType dtype = kernel_dtype(op, "input", input);

  NormBackwardArgs args{};
  args.dy = dy.data_ptr();
  args.dresidual_out = dresidual_out.defined() ? dresidual_out.data_ptr() : nullptr;
  args.input = input.data_ptr();
  args.weight = checked_float_vector(op, "weight", weight, n, input);
  args.mean = rms ? nullptr : checked_float_vector(op, "mean", mean, rows, input);
  args.rstd = checked_float_vector(op, "rstd", rstd, rows, input);
  Tensor dx = at::empty_like(input);
  args.dx = dx.data_ptr();
  args.rows = rows;
  args.n = static_cast<int>(n);
  args.rms = rms;
  check_launch(launch_norm_backward_input(dtype, args, current_stream()), op);

  const auto float_options = input.options().dtype(at::kFloat);
  Tensor dweight = at::empty({weight_grad ? n : 0}, float_options);
  Tensor dbias = at::empty({bias_grad ? n : 0}, float_options);
  if (weight_grad || bias_grad) {
    Tensor workspace = at::empty({norm_param_grad_workspace_floats(rows, static_cast<int>(n))}, float_options);
    NormParamGradArgs params{};
    params.dy = args.dy;
    params.input = args.input;
    params.mean = args.mean;
    params.rstd = args.rstd;
    params.dweight = weight_grad ? dweight.data_ptr<float>() : nullptr;
    params.dbias = bias_grad ? dbias.data_ptr<float>() : nullptr;
    params.rows = rows;
    params.n = static_cast<int>(n);
    params.rms = rms;
    check_launch(launch_norm_backward_params(dtype, params, workspace.data_ptr<float>(), current_stream()), op);
  }
  return {dx, dweight, dbias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptionalTensor& weight,
                                                          const OptionalTensor& bias, const OptionalTensor& residual,
                                                          double eps) {
  return norm_forward("cuda_layer_norm_fwd", x, weight, bias, residual, eps, /*rms=*/false);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const OptionalTensor& dresidual_out,
                                                  const Tensor& input, const OptionalTensor& weight, const Tensor& mean,
                                                  const Tensor& rstd, bool weight_grad, bool bias_grad) {
  return norm_backward("cuda_layer_norm_bwd", dy, dresidual_out, input, weight, mean, rstd, weight_grad, bias_grad,
                       /*rms=*/false);
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x, const OptionalTensor& weight,
                                                const OptionalTensor& residual, double eps) {
  auto [y, residual_out, mean, rstd] = norm_forward("cuda_rms_norm_fwd", x, weight, std::nullopt, residual, eps,
                                                    /*rms=*/true);
  return {y, residual_out, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const OptionalTensor& dresidual_out, const Tensor& input,
                                        const OptionalTensor& weight, const Tensor& rstd, bool weight_grad) {
  auto [dx, dweight, dbias] = norm_backward("cuda_rms_norm_bwd", dy, dresidual_out, input, weight, std::nullopt,
                                            rstd, weight_grad, /*bias_grad=*/false, /*rms=*/true);
  return {dx, dweight};
}

// ---- softmax ------------------------------------------------------------------------------

MaskKind mask_kind(const char* op, const Tensor& mask) {
  switch (mask.scalar_type()) {
    case at::kBool: return MaskKind::kBool;
    case at::kFloat: return MaskKind::kFloat32;
    case at::kHalf: return MaskKind::kFloat16;
    case at::kBFloat16: return MaskKind::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": argument 'mask' has dtype ", mask.scalar_type(),
                  ", expected Bool, Float, Half or BFloat16");
  }
  return MaskKind::kNone;  // unreachable
}

// Describes the mask's row dims by (size, stride) pairs, merging neighbours that form one
// strided dim, so a broadcast (stride-0) mask is read in place. Returns false if more than
// kMaxMaskRowDims dims remain.
bool describe_mask(const Tensor& mask, MaskLayout& layout) {
  layout.row_dims = 0;
  for (int64_t d = 0; d + 1 < mask.dim(); ++d) {
    const int64_t size = mask.size(d), stride = mask.stride(d);
    if (size == 1) continue;
    if (layout.row_dims > 0 && layout.strides[layout.row_dims - 1] == stride * size) {
      layout.sizes[layout.row_dims - 1] *= size;
      layout.strides[layout.row_dims - 1] = stride;
      continue;
    }
    if (layout.row_dims == kMaxMaskRowDims) return false;
    layout.sizes[layout.row_dims] = size;
    layout.strides[layout.row_dims] = stride;
    ++layout.row_dims;
  }
  layout.column_stride = mask.size(-1) == 1 ? 0 : mask.stride(-1);
  return true;
}

Tensor softmax_fwd(const Tensor& x_in, double scale, const OptionalTensor& mask_in) {
  const char* op = "cuda_softmax_fwd";
  const Tensor x = checked_rows_input(op, "x", x_in);
  const c10::cuda::CUDAGuard guard(x.device());
  SoftmaxForwardArgs args{};
  Tensor mask;  // keeps a materialized mask alive through the launch
  if (mask_in.has_value()) {
    mask = *mask_in;
    check_cuda(op, "mask", mask);
    TORCH_CHECK(mask.device() == x.device(), op, ": argument 'mask' is on ", mask.device(), ", expected ", x.device(),
                " (the device of 'x')");
    TORCH_CHECK(mask.sizes() == x.sizes(), op, ": argument 'mask' has shape ", mask.sizes(), ", expected x's shape ",
                x.sizes(), " (expand it: broadcast dims may have stride 0)");
    args.mask.kind = mask_kind(op, mask);
    if (!describe_mask(mask, args.mask)) {
      mask = mask.contiguous();  // rare: too many non-mergeable dims to index in place
      describe_mask(mask, args.mask);
    }
    args.mask.data = mask.data_ptr();
  }
  Tensor y = at::empty_like(x);
  args.x = x.data_ptr();
  args.y = y.data_ptr();
  args.rows = row_count(x);
  args.n = static_cast<int>(x.size(-1));
  args.scale = static_cast<float>(scale);
  check_launch(launch_softmax_forward(kernel_dtype(op, "x", x), args, current_stream()), op);
  return y;
}

Tensor softmax_bwd(const Tensor& dy_in, const Tensor& y_in, double scale) {
  const char* op = "cuda_softmax_bwd";
  const Tensor y = checked_rows_input(op, "y", y_in);
  const c10::cuda::CUDAGuard guard(y.device());
  const Tensor dy = checked_like(op, "dy", dy_in, "y", y);
  Tensor dx = at::empty_like(y);
  SoftmaxBackwardArgs args{};
  args.dy = dy.data_ptr();
  args.y = y.data_ptr();
  args.dx = dx.data_ptr();
  args.rows = row_count(y);
  args.n = static_cast<int>(y.size(-1));
  args.scale = static_cast<float>(scale);
  check_launch(launch_softmax_backward(kernel_dtype(op, "y", y), args, current_stream()), op);
  return dx;
}

}  // namespace
}  // namespace tformer

TORCH_LIBRARY(tformer, m) {
  m.def("cuda_layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) "
        "-> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def("cuda_layer_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor input, Tensor? weight, Tensor mean, "
        "Tensor rstd, bool weight_grad, bool bias_grad) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("cuda_rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps) "
        "-> (Tensor y, Tensor residual_out, Tensor rstd)");
  m.def("cuda_rms_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor input, Tensor? weight, Tensor rstd, "
        "bool weight_grad) -> (Tensor dx, Tensor dweight)");
  m.def("cuda_softmax_fwd(Tensor x, float scale, Tensor? mask) -> Tensor");
  m.def("cuda_softmax_bwd(Tensor dy, Tensor y, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tformer, CUDA, m) {
  m.impl("cuda_layer_norm_fwd", &tformer::layer_norm_fwd);
  m.impl("cuda_layer_norm_bwd", &tformer::layer_norm_bwd);
  m.impl("cuda_rms_norm_fwd", &tformer::rms_norm_fwd);
  m.impl("cuda_rms_norm_bwd", &tformer::rms_norm_bwd);
  m.impl("cuda_softmax_fwd", &tformer::softmax_fwd);
  m.impl("cuda_softmax_bwd", &tformer::softmax_bwd);
}
