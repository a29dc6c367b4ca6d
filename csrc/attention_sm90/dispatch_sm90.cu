// Host side of the sm_90a attention kernels: whether a forward or backward runs on them
// (device, build, dtype, head dim, layout, and the caller's force_sm80: the registry's
// "cuda:sm80" variant), the TMA tensor maps, and the launches. Sliding windows, bottom-right
// alignment and soft-capping run on the sm_90a kernels' banded variants (run_forward and
// run_backward pick them from the problem), so they are no reason to leave sm_90a.
// TFORMER_ATTENTION_SM90A is defined by setup.py when it compiles for sm_90a.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <mutex>
#include <set>
#include <string>

#include "attention/launch_templates.h"
#include "attention_sm90/attention_sm90.h"

namespace tformer {

namespace {

#if defined(TFORMER_ATTENTION_SM90A)
constexpr bool kCompiled = true;
#else
constexpr bool kCompiled = false;
#endif

// Reasons that hold for every tensor layout; "" when the sm_90a kernels may run.
std::string general_reason(DType dtype, int head_dim, int device, bool force_sm80) {
  if (force_sm80) return "force_sm80 was passed (backend 'cuda:sm80')";
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return "the device's compute capability could not be read";
  }
  if (major != 9 || minor != 0) {
    return "the device is sm_" + std::to_string(major) + std::to_string(minor) + " (the sm_90a kernels need sm_90)";
  }
  if (!kCompiled) return "tformer._C was built without sm_90a (TORCH_CUDA_ARCH_LIST has no 9.0)";
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return "the dtype is not fp16 or bf16";
  bool head_dim_ok = false;
  for (int d : kAttentionSm90HeadDims) head_dim_ok = head_dim_ok || d == head_dim;
  if (!head_dim_ok) return "head dim " + std::to_string(head_dim) + " (the sm_90a kernels take 64 and 128)";
  return "";
}

// TMA wants 16-byte aligned bases and strides that are positive multiples of 16 bytes; a dim
// of extent 1 is never stepped over (make_tile_map gives it a valid stride of its own).
bool tma_layout_ok(const void* base, const Strides3& s, int64_t tokens, int heads, int seqs) {
  const auto ok = [](int64_t stride, int64_t extent) { return extent <= 1 || (stride > 0 && stride % 8 == 0); };
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && ok(s.token, tokens) && ok(s.head, heads) && ok(s.seq, seqs);
}

std::string layout_reason(const AttentionProblem& p) {
  if (p.q_tokens <= 0 || p.k_tokens <= 0) return "q or k has no tokens";
  const int seqs = p.cu_seqlens_q != nullptr ? 1 : p.num_seqs, kv_heads = p.num_heads / p.group_size;
  if (!tma_layout_ok(p.q, p.q_strides, p.q_tokens, p.num_heads, seqs) ||
      !tma_layout_ok(p.k, p.k_strides, p.k_tokens, kv_heads, seqs) ||
      !tma_layout_ok(p.v, p.v_strides, p.k_tokens, kv_heads, seqs)) {
    return "q, k or v has a zero or unaligned stride (TMA needs positive multiples of 16 bytes)";
  }
  return "";
}

void log_once(const char* pass, const std::string& message) {
  static std::mutex mutex;
  static std::set<std::string> logged;
  std::lock_guard<std::mutex> lock(mutex);
  if (logged.insert(std::string(pass) + message).second) {
    std::fprintf(stderr, "tformer: CUDA attention %s: %s\n", pass, message.c_str());
  }
}

std::string current_device_reason(DType dtype, int head_dim, bool force_sm80) {
  int device = 0;
  return cudaGetDevice(&device) == cudaSuccess ? general_reason(dtype, head_dim, device, force_sm80)
                                               : "no current CUDA device";
}

AttentionPath decide(const char* pass, std::string reason, std::string* why_not) {
  if (why_not != nullptr) *why_not = reason;
  log_once(pass, reason.empty() ? "sm_90a kernels (TMA + wgmma, warp-specialized)" : "sm_80 kernels: " + reason);
  return reason.empty() ? AttentionPath::kSm90a : AttentionPath::kSm80;
}

std::string path_name(DType dtype, int head_dim, int device, bool force_sm80) {
  const std::string reason = general_reason(dtype, head_dim, device, force_sm80);
  return reason.empty() ? "sm90a" : "sm80: " + reason;
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver through the runtime, so tformer._C does not link libcuda.
EncodeTiled encode_tiled() {
  static EncodeTiled function = [] {
    void* pointer = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &pointer, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      pointer = nullptr;
    }
    return reinterpret_cast<EncodeTiled>(pointer);
  }();
  return function;
}

}  // namespace

namespace attention_sm90 {

cudaError_t make_tile_map(CUtensorMap* map, DType dtype, const void* base, const Strides3& strides, int64_t tokens,
                          int heads, int seqs, int head_dim, int box_rows) {
  EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  constexpr int64_t kBytes = kElementBytes;
  // A dim of extent 1 is never stepped over; any valid stride will do (one row's bytes).
  const auto stride = [&](int64_t elements, int64_t extent) { return (extent > 1 ? elements : head_dim) * kBytes; };
  const int64_t token_stride = stride(strides.token, tokens);
  const int64_t head_stride = stride(strides.head, heads);
  const int64_t seq_stride = stride(strides.seq, seqs);
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(tokens),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(seqs)};
  const cuuint64_t byte_strides[3] = {static_cast<cuuint64_t>(token_stride), static_cast<cuuint64_t>(head_stride),
                                      static_cast<cuuint64_t>(seq_stride)};
  const cuuint32_t box[4] = {kBoxColumns, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(
      map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      const_cast<void*>(base), dims, byte_strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace attention_sm90

AttentionPath attention_sm90_forward_path(DType dtype, const AttentionForwardArgs& args, std::string* why_not) {
  std::string reason = current_device_reason(dtype, args.problem.head_dim, args.force_sm80);
  if (reason.empty()) reason = layout_reason(args.problem);
  // forward_sm90.cuh's online_softmax takes the max of the raw scores and scales it once a row.
  if (reason.empty() && !(args.problem.scale > 0.f)) reason = "scale <= 0 (the sm_90a softmax scales the max of raw scores)";
  // forward_sm90.cuh's store_output writes 16-byte chunks of each output row.
  const Strides3& o = args.out_strides;
  if (reason.empty() && (reinterpret_cast<uintptr_t>(args.out) % 16 != 0 || o.token % 8 != 0 || o.head % 8 != 0 ||
                         o.seq % 8 != 0)) {
    reason = "out is not 16-byte aligned row by row (the sm_90a epilogue stores 16-byte chunks)";
  }
  return decide("forward", reason, why_not);
}

AttentionPath attention_sm90_backward_path(DType dtype, const AttentionBackwardArgs& args, std::string* why_not) {
  const AttentionProblem& p = args.problem;
  std::string reason = current_device_reason(dtype, p.head_dim, args.force_sm80);
  if (reason.empty()) reason = layout_reason(p);
  if (reason.empty() &&
      !tma_layout_ok(args.dout, args.dout_strides, p.q_tokens, p.num_heads, p.cu_seqlens_q != nullptr ? 1 : p.num_seqs)) {
    reason = "grad_out has a zero or unaligned stride (TMA needs positive multiples of 16 bytes)";
  }
  if (reason.empty() && args.dk_partial != nullptr) {
    reason = "grouped-query attention on few SMs takes the expanded dK/dV pass (per query head)";
  }
  return decide("backward", reason, why_not);
}

std::string attention_forward_path_name(DType dtype, int head_dim, int device, bool force_sm80) {
  return path_name(dtype, head_dim, device, force_sm80);
}
std::string attention_backward_path_name(DType dtype, int head_dim, int device, bool force_sm80) {
  return path_name(dtype, head_dim, device, force_sm80);
}

namespace {

// Functors rather than templated lambdas, as attention_dispatch.cu (CMake builds CUDA as C++17).
struct Forward {
  const AttentionForwardArgs& args;
  template <typename T, int kD> cudaError_t run(DType dtype, cudaStream_t stream) const {
    return attention_sm90::run_forward<T, kD>(args, dtype, stream);
  }
};
struct Backward {
  const AttentionBackwardArgs& args;
  template <typename T, int kD> cudaError_t run(DType dtype, cudaStream_t stream) const {
    // delta = rowsum(dO * O) is the sm_80 backward's first step, shared.
    const cudaError_t delta = attention::run_delta<T>(args, stream);
    return delta != cudaSuccess ? delta : attention_sm90::run_backward<T, kD>(args, dtype, stream);
  }
};

template <typename T, typename Pass> cudaError_t by_head_dim(int head_dim, const Pass& pass, DType dtype, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return pass.template run<T, 64>(dtype, stream);
    case 128: return pass.template run<T, 128>(dtype, stream);
    default: return cudaErrorInvalidValue;  // attention_sm90_{forward,backward}_path refuse these first
  }
}

template <typename Pass> cudaError_t by_dtype(int head_dim, const Pass& pass, DType dtype, cudaStream_t stream) {
  return dtype == DType::kBFloat16 ? by_head_dim<__nv_bfloat16>(head_dim, pass, dtype, stream)
                                   : by_head_dim<__half>(head_dim, pass, dtype, stream);
}

}  // namespace

cudaError_t launch_attention_forward_sm90(DType dtype, const AttentionForwardArgs& args, cudaStream_t stream) {
  return by_dtype(args.problem.head_dim, Forward{args}, dtype, stream);
}

cudaError_t launch_attention_backward_sm90(DType dtype, const AttentionBackwardArgs& args, cudaStream_t stream) {
  return by_dtype(args.problem.head_dim, Backward{args}, dtype, stream);
}

}  // namespace tformer
