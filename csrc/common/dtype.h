// The element types the kernels are instantiated for. Torch-free, so the kernel
// translation units and the C++ test build without torch headers.
#pragma once

namespace tformer {

enum class DType { kFloat32, kFloat16, kBFloat16 };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace tformer
