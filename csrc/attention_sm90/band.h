// The causal / sliding-window band of one sequence as the sm_90a kernels' banded variants use
// it: which blocks of keys (or queries) a block of queries (or keys) reaches, so blocks outside
// every row's band are skipped, and which visited blocks the band cuts, so only those pay for
// per-element masking. Plain C++ (no CUDA types): the kernels call it on the device, and
// tests/test_sm90_contracts.py compiles this header with the host compiler and compares its
// block ranges and mask decisions with a brute-force mask from
// tformer.ops.attention_mask.allowed_keys (the Python mirror is tests/sm90_band_model.py).
//
// The rule is FlashAttention's window_size (tformer/ops/attention_mask.py, AttentionProblem):
// query i of q_len queries sees key j of k_len keys when
//     i + offset - left <= j <= i + offset + right,   0 <= j < k_len,
// offset = k_len - q_len when bottom-right aligned, else 0; a bound < 0 is unbounded. One row's
// keys are an interval, and consecutive rows' intervals overlap or touch, so the keys a block of
// rows reaches are one interval too: [first_key(first row), key_end(last row + 1)), empty when
// first >= end (FA3's hopper/block.h get_n_block_min_max computes the same range).
#pragma once

#if defined(__CUDACC__)
#define TFORMER_BAND_FUNCTION __host__ __device__ __forceinline__
#else
#define TFORMER_BAND_FUNCTION inline
#endif

namespace tformer {
namespace attention_sm90 {

// Blocks [first, end) of a fixed size; none when end <= first (count() is then 0).
struct BlockRange {
  int first, end;
  TFORMER_BAND_FUNCTION int count() const { return end > first ? end - first : 0; }
};

struct SequenceBand {
  int q_len, k_len;
  int offset;       // k_len - q_len (bottom-right) or 0 (top-left)
  int left, right;  // window bounds, < 0: unbounded

  static TFORMER_BAND_FUNCTION int clamp(int x, int low, int high) { return x < low ? low : (x > high ? high : x); }

  // Keys [first, last] of one row's band (an interval of indices, keys or rows), not clamped to
  // the sequence; an unbounded side is +-kUnbounded. Two compares an element and no branch: the
  // kernels' masks hold these two numbers a row instead of testing the window's signs each time.
  struct KeyInterval {
    int first, last;
    TFORMER_BAND_FUNCTION bool contains(int col) const { return col >= first && col <= last; }
  };
  static constexpr int kUnbounded = 1 << 30;
  TFORMER_BAND_FUNCTION KeyInterval row_keys(int row) const {
    return {left < 0 ? -kUnbounded : row + offset - left, right < 0 ? kUnbounded : row + offset + right};
  }
  // Rows [first, last] whose bands hold key `col` (the same rule solved for the row): the
  // backward's dK/dV pass, whose threads own keys.
  TFORMER_BAND_FUNCTION KeyInterval key_rows(int col) const {
    return {right < 0 ? -kUnbounded : col - offset - right, left < 0 ? kUnbounded : col - offset + left};
  }
  // The band alone (the caller checks the key exists and is not padding).
  TFORMER_BAND_FUNCTION bool allows(int row, int col) const { return row_keys(row).contains(col); }
  // Keys [first_key(row_begin), key_end(row_end)) that rows [row_begin, row_end) may see.
  TFORMER_BAND_FUNCTION int first_key(int row_begin) const {
    return left < 0 ? 0 : clamp(row_begin + offset - left, 0, k_len);
  }
  TFORMER_BAND_FUNCTION int key_end(int row_end) const {
    return right < 0 ? k_len : clamp(row_end + offset + right, 0, k_len);
  }
  // Rows [first_row(col_begin), row_end(col_end)) whose bands reach keys [col_begin, col_end).
  TFORMER_BAND_FUNCTION int first_row(int col_begin) const {
    return right < 0 ? 0 : clamp(col_begin - offset - right, 0, q_len);
  }
  TFORMER_BAND_FUNCTION int row_end(int col_end) const {
    return left < 0 ? q_len : clamp(col_end - offset + left, 0, q_len);
  }

  // The key blocks of block_n keys that query rows [m0, m0 + block_m) (those < q_len) reach.
  TFORMER_BAND_FUNCTION BlockRange key_blocks(int m0, int block_m, int block_n) const {
    const int rows_end = m0 + block_m < q_len ? m0 + block_m : q_len;
    const int first = first_key(m0), end = key_end(rows_end);
    if (first >= end) return {0, 0};
    return {first / block_n, (end + block_n - 1) / block_n};
  }
  // The query blocks of block_m rows whose bands reach keys [n0, n0 + block_n) (those < k_len).
  TFORMER_BAND_FUNCTION BlockRange query_blocks(int n0, int block_n, int block_m) const {
    const int cols_end = n0 + block_n < k_len ? n0 + block_n : k_len;
    const int first = first_row(n0), end = row_end(cols_end);
    if (first >= end) return {0, 0};
    return {first / block_m, (end + block_m - 1) / block_m};
  }

  // Whether rows [row_first, row_last] x keys [n0, n0 + block_n) hold a key past the sequence
  // or outside some row's band: then that block is masked element by element, otherwise not at
  // all (padding keys are the caller's to add). Rows past q_len count as rows of the band: a
  // pass that stores them never reads their scores.
  TFORMER_BAND_FUNCTION bool cuts(int row_first, int row_last, int n0, int block_n) const {
    return n0 + block_n > k_len || (right >= 0 && n0 + block_n - 1 > row_first + offset + right) ||
           (left >= 0 && n0 < row_last + offset - left);
  }
};

// The band of a sequence of q_len queries and k_len keys.
TFORMER_BAND_FUNCTION SequenceBand sequence_band(int q_len, int k_len, int window_left, int window_right,
                                                 bool bottom_right) {
  return {q_len, k_len, bottom_right ? k_len - q_len : 0, window_left, window_right};
}

}  // namespace attention_sm90
}  // namespace tformer

#undef TFORMER_BAND_FUNCTION
