// The two shapes of matrix product every sm_90a attention kernel issues, on 128-byte-swizzled
// tiles as TMA writes them: a tile of R rows x kD is kD / 64 panels of R rows x 128 bytes,
// `panel_bytes` = R x 128 apart (forward_sm90.cuh's opening comment has the layout).
//
//   issue_ss  C (64 x kN) = A (64 x kD) B^T, both from shared memory with the head dim
//             contiguous (K-major): S = Q K^T, dP = dO V^T, and their transposes K Q^T, V dO^T.
//   issue_ss_mn  C (64 x kD) = A (64 x 64) B, both from shared memory MN-major: the one-pass
//             backward's dQ = dS K, A = dS^T as staged (rows keys, queries contiguous), B = K.
//   issue_rs  C (64 x kD) += A (64 x kK) B, A from registers (an earlier product's
//             accumulator, packed by pack_a), B a (kK x kD) tile with the head dim contiguous
//             (MN-major for this product): O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K.
// Each issues its wgmmas and commits them as one group; the caller waits (wgmma_wait).
#pragma once

#include "attention_sm90/hopper.cuh"
#include "attention_sm90/wgmma.cuh"
#include "common/convert.cuh"

namespace tformer {
namespace attention_sm90 {

// The descriptor fields fit their 14-bit (16-byte unit) fields and are multiples of 16.
static_assert(kKMajorStrideBytes % 16 == 0 && kKMajorStrideBytes < kDescriptorFieldLimit, "K-major SBO field");
static_assert(kMNMajorStrideBytes % 16 == 0 && kMNMajorStrideBytes < kDescriptorFieldLimit, "MN-major SBO field");
static_assert(kKMajorLeadingBytes == 16, "swizzled K-major: LBO unused, 1 by convention");
static_assert(kKStepsPerPanel * kKStepBytes == kSwizzleBytes, "k-steps tile one swizzled row");

// K-major operands: a 16-column step inside a 128-byte swizzled row advances the start
// address by 32 bytes (the hardware swizzles the final address), a 64-column step moves to
// the next panel; 8-row groups are 1024 bytes apart.
template <typename T, int kD, int kN>
__device__ __forceinline__ void issue_ss(float (&c)[kN / 2], uint32_t a_address, uint32_t a_panel_bytes,
                                         uint32_t b_address, uint32_t b_panel_bytes) {
  static_assert(kN == 64 || kN == 128, "wgmma N of 64 or 128");
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const uint32_t column_bytes = (kk % kKStepsPerPanel) * kKStepBytes;
    const uint64_t a_desc = smem_descriptor(a_address + (kk / kKStepsPerPanel) * a_panel_bytes + column_bytes,
                                            kKMajorLeadingBytes, kKMajorStrideBytes);
    const uint64_t b_desc = smem_descriptor(b_address + (kk / kKStepsPerPanel) * b_panel_bytes + column_bytes,
                                            kKMajorLeadingBytes, kKMajorStrideBytes);
    if constexpr (kN == 64) {
      Wgmma<T>::ss_n64(c, a_desc, b_desc, kk > 0 ? 1u : 0u);
    } else {
      Wgmma<T>::ss_n128(c, a_desc, b_desc, kk > 0 ? 1u : 0u);
    }
  }
  wgmma_commit();
}

// MN-major B: 64-column panels `b_panel_bytes` apart (the leading offset), 8-row groups 1024
// bytes apart (the stride offset), 16 rows (2 KiB) per wgmma.
template <typename T, int kD, int kK>
__device__ __forceinline__ void issue_rs(float (&c)[kD / 2], const uint32_t (&a)[kK / 16][4], uint32_t b_address,
                                         uint32_t b_panel_bytes) {
  static_assert(kD == 64 || kD == 128, "wgmma N of 64 or 128");
  static_assert(kK % kWgmmaK == 0, "whole k-steps");
#pragma unroll
  for (int t = 0; t < kK / 16; ++t) {
    const uint64_t b_desc = smem_descriptor(b_address + t * kMNStepBytes, b_panel_bytes, kMNMajorStrideBytes);
    if constexpr (kD == 64) {
      Wgmma<T>::rs_n64(c, a[t], b_desc, 1u);
    } else {
      Wgmma<T>::rs_n128(c, a[t], b_desc, 1u);
    }
  }
  wgmma_commit();
}

// Both operands MN-major, 64 K-rows (keys): the MN-major B of issue_rs for both, a k-step is
// 16 rows (2 KiB) of each; A is one 64-element M panel (its leading offset is never stepped
// over, given anyway), B's 64-column panels are `b_panel_bytes` apart. The first k-step
// overwrites C (scale-d = 0), so C needs no zeroing.
template <typename T, int kD>
__device__ __forceinline__ void issue_ss_mn(float (&c)[kD / 2], uint32_t a_address, uint32_t a_panel_bytes,
                                            uint32_t b_address, uint32_t b_panel_bytes) {
  static_assert(kD == 64 || kD == 128, "wgmma N of 64 or 128");
#pragma unroll
  for (int t = 0; t < kWgmmaM / kWgmmaK; ++t) {
    const uint64_t a_desc = smem_descriptor(a_address + t * kMNStepBytes, a_panel_bytes, kMNMajorStrideBytes);
    const uint64_t b_desc = smem_descriptor(b_address + t * kMNStepBytes, b_panel_bytes, kMNMajorStrideBytes);
    if constexpr (kD == 64) {
      Wgmma<T>::ss_tt_n64(c, a_desc, b_desc, t > 0 ? 1u : 0u);
    } else {
      Wgmma<T>::ss_tt_n128(c, a_desc, b_desc, t > 0 ? 1u : 0u);
    }
  }
  wgmma_commit();
}

// An accumulator (64 x kN, float32) as wgmma A fragments of 16 columns each: registers
// {row r0, columns 0-7 | r0 + 8, columns 0-7 | r0, columns 8-15 | r0 + 8, columns 8-15} =
// accumulator chunks 2t and 2t + 1 (for 16-bit types the layouts agree: FA3 3.3).
template <typename T, int kN>
__device__ __forceinline__ void pack_a(const float (&c)[kN / 2], uint32_t (&a)[kN / 16][4]) {
#pragma unroll
  for (int t = 0; t < kN / 16; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[t][i] = pack2<T>(c[8 * t + 2 * i], c[8 * t + 2 * i + 1]);
  }
}

// Keeps the compiler from moving A fragments across an asynchronous wgmma that reads them.
template <int kN> __device__ __forceinline__ void fence_registers(uint32_t (&r)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
  }
}

// Accumulator layout of wgmma m64nN (float32), per thread: element 4 j + 2 r + c is row
// 16 warp + lane / 4 + 8 r of the warpgroup's 64, column 8 j + 2 (lane % 4) + c.
__device__ __forceinline__ int accumulator_row(int lane, int warp, int r) { return 16 * warp + lane / 4 + 8 * r; }
__device__ __forceinline__ int accumulator_column(int lane, int j, int c) { return 8 * j + 2 * (lane % 4) + c; }

}  // namespace attention_sm90
}  // namespace tformer
