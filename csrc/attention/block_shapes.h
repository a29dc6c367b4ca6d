// Block shapes of the attention kernels per head-dim bucket, and the shared memory they take.
// Host and device code both read them (launch sizes, smem opt-in, the bindings' checks).
//
// FlashAttention-2's sm80 shapes where the registers allow: 128-row forward blocks with 32
// query rows a warp (two 16-row mma tiles sharing every K and V fragment) up to head dim 128
// (128 x 64 tiles up to 64, 128 x 32 at 96 and 128), and 128-key dK/dV blocks of 8 warps up
// to head dim 96 (at 128 too where the device's shared memory allows:
// attention_key_grad_wide). A warp's fp32 accumulators take kD / 2 floats a lane per 16-row
// tile, so head dim 256 keeps 16 rows a warp (ptxas: no spills at these shapes; see
// bench/KERNEL_NOTES.md). Every pass stays within 227 KiB (sm90) and 163 KiB (sm80) of shared
// memory; the forward within the 99 KiB of sm86/sm89 too.
#pragma once

namespace tformer {
namespace attention {

// Tiles in shared memory hold kD columns plus 8 of padding per row (tiles.cuh).
template <int kD> constexpr int padded_tile_bytes(int rows) { return rows * (kD + 8) * 2; }

template <int kD> struct ForwardShape {
  static constexpr int kWarps = 4;
  // 16-row mma tiles per warp: two (32 rows a warp, 128-row blocks) up to head dim 128. At 96
  // and 128 the step takes 32 keys: with 64, ptxas (sm_80 and sm_90) spills 28-116 bytes, as
  // FlashAttention-2's own 128 x 64 hd-128 forward does (172 bytes on sm_80). At 256 one tile.
  static constexpr int kRowTiles = kD <= 128 ? 2 : 1;
  static constexpr int kWarpRows = 16 * kRowTiles;
  static constexpr int kBlockM = kWarps * kWarpRows;  // query rows per block: 128, or 64 at 256
  static constexpr int kBlockN = kD <= 64 ? 64 : 32;  // keys per step, double buffered
  // Q tile (reused for the staged output) + 2 K tiles + 2 V tiles.
  static constexpr int kSmemBytes = padded_tile_bytes<kD>(kBlockM + 4 * kBlockN);
};

// dK/dV pass: one block per kBlockN keys (16 per warp), stepping over kBlockM query rows with
// Q and dO double buffered. At kD = 256 the dK and dV accumulators alone (kD floats a lane)
// would not fit the 255 registers of a thread: kColumnSplit blocks then share a key block,
// each accumulating kD / kColumnSplit columns of dK and dV (recomputing P and dP, which need
// all kD).
// kWide: 8 warps and 128 keys a block. Up to kD = 96 always. At kD = 128 it takes 102.5 KiB
// (double-buffered Q and dO), above the 99 KiB of sm86/sm89, so the launch picks it per device
// (attention_key_grad_wide); the default, 4 warps and 64 keys, runs everywhere. kD = 256 is
// never wide (registers).
template <int kD, bool kWide = (kD <= 96)> struct KeyGradShape {
  static_assert(!kWide || kD <= 128, "kD = 256 has no 8-warp dK/dV shape");
  static constexpr int kWarps = kWide ? 8 : 4;
  static constexpr int kBlockN = 16 * kWarps;  // 128 keys when wide, else 64
  static constexpr int kBlockM = kD <= 64 ? 64 : 32;
  static constexpr int kColumnSplit = kD > 128 ? 2 : 1;
  static constexpr int kColumns = kD / kColumnSplit;
  // K, V tiles + two (Q, dO) buffers + two (lse, delta) buffers of kBlockM floats.
  static constexpr int kSmemBytes = padded_tile_bytes<kD>(2 * kBlockN + 4 * kBlockM) + 4 * kBlockM * 4;
};

// dQ pass: one block per kBlockM query rows (16 per warp), stepping over kBlockN keys.
template <int kD> struct QueryGradShape {
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = kD <= 64 ? 64 : 32;
  // Q, dO tiles + 2 K tiles + 2 V tiles (double buffered).
  static constexpr int kSmemBytes = padded_tile_bytes<kD>(2 * kBlockM + 4 * kBlockN);
};

}  // namespace attention
}  // namespace tformer
