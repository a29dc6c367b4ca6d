// Hopper (sm_90a) building blocks in inline PTX: mbarriers, TMA tile loads, wgmma fences and
// shared-memory matrix descriptors, register reallocation. Each wrapper is one PTX instruction
// (PTX ISA 8.0); the comments say what the kernel relies on.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: nothing here calls the driver)
#include <cuda_runtime.h>

#include <cstdint>

#include "attention_sm90/contracts.h"

namespace tformer {
namespace attention_sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// ---- mbarrier (a 64-bit shared-memory object with a phase bit) ---------------------------
__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(barrier)), "r"(arrivals) : "memory");
}

// Makes the initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` of TMA traffic the phase must wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(barrier)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(barrier)) : "memory");
}

// Blocks until the phase with parity `parity` has completed. A fresh barrier is in phase 0,
// so waiting for parity 1 returns at once (the producer's first pass over empty slots).
__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  const uint32_t address = smem_u32(barrier);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
  } while (!done);
}

// ---- TMA -----------------------------------------------------------------------------------
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Copies the box at (c0, c1, c2, c3) of a 4-d tensor map into shared memory (laid out and
// swizzled as the map says), completing `bytes` of the barrier's transaction count.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* barrier, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(barrier)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// Orders this thread's shared-memory accesses through the async proxy (TMA, wgmma operand
// reads) with its generic ones, both ways: before reusing a tile that wgmma read.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- wgmma ---------------------------------------------------------------------------------
// Orders this thread's register writes (accumulators, A fragments) before the next wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving an accumulator across an asynchronous wgmma.
template <int kN> __device__ __forceinline__ void fence_registers(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Shared-memory matrix descriptor for a 128-byte-swizzled operand (PTX ISA "Matrix
// Descriptor Format"): start address, leading and stride byte offsets (all >> 4), swizzle
// mode 1 = 128B in bits 62-63. Base offset 0: every tile starts 1024-byte aligned, the
// period of the swizzle, so the pattern TMA wrote is the pattern wgmma reads.
//   K-major (rows of 64 K-elements, 128 B apart): stride = 1024 B between 8-row groups;
//     the leading offset is unused.
//   MN-major (rows of 64 MN-elements, one row per K index): leading = bytes between
//     64-element MN panels, stride = 1024 B between groups of 8 K rows.
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address, uint32_t leading_bytes, uint32_t stride_bytes) {
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((address & 0x3FFFF) >> 4);
  desc |= static_cast<uint64_t>((leading_bytes & 0x3FFFF) >> 4) << kDescriptorLeadingShift;
  desc |= static_cast<uint64_t>((stride_bytes & 0x3FFFF) >> 4) << kDescriptorStrideShift;
  desc |= static_cast<uint64_t>(kDescriptorSwizzle128B) << kDescriptorSwizzleShift;
  return desc;
}

// ---- math ----------------------------------------------------------------------------------
// 2^x on the SFU (one MUFU.EX2), subnormal results flushed to 0. exp2f wraps the same
// instruction in a subnormal-range fix-up (FSETP + 2 FMUL an element), which is a third of the
// softmax's issue slots; P is rounded to 16 bits and summed in float32, where anything below
// 2^-126 of the row's maximum is 0 either way. ex2(-inf) = +0.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// tanh(x) = 1 - 2 / (2^(2 x log2 e) + 1) on the MUFU unit (ex2 and rcp, approximate, 2^-22
// relative each): absolute error about 1e-7, saturating to +-1 without a branch (2^large = inf,
// rcp(inf) = 0). The soft-cap of the banded kernels. Not tanh.approx.f32 (FA3's fast_tanh): its
// 2^-11 relative error times a cap of 30-50 moves a logit by 0.01-0.02, past the fp16
// tolerance of the lse against float64; not libdevice's tanhf: about 20 instructions and a
// branch inside the wgmma windows.
__device__ __forceinline__ float tanh_fast(float x) {
  const float e = exp2_ftz(x * (2.f * 1.4426950408889634f));
  float inverse;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(inverse) : "f"(e + 1.f));
  return fmaf(-2.f, inverse, 1.f);
}

// ---- named barriers (bar.sync / bar.arrive on ids 1..15; 0 is __syncthreads) -------------
// Ids are immediates: ptxas reserves barriers up to the highest id it can see, and an id in a
// register reserves all 16 (tests/test_cuda_attention_sm90_sass.py checks the count). `second` picks kFirst + 1 over kFirst by predicate, not by
// branch (a branch between wgmma issue and wait makes ptxas serialize every wgmma).
template <int kFirst, int kThreads> __device__ __forceinline__ void named_barrier_sync_one_of_two(bool second) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %0, 0;\n@!p bar.sync %1, %2;\n@p bar.sync %3, %2;\n}\n" ::"r"(
                   static_cast<uint32_t>(second)),
               "n"(kFirst), "n"(kThreads), "n"(kFirst + 1)
               : "memory");
}
template <int kFirst, int kThreads> __device__ __forceinline__ void named_barrier_arrive_one_of_two(bool second) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %0, 0;\n@!p bar.arrive %1, %2;\n@p bar.arrive %3, %2;\n}\n" ::"r"(
                   static_cast<uint32_t>(second)),
               "n"(kFirst), "n"(kThreads), "n"(kFirst + 1)
               : "memory");
}

// ---- registers -----------------------------------------------------------------------------
// Warp-specialized register budgets (all warps of a warpgroup execute it together).
template <int kRegisters> __device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters> __device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace attention_sm90
}  // namespace tformer
