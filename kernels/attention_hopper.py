"""Flash attention forward for Hopper (sm_90) in Triton: TMA tensor descriptors, causal in two
stages, key padding as per-sequence bounds, and an optional persistent grid.

The math is ``kernels/attention.py``'s (FlashAttention-2, Dao 2023, Algorithm 1; scores in log2
units, fully masked rows -> 0 and lse -inf); what changes is how the tiles move and which blocks
pay for masks:

- Q/K/V/O tiles move through tensor descriptors (``tl.make_tensor_descriptor``, built on the
  device): on sm_90 the loads become TMA copies (``cp.async.bulk.tensor``) into shared memory
  that feeds ``wgmma`` directly, and out-of-range rows and head-dim lanes arrive as zeros, so no
  address or bounds arithmetic runs per tile. One 4-D descriptor per tensor over (B, H, S, D)
  keeps every tile inside its own (batch, head): the zero fill stops at the sequence end.
  Device-side descriptors live in a global scratch buffer that Triton asks
  ``triton.set_allocator``'s allocator for at launch (same API in Triton 3.6.0 and 3.8.0);
  ``ensure_allocator`` installs a torch-backed one when none is set.
- Causal in two stages: key blocks entirely below the diagonal and inside the keys every row may
  see run without any mask (``MASKED=False``); only the diagonal and tail blocks are masked.
- Key padding: the launcher reduces the (B, Sk) mask on the device (no host sync, CUDA-graph
  safe) to two int32 per sequence: ``prefix`` (keys [0, prefix) are all valid) and ``end``
  (keys >= end are all padded). Blocks inside the prefix take the unmasked stage, blocks past the
  end are skipped, and only keys in [prefix, end) load the mask. A suffix mask (the common case,
  prefix == end) never loads it except for predicated-off lanes.
- ``PERSISTENT``: programs = SM count, each looping over (query block, head, batch) tiles, so
  the descriptor set-up and the tail wave are paid once per SM instead of once per tile; the
  autotuner picks it against the one-tile-per-program grid (both are candidates).

Warp specialization (``tl.range(..., warp_specialize=True)``) is NOT used: in both Triton 3.6.0
and 3.8.0 ``backends/nvidia/compiler.py::make_ttgir`` runs the pass that honours that flag
(``passes.ttgpuir.add_warp_specialize``) only for ``capability // 10 >= 10`` (Blackwell); sm_90
runs ``nvidia.passes.hopper.add_hopper_warpspec`` whose output for this kernel holds no
``ttg.warp_specialize`` op and no ``setmaxnreg`` (tests/test_attention_hopper.py compiles it
with the flag on and checks), so on Hopper the flag is a no-op. Overlap on sm_90 comes from the software pipeline (``num_stages``) instead.

Only 16-bit inputs in the padded-batch layout with TMA-legal strides run here; fp32, packed
varlen, dropout and other layouts take ``kernels/attention.py`` (see ``forward_path``).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from .attention_tiles import (band_args, band_key_limits, band_meta, band_offset, block_d, key_block_range, narrow,
                              problem, scores_log2, seqlen_buckets, tile_dot)
from .launch import BUCKET_ARGS, Tuned, config, configs_for_call, interpreter_blocks

log = logging.getLogger(__name__)

PATH_ENV = "TFORMER_ATTENTION_FWD"
PATHS = ("auto", "hopper", "fa2")
TMA_ALIGN_BYTES = 16  # TMA: base address and every stride but the last a multiple of 16 bytes
MAX_TMA_BOX = 256  # elements per box dimension
# Under TRITON_INTERPRET=1 the persistent loop runs with this many programs, so a test's few
# tiles are shared out and the loop really iterates.
INTERPRETER_PROGRAMS = 3
INTERPRETER_PERSISTENT = True  # a test sets it False to run the one-tile-per-program grid


@triton.jit
def online_softmax_step(acc, l_i, m_i, q, k, v, rows, cols, k_len, prefix, end, key_pad_row, stride_ps,
                        scale_log2, offset, window_left, window_right, softcap_in, softcap_out,
                        HAS_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KEY_PADDING: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """FA2 Alg. 1 lines 8-10 over one key block: k, v (N, D) already in shared memory.
    ``MASKED=False``: every row may attend every key of the block; no mask of any kind. The
    band and soft-capping are those of ``kernels/attention_tiles.py``."""
    qk = tile_dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST)
    if MASKED:
        s = scores_log2(qk, scale_log2, softcap_in, softcap_out, HAS_SOFTCAP)
        if HAS_BAND:
            lo, hi = band_key_limits(rows, offset, window_left, window_right)
            hi = tl.minimum(hi, tl.minimum(k_len, end))
            allowed = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        else:
            allowed = (cols < tl.minimum(k_len, end))[None, :]
        if HAS_KEY_PADDING:  # the mask is read only between the valid prefix and the padded tail
            load = (cols >= prefix) & (cols < end)
            pad = tl.load(key_pad_row + cols.to(tl.int64) * stride_ps, mask=load, other=0)
            allowed = allowed & (pad == 0)[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        p = tl.exp2(s - m_safe[:, None])
    elif HAS_SOFTCAP:
        s = scores_log2(qk, scale_log2, softcap_in, softcap_out, HAS_SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
        p = tl.exp2(s - m_safe[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)  # finite; scale_log2 >= 0
        m_safe = m_new
        p = tl.exp2(qk * scale_log2 - m_safe[:, None])  # one FMA per score
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tile_dot(narrow(p, v.dtype, UPCAST), v, acc, DOT_PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit
def attend_tile(tile, q_desc, k_desc, v_desc, o_desc, Lse, KeyPad, KeyPrefix, KeyEnd,
                stride_lb, stride_lh, stride_ls, stride_pb, stride_ps,
                num_heads, group_size, seqlen_q, seqlen_k, scale, window_left, window_right, softcap,
                HAS_BAND: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_KEY_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                WARP_SPECIALIZE: tl.constexpr):
    """One (query block, head, batch) tile: out rows [start_m, start_m + BLOCK_M) and their lse."""
    num_m_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    m_block = tile % num_m_blocks
    if HAS_BAND:  # causal: the longest rows first, so a wave's last tiles are the short ones
        m_block = num_m_blocks - 1 - m_block
    head = (tile // num_m_blocks) % num_heads
    batch = tile // (num_m_blocks * num_heads)
    kv_head = head // group_size
    start_m = m_block * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)

    q = q_desc.load([batch, head, start_m, 0]).reshape(BLOCK_M, BLOCK_D)  # zeros past Sq and D
    # A negative scale's sign moves onto q (exact). Negated in float32: the interpreter holds
    # bf16 as raw 16-bit integers, which a bf16 negation wraps (kernels/attention.py's
    # ``-q`` gives wrong bf16 results there; on a GPU both are the same instruction count).
    q = tl.where(scale < 0, (-(q.to(tl.float32))).to(q.dtype), q)
    scale_log2 = tl.abs(scale) * 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
    softcap_in = tl.abs(scale) / tl.where(HAS_SOFTCAP, softcap, 1.0)
    softcap_out = softcap * 1.4426950408889634
    offset = band_offset(seqlen_q, seqlen_k, BOTTOM_RIGHT)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    prefix = seqlen_k
    end = seqlen_k
    key_pad_row = KeyPad + batch.to(tl.int64) * stride_pb
    if HAS_KEY_PADDING:
        prefix = tl.load(KeyPrefix + batch)
        end = tl.load(KeyEnd + batch)
    # The band's key blocks (kernels/attention_tiles.py's key_block_range), then the padding's: keys
    # at or past `end` are padding (skipped); the full blocks must also lie in the valid prefix.
    lo, full_lo, full_hi, hi = key_block_range(start_m, seqlen_k, offset, window_left, window_right, HAS_BAND, False,
                                               BLOCK_M, BLOCK_N)
    hi = tl.maximum(tl.minimum(hi, end), lo)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(tl.minimum(full_hi, (prefix // BLOCK_N) * BLOCK_N), full_lo), hi)
    for start_n in tl.range(lo, full_lo, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, rows, start_n + offs_n, seqlen_k, prefix, end,
                                            key_pad_row, stride_ps, scale_log2, offset, window_left, window_right,
                                            softcap_in, softcap_out, HAS_BAND, HAS_SOFTCAP, HAS_KEY_PADDING,
                                            DOT_PRECISION, UPCAST, True)
    for start_n in tl.range(full_lo, full_hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, rows, start_n + offs_n, seqlen_k, prefix, end,
                                            key_pad_row, stride_ps, scale_log2, offset, window_left, window_right,
                                            softcap_in, softcap_out, HAS_BAND, HAS_SOFTCAP, HAS_KEY_PADDING,
                                            DOT_PRECISION, UPCAST, False)
    for start_n in tl.range(full_hi, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)  # zeros past Sk
        v = v_desc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, rows, start_n + offs_n, seqlen_k, prefix, end,
                                            key_pad_row, stride_ps, scale_log2, offset, window_left, window_right,
                                            softcap_in, softcap_out, HAS_BAND, HAS_SOFTCAP, HAS_KEY_PADDING,
                                            DOT_PRECISION, UPCAST, True)

    empty = l_i == 0.0  # fully masked rows: output 0 and lse -inf, as the reference's safe_softmax
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_desc.store([batch, head, start_m, 0], narrow(out, o_desc.dtype, UPCAST).reshape(1, 1, BLOCK_M, BLOCK_D))
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    l_base = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
    tl.store(l_base + rows.to(tl.int64) * stride_ls, lse, mask=rows < seqlen_q)


@triton.jit(do_not_specialize=["seqlen_q_bucket", "seqlen_k_bucket"])
def _attention_fwd_hopper_kernel(
    Q, K, V, Out, Lse, KeyPad, KeyPrefix, KeyEnd,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls, stride_pb, stride_ps,
    batch_size, num_heads, num_kv_heads, group_size, seqlen_q, seqlen_k, head_dim, scale,
    window_left, window_right, softcap, seqlen_q_bucket, seqlen_k_bucket,
    HAS_BAND: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERSISTENT: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """Grid: (tiles,) or, ``PERSISTENT``, (min(tiles, SMs),). Every stride but the head dim's
    (1) is a multiple of 16 bytes (checked by ``tma_layout_problem``). ``WARP_SPECIALIZE`` is
    False on every launch (see the module docstring); it exists so the compile test can show
    the flag is still a no-op on sm_90 with the installed Triton."""
    q_desc = tl.make_tensor_descriptor(Q, [batch_size, num_heads, seqlen_q, head_dim],
                                       [stride_qb, stride_qh, stride_qs, 1], [1, 1, BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K, [batch_size, num_kv_heads, seqlen_k, head_dim],
                                       [stride_kb, stride_kh, stride_ks, 1], [1, 1, BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V, [batch_size, num_kv_heads, seqlen_k, head_dim],
                                       [stride_vb, stride_vh, stride_vs, 1], [1, 1, BLOCK_N, BLOCK_D])
    o_desc = tl.make_tensor_descriptor(Out, [batch_size, num_heads, seqlen_q, head_dim],
                                       [stride_ob, stride_oh, stride_os, 1], [1, 1, BLOCK_M, BLOCK_D])
    if PERSISTENT:
        num_tiles = tl.cdiv(seqlen_q, BLOCK_M) * num_heads * batch_size
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            attend_tile(tile, q_desc, k_desc, v_desc, o_desc, Lse, KeyPad, KeyPrefix, KeyEnd,
                        stride_lb, stride_lh, stride_ls, stride_pb, stride_ps, num_heads, group_size, seqlen_q,
                        seqlen_k, scale, window_left, window_right, softcap, HAS_BAND, BOTTOM_RIGHT, HAS_SOFTCAP,
                        HAS_KEY_PADDING, DOT_PRECISION, UPCAST, BLOCK_D, BLOCK_M, BLOCK_N,
                        WARP_SPECIALIZE)
    else:
        attend_tile(tl.program_id(0), q_desc, k_desc, v_desc, o_desc, Lse, KeyPad, KeyPrefix, KeyEnd,
                    stride_lb, stride_lh, stride_ls, stride_pb, stride_ps, num_heads, group_size, seqlen_q,
                    seqlen_k, scale, window_left, window_right, softcap, HAS_BAND, BOTTOM_RIGHT, HAS_SOFTCAP,
                    HAS_KEY_PADDING, DOT_PRECISION, UPCAST, BLOCK_D, BLOCK_M, BLOCK_N,
                        WARP_SPECIALIZE)


def hopper_config(block_m: int, block_n: int, warps: int, stages: int, persistent: bool) -> triton.Config:
    chosen = config(block_m, block_n, warps, stages)
    chosen.kwargs["PERSISTENT"] = persistent
    return chosen


# Candidates per head-dim bucket (16-bit inputs only), from `python -m bench.compile_audit
# --only hopper` under both Triton 3.6 (the GPU image's) and 3.8: none spills. K/V stages are
# BLOCK_N x BLOCK_D x 2 tensors x 2 bytes each (hd 128, BLOCK_N 128, 2 stages: 128 KiB + Q 32 KiB).
# The leading candidate (what runs with TFORMER_AUTOTUNE=0) is one tile per program.
# - hd 64 and 128: 128-row query tiles over two warpgroups (wgmma is 64 rows per warpgroup). A
#   persistent program holds more live state (the pipeline reaches across tiles): at hd 128
#   BLOCK_N 128 it spilled, so that candidate uses BLOCK_N 64.
# - hd 256: 64-row tiles over two warpgroups, which then split the accumulator's columns, so each
#   thread holds 64 of O's float32 values instead of 128 (205-233 registers). The 128-row tiles
#   sat at 255 and spilled 176-196 bytes with key padding; the persistent 64x64 spills 36 bytes
#   under 3.8 with key padding, so hd 256 has none.
HOPPER_CONFIGS = {
    64: [hopper_config(128, 128, 8, 3, False), hopper_config(128, 128, 8, 3, True),
         hopper_config(128, 64, 4, 3, False)],
    128: [hopper_config(128, 128, 8, 2, False), hopper_config(128, 64, 8, 3, True),
          hopper_config(128, 64, 8, 3, False)],
    256: [hopper_config(64, 64, 8, 2, False), hopper_config(64, 64, 8, 3, False),
          hopper_config(64, 32, 8, 2, False)],
}


def _autotuned() -> Tuned:
    configs = [c for bucket in HOPPER_CONFIGS.values() for c in bucket]
    tuner = triton.autotune(configs, key=["BLOCK_D", "HAS_BAND", "HAS_KEY_PADDING", *BUCKET_ARGS],
                            cache_results=True,
                            prune_configs_by={"early_config_prune": lambda *a, **kw: configs_for_call(
                                HOPPER_CONFIGS, HOPPER_CONFIGS, *a, **kw)})(_attention_fwd_hopper_kernel)
    return Tuned(tuner, HOPPER_CONFIGS, HOPPER_CONFIGS)


_attention_fwd_hopper_tuned = _autotuned()


# ---------------------------------------------------------------------------------------
# Dispatch: which forward runs, and why.
# ---------------------------------------------------------------------------------------

def requested_path(path: str | None) -> str:
    """``path``, "auto" when None (the backend passes the registry's choice; the environment is
    read in ``tformer.ops.overrides``, never here).

    Raises:
        ValueError: not one of "auto", "hopper", "fa2".
    """
    chosen = path if path is not None else "auto"
    if chosen not in PATHS:
        raise ValueError(f"attention: argument 'fwd_path' is {chosen!r}; expected one of {', '.join(PATHS)}")
    return chosen


def tma_layout_problem(t: torch.Tensor, name: str) -> str | None:
    """Why (B, H, S, D) tensor ``t`` cannot be read through a TMA descriptor, or None."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return f"'{name}' has head-dim stride {t.stride(-1)} (TMA needs 1)"
    element = t.element_size()
    if t.data_ptr() % TMA_ALIGN_BYTES:
        return f"'{name}' starts at an address not 16-byte aligned"
    for dim, stride in zip("BHS", tma_strides(t)):
        if (stride * element) % TMA_ALIGN_BYTES:
            return f"'{name}' has {dim} stride {stride} elements, not a multiple of 16 bytes"
    return None


def tma_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(B, H, S) strides for the descriptor. A size-1 dim is never stepped, so its stride (which
    torch leaves arbitrary) is replaced by the extent under it, rounded up to 16 bytes."""
    align = TMA_ALIGN_BYTES // t.element_size()
    strides, inner = [], t.shape[-1]
    for dim in (2, 1, 0):
        stride = t.stride(dim) if t.shape[dim] > 1 else triton.cdiv(inner, align) * align
        strides.append(stride)
        inner = stride * t.shape[dim]
    return tuple(reversed(strides))


def hopper_problem(q, k, v, varlen: bool, dropout_p: float) -> str | None:
    """Why this call cannot take the Hopper kernel, or None when it can."""
    if varlen:
        return "packed varlen input"
    if dropout_p > 0.0:
        return "dropout"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the Hopper path takes float16/bfloat16)"
    if v.shape[-1] != q.shape[-1]:
        return "v's head dim differs from q's"
    for name, t in (("q", q), ("k", k), ("v", v)):
        problem_text = tma_layout_problem(t, name)
        if problem_text:
            return problem_text
    return None


_logged: set = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def forward_path(q, k, v, varlen: bool, dropout_p: float, path: str | None = None) -> str:
    """"hopper" or "fa2" for this call. "auto": hopper on a CUDA device of capability 9.x when
    ``hopper_problem`` finds nothing, else fa2 (logged once per reason, a warning on sm_90).
    "hopper" on an input it cannot take is an error, never a silent fallback; on a CPU tensor it
    runs the new kernel under the interpreter (tests).

    Raises:
        ValueError: an unknown path, or "hopper" forced on an input it cannot take.
    """
    chosen = requested_path(path)
    if chosen == "fa2":
        _log_once(logging.INFO, "attention forward: FlashAttention-2 kernel (forced)")
        return "fa2"
    reason = hopper_problem(q, k, v, varlen, dropout_p)
    if chosen == "hopper":
        if reason:
            raise ValueError(f"attention: the Hopper forward was forced (fwd_path='hopper', e.g. from {PATH_ENV}=hopper) "
                             f"but this call has {reason}; unset it or use 'auto'")
        return "hopper"
    on_hopper = q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] == 9
    if not on_hopper:
        return "fa2"
    if reason:
        _log_once(logging.WARNING, f"attention forward on sm_90: FlashAttention-2 kernel, because of {reason}")
        return "fa2"
    _log_once(logging.INFO, "attention forward on sm_90: Hopper kernel (TMA descriptors)")
    return "hopper"


# ---------------------------------------------------------------------------------------
# Launcher.
# ---------------------------------------------------------------------------------------

def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # torch's caching allocator: stream-ordered, and recorded into a CUDA graph's pool on capture.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Device-side tensor descriptors need global scratch at launch (Triton 3.6 and 3.8 ask the
    allocator set by ``triton.set_allocator``, a ContextVar, so per thread); set a torch-backed
    one unless the caller set their own."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def key_bounds(key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (B,) ``prefix`` (keys [0, prefix) unpadded) and ``end`` (keys >= end padded), on
    the mask's device with torch ops: no host sync, capturable in a CUDA graph."""
    valid = ~key_padding_mask  # (B, Sk), True = a key that may be attended
    prefix = valid.to(torch.int32).cummin(dim=1).values.sum(dim=1, dtype=torch.int32)
    positions = torch.arange(1, valid.shape[1] + 1, device=valid.device, dtype=torch.int32)
    end = torch.where(valid, positions, 0).amax(dim=1).to(torch.int32)
    return prefix, end


def attention_forward_hopper(q, k, v, key_padding_mask, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                             scale: float, launcher, band=None, softcap: float = 0.0):
    """(out (B, Hq, Sq, D) contiguous, lse float32 (B, Hq, Sq)) for inputs ``hopper_problem``
    accepted. ``launcher`` as in ``kernels.attention.attention_forward``; ``band`` (None:
    ``causal`` top-left) and ``softcap`` as there."""
    band, (window_left, window_right) = band_args(causal, band)
    _, num_seqs, num_heads, group_size, max_q, max_k = problem(q, k, None, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], num_heads, q.shape[2]), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if k.shape[2] == 0:  # no keys: every row fully masked (a TMA dimension may not be 0)
        return out.zero_(), lse.fill_(float("-inf"))
    head_dim = q.shape[-1]
    has_pad = key_padding_mask is not None
    key_pad = key_padding_mask.view(torch.uint8) if has_pad else q
    prefix, end = key_bounds(key_padding_mask) if has_pad else (q, q)
    args = (q, k, v, out, lse, key_pad, prefix, end, *tma_strides(q), *tma_strides(k), *tma_strides(v),
            *tma_strides(out), *lse.stride(), *(key_padding_mask.stride() if has_pad else (0, 0)),
            num_seqs, num_heads, k.shape[1], group_size, max_q, max_k, head_dim, scale, window_left, window_right,
            softcap, *seqlen_buckets(max_q, max_k))
    meta = dict(**band_meta(band, softcap), HAS_KEY_PADDING=has_pad, DOT_PRECISION="tf32",
                UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16, BLOCK_D=block_d(head_dim),
                WARP_SPECIALIZE=False)
    sm_count = (torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda"
                else INTERPRETER_PROGRAMS if q.device.type == "cpu" else 132)

    def grid_of(blocks):
        tiles = triton.cdiv(max_q, blocks["BLOCK_M"]) * num_heads * num_seqs
        return (min(tiles, sm_count) if blocks["PERSISTENT"] else tiles,)

    if q.device.type == "cpu":  # the interpreter: small blocks, the persistent loop exercised
        blocks = dict(interpreter_blocks(_attention_fwd_hopper_kernel), PERSISTENT=INTERPRETER_PERSISTENT)
        _attention_fwd_hopper_kernel[grid_of(blocks)](*args, **meta, **blocks)
    else:
        if q.device.type == "cuda":
            ensure_allocator()
        launcher(_attention_fwd_hopper_kernel, _attention_fwd_hopper_tuned, grid_of, args, meta, q.device)
    return out, lse
