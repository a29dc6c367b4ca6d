"""The tile helpers every Triton attention kernel shares: the forward (``attention.py``), the
Hopper forward (``attention_hopper.py``) and the backward (``attention_bwd.py``).

Device side (``@triton.jit``, inlined into each kernel): where a sequence starts in a packed
batch, the causal/sliding-window band (``tformer.ops.attention_mask``) and which key blocks it
touches, soft-capped scores in log2 units, the masked score tile, round-to-nearest narrowing
and the tile matmul. Host side: the strides, the head-dim block, the dot constexprs, the
problem's grid sizes and the band's kernel arguments.

They live here rather than in ``attention.py`` so that the three kernel modules import one
module below them and never each other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tformer.ops.attention_mask import Band

from .launch import check_grid_yz, seqlen_bucket

# An unbounded side of the band, as a kernel integer: i + offset +- 2^30 stays inside int32 for
# any sequence a launch grid holds.
UNBOUNDED = 1 << 30


@triton.jit
def sequence_bounds(cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first token, length) of this program's query and key sequence."""
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + batch)
        q_len = tl.load(cu_seqlens_q + batch + 1) - q_start
        k_start = tl.load(cu_seqlens_k + batch)
        k_len = tl.load(cu_seqlens_k + batch + 1) - k_start
    else:
        q_start = batch * 0
        q_len = seqlen_q + batch * 0
        k_start = batch * 0
        k_len = seqlen_k + batch * 0
    return q_start, q_len, k_start, k_len


@triton.jit
def band_offset(q_len, k_len, BOTTOM_RIGHT: tl.constexpr):
    """Where the band's diagonal starts: key ``i + offset`` lines up with query ``i``."""
    if BOTTOM_RIGHT:  # FlashAttention's: the last query lines up with the last key
        return k_len - q_len
    return q_len * 0  # top-left, as SDPA's is_causal


@triton.jit
def in_band(rows, cols, offset, window_left, window_right):
    """(M, N) bool: key ``cols[j]`` lies in query ``rows[i]``'s band (``ops.attention_mask``)."""
    rel = cols[None, :] - (rows[:, None] + offset)
    return (rel <= window_right) & (rel >= -window_left)


@triton.jit
def band_key_limits(rows, offset, window_left, window_right):
    """(M,) ``lo`` and ``hi``: query ``rows[i]``'s band is the keys ``lo[i] <= key < hi[i]``, the
    rule of ``in_band`` as per-row bounds. Comparing the (N,) key indices against these costs the
    (M, N) mask no index arithmetic of its own; that kept ptxas from spilling in the Hopper forward
    at hd 128 (Triton 3.6: 255 registers and 48 bytes spilled before, 242 and none after) and in
    the dK/dV kernel, which takes a key's query rows as ``band_key_limits(key - offset, 0, right,
    left)`` (the mirrored band)."""
    return rows + offset - window_left, rows + offset + window_right + 1


@triton.jit
def tanh(x):
    """tanh in float32 (no libdevice, so the interpreter runs it too): an odd Taylor polynomial
    near 0, where (1 - e) / (1 + e) would cancel, and the exponential form elsewhere (absolute
    error below 1e-7 either way). -2.885... = -2 * log2(e)."""
    ax = tl.abs(x)
    e = tl.exp2(ax * -2.8853900817779268)
    x2 = x * x
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    t = tl.where(ax < 0.125, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def key_block_range(start_m, k_len, offset, window_left, window_right, HAS_BAND: tl.constexpr,
                    HAS_KEY_PADDING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, full_lo, full_hi, hi), multiples of BLOCK_N but ``hi``: the key blocks of
    ``[lo, hi)`` hold a key some row of the query block ``[start_m, start_m + BLOCK_M)`` may
    attend (blocks outside are skipped); those of ``[full_lo, full_hi)`` hold only keys every
    row of the block attends (no masks needed). Rows past the sequence only narrow the full range."""
    lo = k_len * 0
    hi = k_len
    full_lo = lo
    full_hi = k_len
    if HAS_BAND:
        last_row = start_m + BLOCK_M - 1
        lo = tl.maximum(start_m + offset - window_left, 0)
        hi = tl.minimum(last_row + offset + window_right + 1, k_len)
        full_lo = tl.maximum(last_row + offset - window_left, 0)
        full_hi = tl.minimum(start_m + offset + window_right + 1, k_len)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), hi)
    full_hi = tl.minimum(tl.maximum((full_hi // BLOCK_N) * BLOCK_N, full_lo), hi)
    if HAS_KEY_PADDING:  # padded keys may sit anywhere: every block is masked
        full_lo = hi
        full_hi = hi
    return lo, full_lo, full_hi, hi


@triton.jit
def scores_log2(qk, scale_log2, softcap_in, softcap_out, HAS_SOFTCAP: tl.constexpr):
    """Scores in log2 units from the raw dot products: ``qk * scale * log2(e)``, or with
    soft-capping (Gemma 2) ``softcap * tanh(qk * scale / softcap) * log2(e)``
    (``softcap_in = scale / softcap``, ``softcap_out = softcap * log2(e)``)."""
    if HAS_SOFTCAP:
        return tanh(qk * softcap_in) * softcap_out
    return qk * scale_log2


@triton.jit
def allowed_scores(s, rows, cols, k_len, key_pad_row, stride_ps, offset, window_left, window_right,
                   HAS_BAND: tl.constexpr, HAS_KEY_PADDING: tl.constexpr):
    """s with -inf where query ``rows[i]`` may not attend key ``cols[j]`` ((M, N) layout)."""
    allowed = cols[None, :] < k_len
    if HAS_BAND:
        allowed = allowed & in_band(rows, cols, offset, window_left, window_right)
    if HAS_KEY_PADDING:
        pad = tl.load(key_pad_row + cols.to(tl.int64) * stride_ps, mask=cols < k_len, other=1)
        allowed = allowed & (pad == 0)[None, :]
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def narrow(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even. On a GPU that is what ``.to`` does; Triton
    3.8's interpreter truncates float32 -> bfloat16 instead, which biases every bf16 result on
    the CPU, so under ``UPCAST`` (the interpreter) a bf16 target is rounded here first (add half
    an ulp of bf16, ties to even, in the float32 bits) and the truncation is then exact."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tile_dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b (+ acc) with float32 accumulation. ``UPCAST`` converts the operands to float32
    first: only under TRITON_INTERPRET=1 with 16-bit inputs, whose tl.dot the interpreter gets
    wrong (bf16) or runs as a slow NumPy float16 matmul (fp16); the conversion is exact, so the
    math is unchanged."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# ---------------------------------------------------------------------------------------
# Host side: layouts and the kernels' constexprs.
# ---------------------------------------------------------------------------------------

def strides4(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, seq, dim) strides of a (B, H, S, D) tensor, or of a packed (total, H, D) one
    whose sequences are addressed by offsets instead of a batch stride."""
    if varlen:
        return (0, t.stride(1), t.stride(0), t.stride(2))
    return tuple(t.stride())


def lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, seq) strides of lse (B, H, Sq), or of the packed (H, total_q)."""
    if varlen:
        return (0, lse.stride(0), lse.stride(1))
    return tuple(lse.stride())


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dim >= 16


def dot_meta(t: torch.Tensor) -> dict:
    """Constexprs of every tl.dot (see ``tile_dot``). "tf32" is ignored for fp16/bf16 operands."""
    return dict(DOT_PRECISION="ieee" if t.dtype == torch.float32 else "tf32",
                UPCAST=t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16))


def problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(varlen, num_seqs, num_heads, group_size, max_seqlen_q, max_seqlen_k) of a call.

    Raises:
        ValueError: more heads or sequences than a launch grid holds (``check_grid_yz``).
    """
    varlen = cu_seqlens_q is not None
    head_axis = 1
    num_seqs = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    num_heads, num_kv_heads = q.shape[head_axis], k.shape[head_axis]
    check_grid_yz(num_heads, num_seqs, varlen)
    return varlen, num_seqs, num_heads, num_heads // num_kv_heads, max_seqlen_q, max_seqlen_k


def seqlen_buckets(max_seqlen_q: int, max_seqlen_k: int) -> tuple[int, int]:
    """The autotune key's sequence-length buckets: the last two arguments of tuned kernels."""
    return seqlen_bucket(max_seqlen_q), seqlen_bucket(max_seqlen_k)


def band_args(causal: bool, band: Band | None) -> tuple[Band, tuple[int, int]]:
    """The band of a call (``band``, or plain causal/full when None) and its kernel bounds
    (``UNBOUNDED`` for an unbounded side)."""
    if band is None:
        band = Band(-1, 0 if causal else -1)
    bounds = tuple(UNBOUNDED if bound < 0 else bound for bound in (band.left, band.right))
    return band, bounds


def band_meta(band: Band, softcap: float) -> dict:
    """The mask constexprs shared by the forward and backward kernels."""
    return dict(HAS_BAND=not band.is_full, BOTTOM_RIGHT=band.bottom_right, HAS_SOFTCAP=softcap > 0.0)
