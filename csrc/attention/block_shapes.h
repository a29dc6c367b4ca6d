// Block shapes of the attention kernels per head-dim bucket, and the shared memory they take.
// Host and device code both read them (launch sizes, smem opt-in, the bindings' checks).
//
// The shapes keep every pass within 227 KiB (sm90) and 163 KiB (sm80) of shared memory and
// keep the fp32 accumulators of a warp (16 rows x kD, i.e. kD / 2 floats a lane per
// accumulator) in registers where possible: the larger head dims take fewer keys per step.
#pragma once

namespace tformer {
namespace attention {

template <int kD> struct ForwardShape {
  static constexpr int kBlockM = 64;               // query rows per block, 16 per warp
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;  // keys per step, double buffered
  // Q tile + 2 K tiles + 2 V tiles, 2-byte elements, padded rows.
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * (kD + 8) * 2;
};

// dK/dV pass: one block per kBlockN keys (16 per warp), stepping over kBlockM query rows.
// At kD = 256 the dK and dV accumulators alone (kD floats a lane) would not fit the 255
// registers of a thread: kColumnSplit blocks then share a key block, each accumulating
// kD / kColumnSplit columns of dK and dV (recomputing P and dP, which need all kD).
template <int kD> struct KeyGradShape {
  static constexpr int kBlockN = 64;
  static constexpr int kBlockM = kD <= 64 ? 64 : 32;
  static constexpr int kColumnSplit = kD > 128 ? 2 : 1;
  static constexpr int kColumns = kD / kColumnSplit;
  // K, V tiles + Q, dO tiles + lse and delta of kBlockM rows.
  static constexpr int kSmemBytes = (2 * kBlockN + 2 * kBlockM) * (kD + 8) * 2 + 2 * kBlockM * 4;
};

// dQ pass: one block per kBlockM query rows (16 per warp), stepping over kBlockN keys.
template <int kD> struct QueryGradShape {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = kD <= 64 ? 64 : 32;
  // Q, dO tiles + 2 K tiles + 2 V tiles (double buffered).
  static constexpr int kSmemBytes = (2 * kBlockM + 4 * kBlockN) * (kD + 8) * 2;
};

}  // namespace attention
}  // namespace tformer
