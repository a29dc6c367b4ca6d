// Inline-PTX wrappers for the sm80+ tensor-core path: mma.sync m16n8k16 (fp16/bf16 inputs,
// fp32 accumulation), ldmatrix and cp.async. Fragment layouts are those of the PTX ISA,
// "Matrix Fragments for mma.m16n8k16"; with g = lane / 4 and t = lane % 4:
//   A (16x16, row-major), 4 regs of 2 elements: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..),
//       a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, "col"), 2 regs: b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8..2t+9, n = g)
//   C/D (16x8 fp32), 4 floats: c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// The two halves of a 32-bit register hold the lower column (or k) index in the low half.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/convert.cuh"

namespace tformer {
namespace attention {

// d = a * b + d.
template <typename T> __device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4],
                                                                  uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                                uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                                       uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register
// i receives matrix i with lane holding (row lane / 4, columns 2 (lane % 4) .. +1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address)));
}

// The same, transposed: lane holds (rows 2 (lane % 4) .. +1, column lane / 4) of each matrix.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address)));
}

// 16 bytes global -> shared, asynchronously; when !valid the 16 shared bytes are zero-filled
// and nothing is read (src-size 0).
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` committed groups are still in flight (this thread's).
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

}  // namespace attention
}  // namespace tformer
