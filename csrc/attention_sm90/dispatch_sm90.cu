// Host side of the sm_90a attention forward: whether a forward runs on it (device, build,
// dtype, head dim, layout, the TFORMER_ATTENTION_FORCE_SM80 override), the TMA tensor maps, and
// the launch. TFORMER_ATTENTION_SM90A is defined by setup.py when it compiles for sm_90a.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

#include "attention_sm90/attention_sm90.h"

namespace tformer {

namespace {

#if defined(TFORMER_ATTENTION_SM90A)
constexpr bool kCompiled = true;
#else
constexpr bool kCompiled = false;
#endif

bool forced_sm80() {
  const char* value = std::getenv(kForceSm80Variable);
  return value != nullptr && value[0] != '\0' && std::string(value) != "0";
}

// Reasons that hold for every tensor layout; "" when the sm_90a forward may run.
std::string general_reason(DType dtype, int head_dim, int device) {
  if (forced_sm80()) return std::string(kForceSm80Variable) + " is set";
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

std::string layout_reason(const AttentionForwardArgs& args) {
  const AttentionProblem& p = args.problem;
  if (p.q_tokens <= 0 || p.k_tokens <= 0) return "q or k has no tokens";
  const int seqs = p.cu_seqlens_q != nullptr ? 1 : p.num_seqs, kv_heads = p.num_heads / p.group_size;
  if (!tma_layout_ok(p.q, p.q_strides, p.q_tokens, p.num_heads, seqs) ||
      !tma_layout_ok(p.k, p.k_strides, p.k_tokens, kv_heads, seqs) ||
      !tma_layout_ok(p.v, p.v_strides, p.k_tokens, kv_heads, seqs)) {
    return "q, k or v has a zero or unaligned stride (TMA needs positive multiples of 16 bytes)";
  }
  return "";
}

void log_once(const std::string& message) {
  static std::mutex mutex;
  static std::set<std::string> logged;
  std::lock_guard<std::mutex> lock(mutex);
  if (logged.insert(message).second) std::fprintf(stderr, "tformer: CUDA attention forward: %s\n", message.c_str());
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
                          int heads, int seqs, int head_dim) {
  EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  constexpr int64_t kBytes = 2;
  // A dim of extent 1 is never stepped over; any valid stride will do (one row's bytes).
  const auto stride = [&](int64_t elements, int64_t extent) { return (extent > 1 ? elements : head_dim) * kBytes; };
  const int64_t token_stride = stride(strides.token, tokens);
  const int64_t head_stride = stride(strides.head, heads);
  const int64_t seq_stride = stride(strides.seq, seqs);
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(tokens),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(seqs)};
  const cuuint64_t byte_strides[3] = {static_cast<cuuint64_t>(token_stride), static_cast<cuuint64_t>(head_stride),
                                      static_cast<cuuint64_t>(seq_stride)};
  const cuuint32_t box[4] = {kBoxColumns, kBoxRows, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(
      map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      const_cast<void*>(base), dims, byte_strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace attention_sm90

AttentionPath attention_sm90_forward_path(DType dtype, const AttentionForwardArgs& args, std::string* why_not) {
  int device = 0;
  std::string reason = cudaGetDevice(&device) == cudaSuccess ? general_reason(dtype, args.problem.head_dim, device)
                                                             : "no current CUDA device";
  if (reason.empty()) reason = layout_reason(args);
  if (why_not != nullptr) *why_not = reason;
  log_once(reason.empty() ? "sm_90a kernels (TMA + wgmma, warp-specialized)" : "sm_80 kernels: " + reason);
  return reason.empty() ? AttentionPath::kSm90a : AttentionPath::kSm80;
}

std::string attention_forward_path_name(DType dtype, int head_dim, int device) {
  const std::string reason = general_reason(dtype, head_dim, device);
  return reason.empty() ? "sm90a" : "sm80: " + reason;
}

cudaError_t launch_attention_forward_sm90(DType dtype, const AttentionForwardArgs& args, cudaStream_t stream) {
  const bool bf16 = dtype == DType::kBFloat16;
  switch (args.problem.head_dim) {
    case 64:
      return bf16 ? attention_sm90::run_forward<__nv_bfloat16, 64>(args, dtype, stream)
                  : attention_sm90::run_forward<__half, 64>(args, dtype, stream);
    case 128:
      return bf16 ? attention_sm90::run_forward<__nv_bfloat16, 128>(args, dtype, stream)
                  : attention_sm90::run_forward<__half, 128>(args, dtype, stream);
    default: return cudaErrorInvalidValue;  // attention_sm90_forward_path refuses these first
  }
}

}  // namespace tformer
