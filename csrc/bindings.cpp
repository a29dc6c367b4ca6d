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
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attention/attention.h"
#include "attention_sm90/attention_sm90.h"
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
                                  const char* x_name, const Tensor& x) {
  if (!t.has_value()) return nullptr;
  check_cuda(op, name, *t);
  TORCH_CHECK(t->device() == x.device(), op, ": argument '", name, "' is on ", t->device(), ", expected ",
              x.device(), " (the device of '", x_name, "')");
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": argument '", name, "' has dtype ", t->scalar_type(),
              ", expected Float (float32)");
  TORCH_CHECK(t->numel() == size && t->is_contiguous(), op, ": argument '", name, "' must be a contiguous tensor of ",
              size, " elements, got shape ", t->sizes(), " and strides ", t->strides());
  return t->data_ptr<float>();
}

// The product of the leading sizes: mean and rstd have this many elements also when the rows
// are empty (n = 0), where numel / n would give 0. The launchers skip n = 0 themselves.
int64_t row_count(const Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Per-row float32 statistic (mean, rstd). Rows of no elements get NaN, the mean of nothing,
// as the Triton backend gives: the kernels skip them and would leave the memory unwritten.
Tensor row_statistic(const Tensor& x) {
  const at::IntArrayRef shape = x.sizes().slice(0, x.dim() - 1);
  const auto options = x.options().dtype(at::kFloat);
  return x.size(-1) == 0 ? at::full(shape, NAN, options) : at::empty(shape, options);
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
  args.weight = checked_float_vector(op, "weight", weight, n, "x", x);
  args.bias = checked_float_vector(op, "bias", bias, n, "x", x);
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
  args.weight = checked_float_vector(op, "weight", weight, n, "input", input);
  args.mean = rms ? nullptr : checked_float_vector(op, "mean", mean, rows, "input", input);
  args.rstd = checked_float_vector(op, "rstd", rstd, rows, "input", input);
  Tensor dx = at::empty_like(input);
  args.dx = dx.data_ptr();
  const auto float_options = input.options().dtype(at::kFloat);
  Tensor dweight = at::empty({weight_grad ? n : 0}, float_options);
  Tensor dbias = at::empty({bias_grad ? n : 0}, float_options);
  args.dweight = weight_grad ? dweight.data_ptr<float>() : nullptr;
  args.dbias = bias_grad ? dbias.data_ptr<float>() : nullptr;
  args.rows = rows;
  args.n = static_cast<int>(n);
  args.rms = rms;
  const bool partials = weight_grad || bias_grad;
  Tensor workspace =
      at::empty({partials ? norm_backward_workspace_floats(rows, static_cast<int>(n)) : 0}, float_options);
  check_launch(launch_norm_backward(dtype, args, partials ? workspace.data_ptr<float>() : nullptr, current_stream()),
               op);
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

// ---- attention ----------------------------------------------------------------------------
// Padded batch: q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), lse (B, Hq, Sq). Packed (both
// cu_seqlens given): q (total_q, Hq, D), k and v (total_k, Hkv, D), lse (Hq, total_q); the
// max_seqlen_* arguments bound the packed lengths and are ignored for a padded batch.

// (sequence, head, token) strides of a padded (B, H, S, D) or packed (total, H, D) tensor.
Strides3 attention_strides(const Tensor& t, bool packed) {
  return packed ? Strides3{0, t.stride(1), t.stride(0)} : Strides3{t.stride(0), t.stride(1), t.stride(2)};
}

Strides3 lse_strides(const Tensor& lse, bool packed) {
  return packed ? Strides3{0, lse.stride(0), lse.stride(1)} : Strides3{lse.stride(0), lse.stride(1), lse.stride(2)};
}

// The kernels copy rows in 16-byte chunks: dim stride 1, every other stride a multiple of
// 8 elements and a 16-byte aligned base.
bool rows_are_aligned(const Tensor& t) {
  if (t.stride(-1) != 1 || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.stride(d) % 8 != 0 && t.size(d) > 1) return false;
  }
  return true;
}

// A strided view that the kernels can read in place, else an aligned contiguous copy.
Tensor kernel_rows(const Tensor& t) { return rows_are_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

// q, k, v: fp16/bf16 CUDA tensors whose last dim is contiguous (other strides are free).
Tensor attention_input(const char* op, const char* name, const Tensor& t, int64_t ndim, const Tensor& q) {
  check_cuda(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, ": argument '", name,
              "' has dtype ", t.scalar_type(), ", expected Half or BFloat16 (the CUDA attention kernels have no "
              "float32 path)");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": argument '", name, "' has dtype ", t.scalar_type(),
              ", expected ", q.scalar_type(), " (the dtype of 'q')");
  TORCH_CHECK(t.device() == q.device(), op, ": argument '", name, "' is on ", t.device(), ", expected ", q.device(),
              " (the device of 'q')");
  TORCH_CHECK(t.dim() == ndim, op, ": argument '", name, "' must have ", ndim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, op, ": argument '", name,
              "' must have a contiguous last (head) dimension, stride 1, got strides ", t.strides(),
              " (call .contiguous())");
  return kernel_rows(t);
}

// Tensors of the problem, kept alive (and possibly copied for alignment) during the launch.
struct AttentionInputs {
  Tensor q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k;
  AttentionProblem problem;
  bool packed = false;
  int smem_optin = 0;  // the device's per-block shared memory limit (opt-in), read once per call
};

void check_cu_seqlens(const char* op, const char* name, const Tensor& cu, const Tensor& q) {
  check_cuda(op, name, cu);
  TORCH_CHECK(cu.device() == q.device(), op, ": argument '", name, "' is on ", cu.device(), ", expected ",
              q.device(), " (the device of 'q')");
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 2, op, ": argument '", name,
              "' must be a 1-d Int (int32) tensor of num_seqs + 1 >= 2 offsets, got dtype ", cu.scalar_type(),
              " and shape ", cu.sizes());
}

AttentionInputs attention_inputs(const char* op, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                 const OptionalTensor& key_padding_mask, const OptionalTensor& cu_seqlens_q,
                                 const OptionalTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                 bool causal, double scale, int64_t window_left, int64_t window_right,
                                 bool bottom_right, double softcap) {
  AttentionInputs in;
  in.packed = cu_seqlens_q.has_value();
  TORCH_CHECK(in.packed == cu_seqlens_k.has_value(), op,
              ": arguments 'cu_seqlens_q' and 'cu_seqlens_k' must be given together (packed sequences) or not at all");
  const int64_t ndim = in.packed ? 3 : 4;
  in.q = attention_input(op, "q", q_in, ndim, q_in);
  in.k = attention_input(op, "k", k_in, ndim, q_in);
  in.v = attention_input(op, "v", v_in, ndim, q_in);
  const Tensor& q = in.q;
  const Tensor& k = in.k;
  const int64_t seq_axis = in.packed ? 0 : 2;  // the head axis is 1 in both layouts
  const int64_t head_dim = q.size(-1), num_heads = q.size(1), num_kv_heads = k.size(1);
  TORCH_CHECK(attention_head_dim_bucket(static_cast<int>(std::min<int64_t>(head_dim, INT32_MAX))) != 0, op,
              ": argument 'q' has head dim ", head_dim, "; the CUDA attention kernels take head dims that are a "
              "multiple of 8 and at most ", kAttentionMaxHeadDim, " (compiled for 32, 64, 96, 128 and 256; smaller "
              "ones run in the next of these)");
  TORCH_CHECK(k.size(-1) == head_dim && in.v.sizes() == k.sizes(), op, ": arguments 'k' and 'v' must have the "
              "same shape with q's head dim ", head_dim, ", got k ", k.sizes(), " and v ", in.v.sizes());
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": argument 'q' has ", num_heads,
              " heads and 'k' has ", num_kv_heads, "; the query heads must be a multiple of the key/value heads");
  TORCH_CHECK(num_heads <= 65535, op, ": argument 'q' has ", num_heads, " heads, at most 65535 are supported");

  AttentionProblem& p = in.problem;
  if (in.packed) {
    in.cu_seqlens_q = *cu_seqlens_q;
    in.cu_seqlens_k = *cu_seqlens_k;
    check_cu_seqlens(op, "cu_seqlens_q", in.cu_seqlens_q, q);
    check_cu_seqlens(op, "cu_seqlens_k", in.cu_seqlens_k, q);
    TORCH_CHECK(in.cu_seqlens_q.numel() == in.cu_seqlens_k.numel(), op, ": 'cu_seqlens_q' has ",
                in.cu_seqlens_q.numel(), " offsets and 'cu_seqlens_k' has ", in.cu_seqlens_k.numel(),
                "; both must describe the same sequences");
    TORCH_CHECK(!key_padding_mask.has_value(), op, ": argument 'key_padding_mask' is not taken with packed "
                "sequences (cu_seqlens_*): the offsets already say which keys exist");
    in.cu_seqlens_q = in.cu_seqlens_q.contiguous();
    in.cu_seqlens_k = in.cu_seqlens_k.contiguous();
    p.cu_seqlens_q = in.cu_seqlens_q.data_ptr<int32_t>();
    p.cu_seqlens_k = in.cu_seqlens_k.data_ptr<int32_t>();
    TORCH_CHECK(in.cu_seqlens_q.numel() - 1 <= 65535, op, ": argument 'cu_seqlens_q' describes ",
                in.cu_seqlens_q.numel() - 1, " sequences, at most 65535 are supported");
    p.num_seqs = static_cast<int>(in.cu_seqlens_q.numel() - 1);
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q <= INT32_MAX && max_seqlen_k <= INT32_MAX,
                op, ": arguments 'max_seqlen_q' and 'max_seqlen_k' must be in [0, 2^31), got ", max_seqlen_q,
                " and ", max_seqlen_k);
    p.max_seqlen_q = static_cast<int>(max_seqlen_q);
    p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  } else {
    TORCH_CHECK(k.size(0) == q.size(0), op, ": argument 'k' has batch size ", k.size(0), ", expected ", q.size(0),
                " (the batch size of 'q')");
    TORCH_CHECK(q.size(0) <= 65535, op, ": argument 'q' has batch size ", q.size(0), ", at most 65535 are supported");
    p.num_seqs = static_cast<int>(q.size(0));
    p.max_seqlen_q = static_cast<int>(q.size(seq_axis));
    p.max_seqlen_k = static_cast<int>(k.size(seq_axis));
    if (key_padding_mask.has_value()) {
      in.key_padding_mask = *key_padding_mask;
      const Tensor& mask = in.key_padding_mask;
      check_cuda(op, "key_padding_mask", mask);
      TORCH_CHECK(mask.device() == q.device(), op, ": argument 'key_padding_mask' is on ", mask.device(),
                  ", expected ", q.device(), " (the device of 'q')");
      TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": argument 'key_padding_mask' has dtype ",
                  mask.scalar_type(), ", expected Bool (True marks a padding key)");
      TORCH_CHECK(mask.dim() == 2 && mask.size(0) == q.size(0) && mask.size(1) == k.size(seq_axis), op,
                  ": argument 'key_padding_mask' has shape ", mask.sizes(), ", expected (", q.size(0), ", ",
                  k.size(seq_axis), ") (batch, Sk)");
      p.key_padding = static_cast<const uint8_t*>(mask.data_ptr());
      p.key_padding_seq_stride = mask.stride(0);
      p.key_padding_token_stride = mask.stride(1);
    }
  }
  TORCH_CHECK(q.size(seq_axis) <= INT32_MAX && k.size(seq_axis) <= INT32_MAX, op,
              ": sequences of at most 2^31 - 1 tokens are supported, got q ", q.sizes(), " and k ", k.sizes());
  check_launch(cudaDeviceGetAttribute(&in.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()), op);
  const int needed = attention_shared_memory_bytes(static_cast<int>(head_dim));
  TORCH_CHECK(needed <= in.smem_optin, op, ": head dim ", head_dim, " needs ", needed, " bytes of shared memory "
              "per block; this device allows ", in.smem_optin);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = in.v.data_ptr();
  p.q_strides = attention_strides(q, in.packed);
  p.k_strides = attention_strides(k, in.packed);
  p.v_strides = attention_strides(in.v, in.packed);
  p.q_tokens = q.size(seq_axis);
  p.k_tokens = k.size(seq_axis);
  p.num_heads = static_cast<int>(num_heads);
  p.group_size = static_cast<int>(num_heads / num_kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.scale = static_cast<float>(scale);
  // The band, as tformer/ops/attention_mask.py's resolve_band folds it: causal is right = 0.
  TORCH_CHECK(window_left >= -1 && window_right >= -1 && window_left <= INT32_MAX && window_right <= INT32_MAX, op,
              ": arguments 'window_left' and 'window_right' must be >= 0, or -1 for unbounded, got ", window_left,
              " and ", window_right);
  TORCH_CHECK(!(causal && window_right > 0), op, ": argument 'window_right' is ", window_right,
              " but causal=True allows no key after the diagonal");
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op,
              ": argument 'softcap' must be a finite float >= 0 (0 disables it), got ", softcap);
  p.window_left = static_cast<int>(window_left);
  p.window_right = causal ? 0 : static_cast<int>(window_right);
  p.bottom_right = bottom_right;
  p.softcap = static_cast<float>(softcap);
  p.causal = p.window_right == 0 && p.window_left < 0 && !p.bottom_right;
  return in;
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const OptionalTensor& key_padding_mask, const OptionalTensor& cu_seqlens_q,
                                         const OptionalTensor& cu_seqlens_k, int64_t max_seqlen_q,
                                         int64_t max_seqlen_k, bool causal, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, bool /*deterministic: the backward's, kept for autograd*/,
    bool force_sm80, bool /*force_sm80_backward: the backward's, kept for autograd*/) {
  const char* op = "cuda_attention_fwd";
  check_cuda(op, "q", q);
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionInputs in = attention_inputs(op, q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, causal, scale, window_left, window_right, bottom_right, softcap);
  const auto float_options = q.options().dtype(at::kFloat);
  // Packed tokens past cu_seqlens_q[-1] belong to no sequence: zeros and -inf, not garbage.
  Tensor out = in.packed ? at::zeros(q.sizes(), q.options()) : at::empty(q.sizes(), q.options());
  Tensor lse = in.packed ? at::full({q.size(1), q.size(0)}, -INFINITY, float_options)
                         : at::empty({q.size(0), q.size(1), q.size(2)}, float_options);
  if (q.numel() == 0) return {out, lse};
  AttentionForwardArgs args{};
  args.problem = in.problem;
  args.out = out.data_ptr();
  args.out_strides = attention_strides(out, in.packed);
  args.lse = lse.data_ptr<float>();
  args.lse_strides = lse_strides(lse, in.packed);
  args.force_sm80 = force_sm80;
  check_launch(launch_attention_forward(kernel_dtype(op, "q", in.q), args, current_stream()), op);
  return {out, lse};
}

// Which forward (backward) kernels run for q's dtype, head dim and device, and the pass's
// force_sm80: "sm90a" or "sm80: <reason>".
std::string attention_fwd_path(const Tensor& q, bool force_sm80) {
  check_cuda("cuda_attention_fwd_path", "q", q);
  return attention_forward_path_name(kernel_dtype("cuda_attention_fwd_path", "q", q), static_cast<int>(q.size(-1)),
                                     q.get_device(), force_sm80);
}
std::string attention_bwd_path(const Tensor& q, bool force_sm80) {
  check_cuda("cuda_attention_bwd_path", "q", q);
  return attention_backward_path_name(kernel_dtype("cuda_attention_bwd_path", "q", q), static_cast<int>(q.size(-1)),
                                      q.get_device(), force_sm80);
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& out, const Tensor& lse,
                                                 const OptionalTensor& key_padding_mask,
                                                 const OptionalTensor& cu_seqlens_q,
                                                 const OptionalTensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                 int64_t max_seqlen_k, bool causal, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, bool deterministic, bool force_sm80) {
  const char* op = "cuda_attention_bwd";
  check_cuda(op, "q", q);
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionInputs in = attention_inputs(op, q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, causal, scale, window_left, window_right, bottom_right, softcap);
  auto check_like_q = [&](const char* name, const Tensor& t) {
    check_cuda(op, name, t);
    TORCH_CHECK(t.device() == q.device() && t.scalar_type() == q.scalar_type() && t.sizes() == q.sizes(), op,
                ": argument '", name, "' must match q in device, dtype and shape, got ", t.device(), ", ",
                t.scalar_type(), " and ", t.sizes(), " for q's ", q.device(), ", ", q.scalar_type(), " and ",
                q.sizes());
  };
  check_like_q("grad_out", grad_out);
  check_like_q("out", out);
  // grad_out may be expanded (stride 0, from out.sum().backward()): copied once then.
  const Tensor dout = kernel_rows(grad_out);
  const Tensor out_rows = kernel_rows(out);
  const std::vector<int64_t> lse_shape =
      in.packed ? std::vector<int64_t>{q.size(1), q.size(0)} : std::vector<int64_t>{q.size(0), q.size(1), q.size(2)};
  check_cuda(op, "lse", lse);
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.sizes() == lse_shape, op,
              ": argument 'lse' must be a Float (float32) tensor of shape ", at::IntArrayRef(lse_shape),
              " on q's device, got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  // Packed tokens outside every sequence get zero gradients.
  auto alloc = [&](const Tensor& like) {
    return in.packed ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  Tensor dq = alloc(q), dk = alloc(k), dv = alloc(v);
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  Tensor delta = at::empty(lse_shape, lse.options());
  AttentionBackwardArgs args{};
  args.problem = in.problem;
  args.out = out_rows.data_ptr();
  args.out_strides = attention_strides(out_rows, in.packed);
  args.dout = dout.data_ptr();
  args.dout_strides = attention_strides(dout, in.packed);
  const Tensor lse_contiguous = lse.contiguous();
  args.lse = lse_contiguous.data_ptr<float>();
  args.delta = delta.data_ptr<float>();
  args.lse_strides = lse_strides(delta, in.packed);  // lse_contiguous and delta share the layout
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  args.dq_strides = attention_strides(dq, in.packed);
  args.dk_strides = attention_strides(dk, in.packed);
  args.dv_strides = attention_strides(dv, in.packed);
  // The dK/dV block shape this device's shared memory allows, then, for grouped-query attention
  // on few SMs, dK/dV per query head in float32, summed per group.
  int sm_count = 0;
  check_launch(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, q.get_device()), op);
  args.key_grad_wide = attention_key_grad_wide(in.problem.head_dim, in.smem_optin);
  args.force_sm80 = force_sm80;
  Tensor dk_partial, dv_partial;
  if (attention_backward_expands(in.problem, in.packed ? k.size(0) : k.size(0) * k.size(2), sm_count,
                                 args.key_grad_wide)) {
    std::vector<int64_t> partial_shape = k.sizes().vec();
    partial_shape[1] = q.size(1);
    dk_partial = at::empty(partial_shape, lse.options());
    dv_partial = at::empty(partial_shape, lse.options());
    args.dk_partial = dk_partial.data_ptr<float>();
    args.dv_partial = dv_partial.data_ptr<float>();
    args.partial_strides = attention_strides(dk_partial, in.packed);
  }
  // The sm_90a backward adds dQ in one pass with float32 atomics into a zeroed workspace unless
  // the caller asks for bitwise reproducible gradients (then its deterministic two passes).
  const DType dtype = kernel_dtype(op, "q", in.q);
  Tensor dq_accum;
  if (!deterministic && attention_sm90_backward_path(dtype, args, nullptr) == AttentionPath::kSm90a) {
    dq_accum = at::zeros(q.sizes(), lse.options());
    args.dq_accum = dq_accum.data_ptr<float>();
    args.dq_accum_strides = attention_strides(dq_accum, in.packed);
  }
  check_launch(launch_attention_backward(dtype, args, current_stream()), op);
  return {dq, dk, dv};
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
  m.def("cuda_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens_q, "
        "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
        "int window_left=-1, int window_right=-1, bool bottom_right=False, float softcap=0.0, "
        "bool deterministic=False, bool force_sm80=False, bool force_sm80_backward=False) -> (Tensor out, Tensor lse)");
  // force_sm80: the sm_80 kernels even on sm_90 (the "cuda:sm80" variant). The forward ignores
  // deterministic and force_sm80_backward: they are inputs only so that autograd hands them to
  // cuda_attention_bwd.
  m.def("cuda_attention_fwd_path(Tensor q, bool force_sm80=False) -> str");
  m.def("cuda_attention_bwd_path(Tensor q, bool force_sm80=False) -> str");
  // No tensors: a catch-all kernel, so the CPU tests can ask it which dK/dV shape a device gets.
  m.def("cuda_attention_key_grad_wide(int head_dim, int smem_optin_bytes) -> bool",
        [](int64_t head_dim, int64_t smem_optin_bytes) {
          return tformer::attention_key_grad_wide(static_cast<int>(head_dim), static_cast<int>(smem_optin_bytes));
        });
  m.def("cuda_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
        "bool causal, float scale, int window_left=-1, int window_right=-1, bool bottom_right=False, "
        "float softcap=0.0, bool deterministic=False, bool force_sm80=False) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(tformer, CUDA, m) {
  m.impl("cuda_layer_norm_fwd", &tformer::layer_norm_fwd);
  m.impl("cuda_layer_norm_bwd", &tformer::layer_norm_bwd);
  m.impl("cuda_rms_norm_fwd", &tformer::rms_norm_fwd);
  m.impl("cuda_rms_norm_bwd", &tformer::rms_norm_bwd);
  m.impl("cuda_softmax_fwd", &tformer::softmax_fwd);
  m.impl("cuda_softmax_bwd", &tformer::softmax_bwd);
  m.impl("cuda_attention_fwd", &tformer::attention_fwd);
  m.impl("cuda_attention_fwd_path", &tformer::attention_fwd_path);
  m.impl("cuda_attention_bwd_path", &tformer::attention_bwd_path);
  m.impl("cuda_attention_bwd", &tformer::attention_bwd);
}
