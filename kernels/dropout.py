"""The attention dropout mask, regenerated bit for bit by the forward and both backward passes.

Philox4x32-10 (Salmon et al. 2011, Triton's ``tl.philox``) turns a 128-bit counter and the
64-bit seed into four 32-bit random words. One call decides four adjacent key columns, as in
FlashAttention, instead of one ``tl.rand`` (a whole Philox call) per element:

    counter = (col // 4, row, batch_head mod 2^32, batch_head // 2^32), key = seed
    keep[row, col] = word[col % 4] >= floor(p * 2^32)     (unsigned 32-bit compare)

Each counter word is below 2^32 for any sequence length and any batch x heads, so every
(batch_head, row, col) has its own (counter, lane): no product of lengths, no wrap-around. The
mask depends only on the element's indices, never on the block sizes, so the forward (M, N)
tiles, the dQ pass's (M, N) tiles and the dK/dV pass's transposed (N, M) tiles agree.
The keep probability is 1 - floor(p * 2^32) / 2^32: p rounded to 2^-32 (p itself is float32).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, dropout_p, batch_head, rows, cols):
    """Bool (M, N): True where the attention probability of (rows[i], cols[j]) is kept.

    Args:
        seed: int64 scalar, the Philox key.
        dropout_p: float32 scalar in [0, 1), the drop probability.
        batch_head: integer scalar (int64 in the kernels), batch * num_heads + head.
        rows: (M,) int32 query indices.
        cols: (N,) int32 key indices, consecutive from a multiple of 4 (a block start), N % 4 == 0.
    """
    tl.static_assert(cols.shape[0] % 4 == 0, "dropout_keep: the key block must be a multiple of 4 columns")
    quads: tl.constexpr = cols.shape[0] // 4
    # cols[4j]: the first column of each group of four (reshape + split move no data).
    first = tl.split(tl.split(tl.reshape(cols, (quads, 2, 2)))[0])[0]
    zero = rows[:, None] * 0 + first[None, :] * 0  # (M, N / 4)
    c0 = zero + first[None, :] // 4
    c1 = zero + rows[:, None]
    batch_head = tl.cast(batch_head, tl.int64)  # also takes a plain int (tests pass one)
    c2 = (zero + (batch_head & 0xFFFFFFFF)).to(tl.uint32)
    c3 = (zero + (batch_head >> 32)).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0.to(tl.uint32), c1.to(tl.uint32), c2, c3)
    threshold = tl.cast(dropout_p * 4294967296.0, tl.uint32)  # floor(p * 2^32) < 2^32 as p < 1
    # Word l of group j decides column 4j + l: interleaving (0, 2) and (1, 3), then the two
    # results, puts word 2b + a at 4j + 2b + a.
    return tl.interleave(tl.interleave(r0 >= threshold, r2 >= threshold),
                         tl.interleave(r1 >= threshold, r3 >= threshold))
