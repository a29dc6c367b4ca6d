// The numbers the sm_90a attention kernels' hardware contracts rest on: the TMA box and its
// 128-byte swizzle, the wgmma matrix descriptors, the warp-specialized register budget, the
// pipelines' stages and barriers, and Hopper's limits. The kernels (forward_sm90.cuh,
// backward_sm90.cuh, products.cuh) compute every address, descriptor and barrier from these,
// and the CPU emulators (tests/sm90_layout_model.py, tests/sm90_schedule_model.py) read this
// file to check the same numbers: the swizzled element each wgmma fetches, and the barrier
// schedule. So each value is one line `constexpr int kName = expression;` over integer
// literals and earlier names (+ - * / % << and parentheses): the tests parse it.
#pragma once

namespace tformer {
namespace attention_sm90 {

// ---- TMA boxes and the 128-byte swizzle ---------------------------------------------------
constexpr int kElementBytes = 2;                          // fp16 / bf16
constexpr int kSwizzleBytes = 128;                        // CU_TENSOR_MAP_SWIZZLE_128B: a box row
constexpr int kSwizzleAtomBytes = 8 * kSwizzleBytes;      // 8 rows: the pattern's period (1024 B)
constexpr int kBoxColumns = kSwizzleBytes / kElementBytes;  // 64 elements a box row
constexpr int kBoxRows = 128;                             // = the forward's query and key block
constexpr int kPanelColumns = kBoxColumns;                // a tile is head_dim / 64 such panels

// ---- wgmma and its shared-memory matrix descriptors (PTX ISA "Matrix Descriptor Format") ---
constexpr int kWgmmaM = 64;                               // rows of one warpgroup's product
constexpr int kWgmmaK = 16;                               // K of one wgmma (16-bit types)
constexpr int kDescriptorSwizzle128B = 1;                 // layout type, bits 62-63
constexpr int kDescriptorSwizzleShift = 62;
constexpr int kDescriptorLeadingShift = 16;               // bits 16-29: leading byte offset >> 4
constexpr int kDescriptorStrideShift = 32;                // bits 32-45: stride byte offset >> 4
constexpr int kDescriptorFieldLimit = 1 << 18;            // 14 bits of 16-byte units
// K-major operands (S = Q K^T and the backward's score products): rows of 64 K-elements, 128 B
// apart; a k-step moves the start 32 B along the row (the hardware swizzles the final address),
// 4 k-steps a panel; 8-row groups are one swizzle atom apart. The leading offset is unused by
// swizzled K-major layouts (1, in 16-byte units, by convention).
constexpr int kKMajorLeadingBytes = 16;
constexpr int kKMajorStrideBytes = kSwizzleAtomBytes;
constexpr int kKStepBytes = kWgmmaK * kElementBytes;      // 32
constexpr int kKStepsPerPanel = kBoxColumns / kWgmmaK;    // 4
// MN-major B (O += P V and the backward's register-A products): one 128-byte row per K index,
// 64-element MN panels a panel apart (the leading offset, given per tile), 8-row K groups one
// atom apart; a k-step is 16 rows.
constexpr int kMNMajorStrideBytes = kSwizzleAtomBytes;
constexpr int kMNStepBytes = kWgmmaK * kSwizzleBytes;     // 2048
// A consumer warpgroup's 64 rows of a 128-row panel start 64 rows in: still atom-aligned.
constexpr int kConsumerRowBytes = kWgmmaM * kSwizzleBytes;  // 8192

// ---- warp specialization: one producer warpgroup, two consumers, setmaxnreg ----------------
constexpr int kWarpgroupThreads = 128;
constexpr int kConsumers = 2;
constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;  // 384
constexpr int kRegisterFile = 65536;                      // 32-bit registers an SM (one block)
constexpr int kRegistersAtEntry = kRegisterFile / kThreads / 8 * 8;  // 168: __launch_bounds__(384, 1)
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;
// The banded backward (a sliding window, bottom-right alignment or a soft-cap: band.h) takes
// FA3's split: with the band's bounds the two-pass dK/dV consumers spill at 232 (head dim 128),
// and its producers fit in 24.
constexpr int kBandedProducerRegisters = 24;
constexpr int kBandedConsumerRegisters = 240;
// Pingpong: named barrier kPingpongBarrier + c means "consumer c may issue" (0 is __syncthreads).
constexpr int kPingpongBarrier = 1;
// The epilogue: kEpilogueBarrier + c syncs consumer c's warpgroup between staging O in shared
// memory and storing it in kChunkBytes pieces.
constexpr int kEpilogueBarrier = kPingpongBarrier + kConsumers;
constexpr int kChunkBytes = 16;
constexpr int kNamedBarriers = 16;

// ---- forward pipeline (forward_sm90.cuh) ---------------------------------------------------
constexpr int kForwardStages = 3;  // 3 x (K + V) + Q = 224 KiB at head dim 128: fits
// The persistent forward runs several query tiles a block; with two Q buffers the next tile's Q
// lands while this tile's last steps and epilogue run. Shape<kD>::kQBuffers (forward_sm90.cuh;
// forward_q_buffers in tests/sm90_layout_model.py): two where Q x 2 + kForwardStages x (K + V)
// fit in shared memory (head dim 64), else one (head dim 128: the next Q waits until both
// consumers stored O out of the only one).
constexpr int kForwardQBuffers = 2;  // the most; the barrier bytes are sized for it
// Per Q buffer q_full, q_empty; per slot k_full, v_full, k_empty, v_empty (K is released as soon
// as S = Q K^T has completed, V after O += P V: the producer refills K a whole step earlier).
constexpr int kForwardBarriers = 2 * kForwardQBuffers + 4 * kForwardStages;
constexpr int kForwardBarrierBytes = 8 * kForwardBarriers;
// The persistent forward (tile_scheduler.h): K and V of the heads a section of the tile order
// covers stay within this much of H100's 50 MB L2 (the rest holds Q, O and other traffic).
constexpr int kL2SectionBytes = 32 << 20;

// ---- backward pipelines (backward_sm90.cuh) ------------------------------------------------
constexpr int kGradBlock = 128;                           // rows a block owns (keys or queries)
constexpr int kGradStages = 2;
constexpr int kGradStepSmallHeadDim = 64;                 // grad_step: 128-row steps up to this head dim,
constexpr int kGradStepSmall = 128;
constexpr int kGradStepLarge = 64;                        // 64-row steps above it
constexpr int kGradBarriers = 1 + 2 * kGradStages;        // block full; per slot full, empty
// One-pass backward (dQ by atomics): each consumer stages dS^T (its 64 keys x a step's queries)
// in 64-query panels of 64 key rows x 128 bytes, swizzled as TMA would write them, and syncs
// its own warpgroup on named barrier kGradStageBarrier + consumer before it overwrites them (the
// previous dQ product is done in every warp) and before dQ = dS K reads them.
constexpr int kGradStagePanelBytes = kWgmmaM * kSwizzleBytes;  // 8192
constexpr int kGradStageBarrier = kPingpongBarrier;
constexpr int kGradBarrierBytes = 8 * kGradBarriers;

// ---- Hopper's limits -------------------------------------------------------------------------
constexpr int kMaxSharedBytes = 232448;                   // 227 KiB of dynamic shared memory a block
constexpr int kMaxTransactionBytes = (1 << 20) - 1;       // an mbarrier phase's tx-count

// A kernel that ptxas gives fewer than kRegistersAtEntry registers at entry has a smaller pool
// than the consumers' setmaxnreg.inc asks for, and that instruction spins forever: the SASS test
// checks REG == kRegistersAtEntry for every setmaxnreg kernel.
static_assert(kProducerRegisters * kWarpgroupThreads + kConsumerRegisters * kConsumers * kWarpgroupThreads <=
                  kRegistersAtEntry * kThreads,
              "the consumers claim more registers than the block holds: setmaxnreg.inc would never return");
static_assert(kBandedProducerRegisters * kWarpgroupThreads +
                      kBandedConsumerRegisters * kConsumers * kWarpgroupThreads <=
                  kRegistersAtEntry * kThreads,
              "the banded consumers claim more registers than the block holds");
static_assert(kBandedProducerRegisters % 8 == 0 && kBandedConsumerRegisters % 8 == 0 &&
                  kBandedProducerRegisters >= 24 && kBandedConsumerRegisters <= 256,
              "setmaxnreg takes multiples of 8 in [24, 256]");
static_assert(kProducerRegisters % 8 == 0 && kConsumerRegisters % 8 == 0 && kProducerRegisters >= 24 &&
                  kConsumerRegisters <= 256,
              "setmaxnreg takes multiples of 8 in [24, 256]");
static_assert(kPingpongBarrier >= 1 && kEpilogueBarrier + kConsumers <= kNamedBarriers, "named barrier ids 1..15");
static_assert(kGradStageBarrier >= 1 && kGradStageBarrier + kConsumers <= kNamedBarriers, "named barrier ids 1..15");
static_assert(kSwizzleAtomBytes == 1024 && kBoxColumns * kElementBytes == kSwizzleBytes, "the 128B swizzle");
// cuTensorMapEncodeTiled: a box spans at most 256 elements a dimension, and with SWIZZLE_128B its
// inner dimension at most 128 bytes.
static_assert(kBoxRows <= 256 && kGradBlock <= 256 && kGradStepSmall <= 256 && kGradStepLarge <= 256,
              "TMA box rows <= 256");
static_assert(kBoxColumns * kElementBytes <= kSwizzleBytes, "SWIZZLE_128B: a box row spans <= 128 bytes");

}  // namespace attention_sm90
}  // namespace tformer
