"""tformer.ops.attention and attention_varlen: every backend against the float64 reference.

Each case runs once per backend and variant (the ``backend`` fixture: ``triton:atomic_dq`` is the
Triton backend's atomic-dQ backward, ``triton:fa2`` its FlashAttention-2 forward); the forward
and the three input gradients are compared with the reference computed in float64 on the same
inputs. On the
CPU the Triton kernels run under TRITON_INTERPRET=1 with 16-wide blocks, so lengths 17 and
33 cross block boundaries; the long sequences and large head dims run on a GPU only.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import tformer
from tformer.ops import attention, attention_varlen

from conftest import DEVICE, ON_GPU, backend_params, call_or_skip, requires_backend, requires_cuda
from tolerances import assert_close_to_reference

DQ_ENV = "TFORMER_ATTENTION_DQ"  # the override tformer.ops.overrides reads


@pytest.fixture(params=backend_params(variants_of="attention"))
def backend(request) -> str:
    """conftest's backends, and the variants that change attention (triton:atomic_dq, triton:fa2)."""
    return request.param


def make_inputs(batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)

    return (randn(batch, num_heads, seq_q, head_dim), randn(batch, num_kv_heads, seq_k, head_dim),
            randn(batch, num_kv_heads, seq_k, head_dim))


def padding_mask(lengths, seq_k):
    """(B, Sk) bool, True past each sequence's length (a padding key)."""
    return torch.arange(seq_k, device=DEVICE)[None, :] >= torch.tensor(lengths, device=DEVICE)[:, None]


def forward_backward(backend, q, k, v, grad_out, **kwargs):
    """(out, dq, dk, dv) of ``attention`` with ``backend`` on leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = call_or_skip(attention, *leaves, backend=backend, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return (out, *(t.grad for t in leaves))


def assert_matches_reference(backend, q, k, v, what, **kwargs):
    """Forward and dq, dk, dv of ``backend`` in q's dtype vs the reference in float64."""
    dtype = q.dtype
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    actual = forward_backward(backend, q, k, v, grad_out, **kwargs)
    expected = forward_backward("reference", q.double(), k.double(), v.double(), grad_out.double(), **kwargs)
    for name, got, want in zip(("out", "dq", "dk", "dv"), actual, expected):
        # atol grows with the magnitude of the quantity (gradients summed over a group are larger).
        magnitude = max(1.0, want.abs().max().item())
        assert_close_to_reference(got, want, dtype, kind="forward" if name == "out" else "grad", scale=magnitude,
                                  what=f"{what} {name}")


# (batch, Hq, Hkv, Sq, Sk, D, causal, key lengths or None): each feature alone, then combined.
CASES = {
    "plain": (1, 1, 1, 17, 17, 16, False, None),
    "length_1": (1, 1, 1, 1, 1, 16, False, None),
    "one_query_many_keys": (1, 2, 2, 1, 33, 16, False, None),
    "head_dim_40": (1, 2, 2, 17, 17, 40, False, None),
    "head_dim_160": (1, 1, 1, 17, 5, 160, False, None),
    "head_dim_256": (1, 1, 1, 5, 17, 256, False, None),
    "causal": (1, 2, 2, 33, 33, 16, True, None),
    "causal_sq_gt_sk": (1, 1, 1, 33, 17, 16, True, None),
    "causal_sq_lt_sk": (1, 1, 1, 17, 33, 16, True, None),
    "key_padding": (2, 2, 2, 17, 33, 16, False, [33, 9]),
    "gqa": (1, 4, 2, 17, 17, 16, False, None),
    "mqa": (1, 3, 1, 17, 33, 16, False, None),
    "length_129_causal": (1, 1, 1, 129, 129, 16, True, None),
    "combined": (2, 4, 2, 33, 17, 40, True, [17, 6]),
    "combined_sq_lt_sk": (2, 4, 1, 17, 33, 40, True, [33, 20]),
}


def _case_inputs(case, dtype):
    batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, causal, lengths = CASES[case]
    q, k, v = make_inputs(batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, dtype)
    mask = padding_mask(lengths, seq_k) if lengths is not None else None
    return q, k, v, dict(causal=causal, key_padding_mask=mask)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    q, k, v, kwargs = _case_inputs(case, torch.float32)
    assert_matches_reference(backend, q, k, v, case, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matches_reference_half_precision(backend, dtype):
    q, k, v, kwargs = _case_inputs("combined", dtype)
    assert_matches_reference(backend, q, k, v, "combined", **kwargs)


@pytest.mark.parametrize("scale", [None, 0.3, -0.3])
def test_explicit_scale_and_large_scores(backend, scale):
    # Scores of magnitude ~100: the online softmax must rescale, not overflow.
    q, k, v = make_inputs(1, 2, 1, 17, 33, 16, torch.float32)
    assert_matches_reference(backend, q * 6, k * 6, v, f"scale={scale}", causal=True, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_negative_scale_half_precision(backend, dtype):
    # The sign of a negative scale moves onto q inside the kernels: in 16-bit types too.
    q, k, v = make_inputs(1, 2, 1, 17, 33, 16, dtype)
    assert_matches_reference(backend, q, k, v, f"scale=-0.3 {dtype}", causal=True, scale=-0.3)


def test_fully_masked_rows_give_zeros(backend):
    # Batch 1 pads every key; batch 0 pads key 0, so under causal its query 0 sees nothing.
    q, k, v = make_inputs(2, 2, 1, 17, 17, 16, torch.float32)
    mask = torch.zeros(2, 17, dtype=torch.bool, device=DEVICE)
    mask[1] = True
    mask[0, 0] = True
    grad_out = torch.randn(q.shape, device=DEVICE)
    out, dq, dk, dv = forward_backward(backend, q, k, v, grad_out, causal=True, key_padding_mask=mask)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"NaN in {name}"
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dq[0, :, 0], torch.zeros_like(dq[0, :, 0]))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    _, lse = call_or_skip(attention, q, k, v, causal=True, key_padding_mask=mask, return_lse=True, backend=backend)
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, 0]).all()
    assert torch.isfinite(lse[0, :, 1:]).all()
    assert_matches_reference(backend, q, k, v, "fully masked", causal=True, key_padding_mask=mask)


@pytest.mark.parametrize("empty", ["no_keys", "no_queries", "no_batch"])
def test_empty_dimensions(backend, empty):
    # No keys at all is the limit of a fully masked row: zeros, lse -inf, zero dq; empty
    # batches or queries give empty results and empty gradients, not an error.
    shape = dict(no_keys=(1, 2, 2, 5, 0), no_queries=(1, 2, 2, 0, 5), no_batch=(0, 2, 2, 5, 5))[empty]
    q, k, v = make_inputs(*shape, 16, torch.float32)
    out, dq, dk, dv = forward_backward(backend, q, k, v, torch.ones(q.shape, device=DEVICE), causal=True)
    assert out.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    if empty == "no_keys":
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dq, torch.zeros_like(dq))
        _, lse = call_or_skip(attention, q, k, v, return_lse=True, backend=backend)
        assert lse.shape == q.shape[:3] and torch.isneginf(lse).all()


def test_backward_is_deterministic(backend):
    # No atomics whose order changes the result: the same inputs give bitwise the same gradients.
    # (Atomic dQ on a GPU adds in a varying order: only its dq may differ.)
    q, k, v, kwargs = _case_inputs("gqa", torch.float32)  # dk, dv summed over the query group
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    first = forward_backward(backend, q, k, v, grad_out, **kwargs)
    second = forward_backward(backend, q, k, v, grad_out, **kwargs)
    atomic_on_gpu = ON_GPU and backend == "triton:atomic_dq"
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        if not (atomic_on_gpu and name == "dq"):
            assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_deterministic_backward_is_bitwise_reproducible(backend):
    # deterministic=True: every backend, every variant that can honour it, gives bitwise the same
    # gradients twice (the CUDA backend's Hopper kernels then take their two-pass dQ).
    q, k, v, kwargs = _case_inputs("gqa", torch.float32)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    if backend == "triton:atomic_dq":
        with pytest.raises(ValueError, match="argument 'deterministic' is True"):
            forward_backward(backend, q, k, v, grad_out, deterministic=True, **kwargs)
        return
    first = forward_backward(backend, q, k, v, grad_out, deterministic=True, **kwargs)
    second = forward_backward(backend, q, k, v, grad_out, deterministic=True, **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical deterministic runs"


def test_return_lse(backend):
    q, k, v, kwargs = _case_inputs("combined", torch.float32)
    q.requires_grad_()
    out, lse = call_or_skip(attention, q, k, v, return_lse=True, backend=backend, **kwargs)
    out64, lse64 = attention(q.double(), k.double(), v.double(), return_lse=True, backend="reference", **kwargs)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and not lse.requires_grad
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))
    finite = torch.isfinite(lse64)
    assert_close_to_reference(lse[finite], lse64[finite], torch.float32, what="lse")
    assert_close_to_reference(out, out64, torch.float32, what="out with return_lse")


def test_non_contiguous_inputs(backend):
    # q, k, v split from a fused QKV projection (B, S, 3, H, D) and transposed: strided views.
    qkv = torch.randn(2, 33, 3, 2, 40, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    assert_matches_reference(backend, q, k, v, "non-contiguous", causal=True,
                             key_padding_mask=padding_mask([33, 12], 33))


def test_expanded_grad_out(backend):
    # out.sum().backward() hands the backward a zero-stride (expanded) gradient.
    q, k, v, kwargs = _case_inputs("gqa", torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    call_or_skip(attention, *leaves, backend=backend, **kwargs).sum().backward()
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention(*leaves64, backend="reference", **kwargs).sum().backward()
    for name, got, want in zip(("dq", "dk", "dv"), leaves, leaves64):
        magnitude = max(1.0, want.grad.abs().max().item())
        assert_close_to_reference(got.grad, want.grad, torch.float32, "grad", scale=magnitude,
                                  what=f"expanded grad_out {name}")


# ---------------------------------------------------------------------------------------
# Causal alignment, sliding windows and soft-capping
# ---------------------------------------------------------------------------------------

# (batch, Hq, Hkv, Sq, Sk, D, mask kwargs, key lengths or None). Lengths cross the interpreter's
# 16-wide blocks, so whole key blocks are skipped and the band's edges cut through blocks.
MASK_CASES = {
    "bottom_right_sq_lt_sk": (1, 2, 1, 17, 50, 16, dict(causal=True, alignment="bottom_right"), None),
    "bottom_right_sq_gt_sk": (1, 2, 2, 50, 17, 16, dict(causal=True, alignment="bottom_right"), None),
    "decode_one_query": (2, 2, 1, 1, 33, 16, dict(causal=True, alignment="bottom_right"), None),
    "window_symmetric": (1, 2, 2, 65, 65, 16, dict(window=(7, 5)), None),
    "window_causal_top_left": (1, 2, 1, 50, 65, 16, dict(causal=True, window=(9, -1)), None),
    "window_causal_bottom_right": (1, 2, 1, 33, 80, 40, dict(causal=True, alignment="bottom_right", window=(20, 0)),
                                   None),
    "window_left_only_bottom_right": (1, 1, 1, 70, 33, 16, dict(alignment="bottom_right", window=(3, -1)), None),
    "window_right_only": (1, 1, 1, 33, 33, 16, dict(window=(-1, 2)), None),
    "window_zero": (1, 1, 1, 33, 33, 16, dict(window=(0, 0)), None),
    "softcap": (1, 2, 1, 33, 50, 16, dict(softcap=2.5), None),
    "softcap_causal_window_padding": (2, 4, 2, 33, 50, 40, dict(causal=True, alignment="bottom_right",
                                                                window=(25, 0), softcap=5.0), [50, 30]),
}


def _mask_case(case, dtype=torch.float32):
    batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, mask_kwargs, lengths = MASK_CASES[case]
    q, k, v = make_inputs(batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, dtype, seed=2)
    # Scores of magnitude ~10, so soft-capping bends them (tanh far from linear).
    q = q * 3
    mask = padding_mask(lengths, seq_k) if lengths is not None else None
    return q, k, v, dict(mask_kwargs, key_padding_mask=mask)


def _table_tiles(index, bucket, **tables):
    """``{kernel name: (BLOCK_M, BLOCK_N)}`` at ``index`` of each named autotune table's bucket."""

    def tile(table):
        chosen = table[bucket][min(index, len(table[bucket]) - 1)]
        return chosen.kwargs["BLOCK_M"], chosen.kwargs["BLOCK_N"]

    return {name: tile(table) for name, table in tables.items()}


def _tables(fp32=False):
    """The split backward's three kernels and their 16-bit (or fp32) autotune tables."""
    from tformer.kernels import attention as fwd, attention_bwd as bwd

    if fp32:
        return dict(_attention_fwd_kernel=fwd.FWD_CONFIGS_FP32, _dkdv_kernel=bwd.DKDV_CONFIGS_FP32,
                    _dq_kernel=bwd.DQ_CONFIGS_FP32)
    return dict(_attention_fwd_kernel=fwd.FWD_CONFIGS, _dkdv_kernel=bwd.DKDV_CONFIGS, _dq_kernel=bwd.DQ_CONFIGS)


# Head dims in each bucket's range but none a bucket's own, so the head-dim lanes are masked too.
_BUCKET_HEAD_DIMS = {64: 40, 128: 80, 256: 136}


@pytest.mark.skipif(ON_GPU, reason="runs the GPU tables' tiles under the interpreter; a GPU runs the tables themselves")
@requires_backend("triton")
@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("bucket", [64, 128, 256])
def test_kernels_at_the_tables_tile_shapes(bucket, index):
    """The interpreter runs 16x16 tiles (INTERPRETER_BLOCKS), square ones; the GPU runs the
    autotune tables' (128x64, 32x128, 16x64, ...). The forward, dK/dV (split and atomic dQ) and
    dQ kernels run here at each table entry's tile shape, against float64, with a window that
    cuts blocks on both sides, bottom-right alignment, soft-capping and a hole in the padding,
    at lengths a multiple of no tile."""
    from tformer.kernels.attention_bwd import DKDV_ATOMIC_DQ_CONFIGS
    from tformer.kernels.launch import interpreter_tiles

    q, k, v = make_inputs(1, 2, 1, 150, 290, _BUCKET_HEAD_DIMS[bucket], torch.float16, seed=3)
    mask = padding_mask([271], 290)
    mask[0, 200] = True
    kwargs = dict(causal=True, alignment="bottom_right", window=(70, 0), softcap=5.0, key_padding_mask=mask)
    tiles = _table_tiles(index, bucket, **_tables())
    atomic_tiles = _table_tiles(index, bucket, _dkdv_kernel=DKDV_ATOMIC_DQ_CONFIGS)
    with interpreter_tiles(**tiles):
        assert_matches_reference("triton", q * 3, k, v, f"tiles {tiles}", **kwargs)
        with interpreter_tiles(**atomic_tiles):
            assert_matches_reference("triton:atomic_dq", q * 3, k, v, f"atomic dQ tiles {atomic_tiles}", **kwargs)
    fp32_tiles = _table_tiles(index, bucket, **_tables(fp32=True))
    with interpreter_tiles(**fp32_tiles):
        assert_matches_reference("triton", (q * 3).float(), k.float(), v.float(), f"fp32 tiles {fp32_tiles}", **kwargs)


def band_by_hand(seq_q, seq_k, causal=False, alignment="top_left", window=None):
    """FlashAttention's attention_ref rule, written independently: (Sq, Sk) bool, True = attend."""
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    offset = seq_k - seq_q if alignment == "bottom_right" else 0
    allowed = torch.ones(seq_q, seq_k, dtype=torch.bool)
    for i in range(seq_q):
        for j in range(seq_k):
            if right >= 0 and j > i + offset + right:
                allowed[i, j] = False
            if left >= 0 and j < i + offset - left:
                allowed[i, j] = False
    return allowed


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_masks_match_reference(backend, case):
    q, k, v, kwargs = _mask_case(case)
    assert_matches_reference(backend, q, k, v, case, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_masks_half_precision(backend, dtype):
    q, k, v, kwargs = _mask_case("softcap_causal_window_padding", dtype)
    assert_matches_reference(backend, q, k, v, f"masks {dtype}", **kwargs)


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_reference_masks_follow_the_rule(case):
    """The float64 reference against the rule written out loop by loop and soft-capping written
    out: what every backend above is compared with is itself right."""
    q, k, v, kwargs = _mask_case(case, torch.float64)
    padding = kwargs.pop("key_padding_mask")
    softcap = kwargs.pop("softcap", 0.0)
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = band_by_hand(q.shape[2], k.shape[2], **kwargs).to(DEVICE)[None, None]
    if padding is not None:
        allowed = allowed & ~padding[:, None, None, :]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    expected = weights @ v.repeat_interleave(group, 1)
    got = attention(q, k, v, backend="reference", key_padding_mask=padding, softcap=softcap, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    from tformer.backends.reference.attention import attention_weights

    probs = attention_weights(q, k, key_padding_mask=padding, softcap=softcap, **kwargs)
    torch.testing.assert_close(probs, weights, atol=1e-12, rtol=1e-12)


def test_bottom_right_decoding_sees_every_cached_key(backend):
    # One new query after a 32-token cache sees all 33 keys (top-left would see only key 0).
    q, k, v = make_inputs(1, 2, 2, 1, 33, 16, torch.float32)
    got = call_or_skip(attention, q, k, v, causal=True, alignment="bottom_right", backend=backend)
    full = attention(q, k, v, backend="reference")
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    top_left = attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(top_left, v[:, :, :1].expand_as(top_left), atol=1e-6, rtol=1e-6)


def test_bottom_right_rows_without_keys_are_zero(backend):
    # Sq > Sk: the first Sq - Sk queries precede every key; zeros, lse -inf, zero gradients.
    q, k, v = make_inputs(1, 2, 1, 40, 17, 16, torch.float32)
    grad_out = torch.randn(q.shape, device=DEVICE)
    out, dq, _, _ = forward_backward(backend, q, k, v, grad_out, causal=True, alignment="bottom_right")
    assert torch.equal(out[:, :, :23], torch.zeros_like(out[:, :, :23]))
    assert torch.equal(dq[:, :, :23], torch.zeros_like(dq[:, :, :23]))
    assert out[:, :, 23:].abs().sum() > 0
    _, lse = call_or_skip(attention, q, k, v, causal=True, alignment="bottom_right", return_lse=True,
                          backend=backend)
    assert torch.isneginf(lse[:, :, :23]).all() and torch.isfinite(lse[:, :, 23:]).all()


@requires_backend("triton")
def test_triton_skips_key_blocks_outside_the_band():
    # NaN values in key blocks no query of a block may attend: a kernel that loaded them and
    # only masked the scores would compute 0 * NaN = NaN; one that skips them never reads them.
    # (The interpreter's blocks are 16 wide; a window of 0 keeps each query block on its diagonal.)
    q, k, v = make_inputs(1, 1, 1, 64, 64, 16, torch.float32)
    v[:, :, 32:] = float("nan")
    k[:, :, 32:] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, window=(0, 0), backend="triton")
    assert torch.isfinite(out[:, :, :32]).all() and torch.isnan(out[:, :, 32:]).all()
    out[:, :, :32].sum().backward()
    assert torch.isfinite(leaves[0].grad[:, :, :32]).all()
    assert torch.isfinite(leaves[1].grad[:, :, :32]).all() and torch.isfinite(leaves[2].grad[:, :, :32]).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(causal="bottom_right"), TypeError, "argument 'causal' must be a bool.*alignment='bottom_right'"),
    (dict(causal=1), TypeError, "argument 'causal' must be a bool, got 1"),
    (dict(causal=True, alignment="bottom-right"), ValueError, "argument 'alignment' must be one of"),
    (dict(window=5), TypeError, "argument 'window' must be None or a pair"),
    (dict(window=(2, -3)), ValueError, "argument 'window' bounds must be >= 0, or -1"),
    (dict(window=(2, 3), causal=True), ValueError, "argument 'window' has right bound 3"),
    (dict(softcap=-1.0), ValueError, "argument 'softcap' must be a finite float >= 0"),
    (dict(softcap=float("inf")), ValueError, "argument 'softcap'"),
], ids=["causal_string", "causal_int", "alignment_typo", "window_int", "window_negative", "window_right_causal",
        "softcap_negative", "softcap_inf"])
def test_mask_argument_errors(kwargs, error, match):
    q, k, v = make_inputs(1, 1, 1, 3, 3, 8, torch.float32)
    with pytest.raises(error, match=match):
        attention(q, k, v, backend="reference", **kwargs)
    with pytest.raises(error, match=match):
        attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                         torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), 3, 3,
                         backend="reference", **kwargs)


# ---------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------

DROPOUT_SHAPE = (2, 4, 2, 33, 17, 40)  # Sk <= D, so v = identity reveals the dropped probabilities


def _dropout_call(backend, q, k, v, seed, p=0.3, **kwargs):
    torch.manual_seed(seed)
    return call_or_skip(attention, q, k, v, dropout_p=p, backend=backend, **kwargs)


def test_dropout_same_seed_same_result_and_seed_matters(backend):
    q, k, v = make_inputs(*DROPOUT_SHAPE, torch.float32)
    first = _dropout_call(backend, q, k, v, seed=7)
    assert torch.equal(first, _dropout_call(backend, q, k, v, seed=7))
    assert not torch.equal(first, _dropout_call(backend, q, k, v, seed=8))
    no_dropout = call_or_skip(attention, q, k, v, backend=backend)
    assert torch.equal(no_dropout, _dropout_call(backend, q, k, v, seed=7, p=0.0))


def test_dropout_keeps_expectation(backend):
    # With v = 1 every output is sum_j P_ij keep_ij / (1 - p): 1 on average.
    q, k, _ = make_inputs(*DROPOUT_SHAPE, torch.float32)
    ones = torch.ones_like(k)
    p = 0.3
    out = _dropout_call(backend, q, k, ones, seed=11, p=p)
    assert abs(out.mean().item() - 1.0) < 0.05
    probs = _dropout_call(backend, q, k, _identity_values(k), seed=11, p=p)[..., :k.shape[2]]
    dropped = (probs == 0).double().mean().item()
    assert abs(dropped - p) < 0.03, f"fraction dropped {dropped}, expected {p}"


def _identity_values(k):
    eye = torch.zeros_like(k)
    idx = torch.arange(k.shape[2])
    eye[:, :, idx, idx] = 1.0
    return eye


def test_dropout_gradients_use_the_forward_mask(backend):
    """Read the kept mask through v = identity, then check forward and gradients of a second
    call with the same seed against float64 math that applies that mask explicitly."""
    p = 0.3
    q, k, v = make_inputs(*DROPOUT_SHAPE, torch.float32)
    mask = torch.zeros(2, 17, dtype=torch.bool, device=DEVICE)
    mask[1, 10:] = True
    kwargs = dict(causal=True, key_padding_mask=mask)
    kept = _dropout_call(backend, q, k, _identity_values(k), seed=5, p=p, **kwargs)[..., :k.shape[2]] != 0

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = _dropout_call(backend, *leaves, seed=5, p=p, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out.backward(grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    scores = q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    allowed = torch.ones(33, 17, dtype=torch.bool, device=DEVICE).tril()[None, None] & ~mask[:, None, None, :]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) * kept / (1 - p)
    out64 = weights @ v64.repeat_interleave(group, 1)
    out64.backward(grad_out.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)),
                               (out64, q64.grad, k64.grad, v64.grad)):
        kind = "forward" if name == "out" else "grad"
        assert_close_to_reference(got, want, torch.float32, kind, scale=max(1.0, want.abs().max().item()),
                                  what=f"dropout {name}")


# ---------------------------------------------------------------------------------------
# Packed variable-length sequences
# ---------------------------------------------------------------------------------------

def _packed(lengths_q, lengths_k, num_heads, num_kv_heads, head_dim, dtype):
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lengths_q), num_heads, head_dim, generator=generator).to(DEVICE, dtype)
    k = torch.randn(sum(lengths_k), num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    v = torch.randn(sum(lengths_k), num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    return q, k, v, cu(lengths_q), cu(lengths_k)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_reference_and_padded_batch(backend, causal):
    lengths_q, lengths_k = [1, 17, 5], [3, 17, 9]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 2, 40, torch.float32)
    kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k),
                  causal=causal)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = call_or_skip(attention_varlen, *leaves, backend=backend, return_lse=True, **kwargs)
    out.backward(grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = attention_varlen(*leaves64, backend="reference", return_lse=True, **kwargs)
    out64.backward(grad_out.double())
    assert_close_to_reference(out, out64, torch.float32, what="varlen out")
    assert_close_to_reference(lse, lse64, torch.float32, what="varlen lse")
    for name, got, want in zip(("dq", "dk", "dv"), leaves, leaves64):
        assert_close_to_reference(got.grad, want.grad, torch.float32, "grad", what=f"varlen {name}")

    # The same sequences as a padded batch with a key padding mask give the same valid rows.
    batch = len(lengths_q)
    padded = [torch.zeros(batch, t.shape[1], max(lens), t.shape[2], device=DEVICE)
              for t, lens in ((q, lengths_q), (k, lengths_k), (v, lengths_k))]
    for i in range(batch):
        for t, packed, cu in ((padded[0], q, cu_q), (padded[1], k, cu_k), (padded[2], v, cu_k)):
            t[i, :, :cu[i + 1] - cu[i]] = packed[cu[i]:cu[i + 1]].transpose(0, 1)
    out_padded = call_or_skip(attention, *padded, causal=causal, key_padding_mask=padding_mask(lengths_k, max(lengths_k)),
                       backend=backend)
    for i in range(batch):
        torch.testing.assert_close(out[cu_q[i]:cu_q[i + 1]], out_padded[i, :, :lengths_q[i]].transpose(0, 1),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask_kwargs", [dict(causal=True, alignment="bottom_right"),
                                         dict(causal=True, alignment="bottom_right", window=(4, 0), softcap=3.0),
                                         dict(window=(2, 6))], ids=["bottom_right", "window_softcap", "window"])
def test_varlen_masks_use_each_sequences_lengths(backend, mask_kwargs):
    # Unequal lengths, Sq > Sk and Sq < Sk in one pack, and 5 spare tokens after cu_seqlens[-1]
    # that must be left alone (zero output, zero gradient); max_seqlen as NumPy integers.
    import numpy as np

    lengths_q, lengths_k = [1, 20, 9, 5], [17, 3, 9, 40]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 2, 16, torch.float32)
    q, k, v = (torch.cat([t, torch.randn((5, *t.shape[1:]), device=DEVICE)]) for t in (q, k, v))
    kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=np.int64(max(lengths_q)),
                  max_seqlen_k=np.int64(max(lengths_k)), **mask_kwargs)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def run(backend, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out, lse = call_or_skip(attention_varlen, *leaves, backend=backend, return_lse=True, **kwargs)
        out.backward(grad_out.to(out.dtype))
        return (out, lse, *(t.grad for t in leaves))

    got = run(backend, (q, k, v))
    expected = run("reference", (q.double(), k.double(), v.double()))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), name
        assert_close_to_reference(a[finite], b[finite], torch.float32, "forward" if name in ("out", "lse") else "grad",
                                  what=f"varlen {name}")
    out, lse, dq, dk, dv = got
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t[-5:], torch.zeros_like(t[-5:])), f"spare tokens' {name}"
    assert torch.isneginf(lse[:, -5:]).all()
    # Each sequence alone through the padded API gives the same rows (its own Sq, Sk align it).
    for i in range(len(lengths_q)):
        qi, ki, vi = (t[cu[i]:cu[i + 1]].transpose(0, 1)[None] for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k)))
        alone = call_or_skip(attention, qi, ki, vi, backend=backend, **mask_kwargs)
        torch.testing.assert_close(out[cu_q[i]:cu_q[i + 1]], alone[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(ON_GPU, reason="runs the GPU tables' tiles under the interpreter; a GPU runs the tables themselves")
@requires_backend("triton")
@pytest.mark.parametrize("bucket", [64, 128, 256])
def test_varlen_at_the_tables_leading_tile_shapes(bucket):
    # Packed sequences at the leading 16-bit table entries' tiles (see
    # test_kernels_at_the_tables_tile_shapes): each sequence's own block count and band, Sq > Sk
    # and Sq < Sk in one pack, one query alone.
    from tformer.kernels.launch import interpreter_tiles

    lengths_q, lengths_k = [150, 1, 97], [290, 40, 61]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 2, 1, _BUCKET_HEAD_DIMS[bucket], torch.float16)
    kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k),
                  causal=True, alignment="bottom_right", window=(70, 0), softcap=5.0)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def run(backend, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = attention_varlen(*leaves, backend=backend, **kwargs)
        out.backward(grad_out.to(out.dtype))
        return (out, *(t.grad for t in leaves))

    tiles = _table_tiles(0, bucket, **_tables())
    with interpreter_tiles(**tiles):
        got = run("triton", (q, k, v))
    expected = run("reference", (q.double(), k.double(), v.double()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert_close_to_reference(a, b, torch.float16, "forward" if name == "out" else "grad",
                                  scale=max(1.0, b.abs().max().item()), what=f"varlen tiles {tiles} {name}")


def test_varlen_refuses_offsets_past_the_tokens():
    q, k, v, cu_q, cu_k = _packed([3, 4], [3, 4], 1, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="argument 'cu_seqlens_q' must start at 0, never decrease and end at most"):
        attention_varlen(q[:5], k, v, cu_q, cu_k, 4, 4, backend="reference")
    with pytest.raises(ValueError, match="argument 'max_seqlen_k' must be a non-negative int, got 4.0"):
        attention_varlen(q, k, v, cu_q, cu_k, 4, 4.0, backend="reference")


# ---------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------

def test_compile_fullgraph(backend):
    # On the CPU inductor would compile the surrounding graph with a C++ toolchain for little
    # gain; aot_eager still traces through the custom op's fake implementation and autograd.
    compile_backend = "inductor" if ON_GPU else "aot_eager"
    q, k, v, kwargs = _case_inputs("combined", torch.float32)

    def step(q, k, v):
        return attention(q, k, v, backend=backend, **kwargs)

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    grad_out = torch.randn(q.shape, device=DEVICE)
    eager = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    traced = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_eager = call_or_skip(step, *eager)
    out_eager.backward(grad_out)
    out_traced = compiled(*traced)
    out_traced.backward(grad_out)
    torch.testing.assert_close(out_traced, out_eager, atol=1e-6, rtol=1e-6)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_compile_fullgraph_with_masks(backend):
    # The band and soft-capping travel through the custom ops' schemas and fake implementations.
    q, k, v, kwargs = _mask_case("softcap_causal_window_padding")

    def step(q, k, v):
        return attention(q, k, v, backend=backend, **kwargs)

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    eager = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    traced = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_eager = call_or_skip(step, *eager)
    out_eager.sum().backward()
    out_traced = compiled(*traced)
    out_traced.sum().backward()
    torch.testing.assert_close(out_traced, out_eager, atol=1e-6, rtol=1e-6)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# GPU-only sizes (too slow for the interpreter)
# ---------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("seq", [(129, 129), (1000, 1000), (1000, 129), (129, 1000)], ids=str)
def test_matches_reference_gpu_sizes(backend, seq, head_dim):
    seq_q, seq_k = seq
    q, k, v = make_inputs(2, 4, 2, seq_q, seq_k, head_dim, torch.bfloat16)
    mask = padding_mask([seq_k, seq_k // 2], seq_k)
    assert_matches_reference(backend, q, k, v, f"S={seq} D={head_dim}", causal=True, key_padding_mask=mask)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_matches_reference_gpu_dtypes(backend, dtype):
    q, k, v = make_inputs(2, 8, 2, 257, 300, 96, dtype)
    assert_matches_reference(backend, q, k, v, "gpu dtype", causal=True)


# ---------------------------------------------------------------------------------------
# The reference itself: against PyTorch's SDPA in float64, and gradcheck
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [(17, 17), (33, 17), (17, 33)], ids=str)
def test_reference_matches_sdpa(causal, seq):
    q, k, v = make_inputs(2, 4, 2, *seq, 40, torch.float64)
    mask = padding_mask([seq[1], seq[1] - 3], seq[1])  # no row fully masked: SDPA would give NaN
    ours = attention(q, k, v, causal=causal, key_padding_mask=mask, backend="reference")
    allowed = ~mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(*seq, dtype=torch.bool, device=DEVICE).tril()
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    if causal:
        plain = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(attention(q, k, v, causal=True, backend="reference"), plain, atol=1e-12,
                                   rtol=1e-12)


@pytest.mark.parametrize("seq_q, seq_k, lengths", [(5, 7, [5]), (7, 4, [3, 0])], ids=["sq<sk", "sq>sk-all-padded-row"])
def test_reference_gradcheck(seq_q, seq_k, lengths):
    # Causal + padding + grouped-query, with q_len != k_len both ways and a batch row whose keys
    # are all padding (its outputs are zeros and its gradients must be zeros, not NaN).
    q, k, v = (t.requires_grad_() for t in make_inputs(len(lengths), 2, 1, seq_q, seq_k, 8, torch.float64))
    mask = padding_mask(lengths, seq_k)

    def fn(q, k, v):
        return attention(q, k, v, causal=True, key_padding_mask=mask, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v))


# Lowers every autotune candidate of the attention kernels (16-bit inputs, causal; grouped-query
# dK/dV expanded; padding + GQA + dropout at hd 128), specialized as a launch specializes them,
# and every row-kernel block config for an H100 (sm_90) with Triton's bundled ptxas, so a machine
# without a GPU still proves they compile to GPU code within a block's 227 KiB of shared memory.
# The forward's K/V loads must be pipelined (cp.async), which only the specialized kernel shows.
# (Spills are judged by `python -m bench.compile_audit` with the GPU's Triton: they differ
# between releases, and the candidates are chosen for the one the GPU runs.)
_COMPILE_FOR_SM90 = """
from bench.compile_audit import H100_SHARED_BYTES, attention_cases, audit, row_cases

cases = [case for case in attention_cases(("bf16",))
         if case.variant.endswith(" causal") or (case.kernel.endswith("expanded") and "gqa-causal" in case.variant)
         or case.variant == "hd 128 bf16 padding-gqa-dropout"]
rows = audit(None, ("bf16",), cases=cases + list(row_cases(("bf16",))))
failed = [row for row in rows if row.error or row.shared_bytes > H100_SHARED_BYTES]
assert len(rows) >= 88 and not failed, failed
unpipelined = [row for row in rows if row.kernel == "attention_fwd" and not row.cp_async]
assert not unpipelined, unpipelined
print("compiled", len(rows))

# A sliding window aligned bottom-right with soft-capping: the forward, dK/dV and dQ kernels.
from bench.compile_audit import attention_launches, lower_launch, measure
from tformer.ops.attention_mask import Band

masked = attention_launches("bf16", 128, ("gqa-causal", True, False, False, False, 16, 4),
                            mask=dict(band=Band(5, 0, True), softcap=30.0))
for name, kernel, tuned, args, meta in masked[:3]:
    assert meta["HAS_BAND"] and meta["BOTTOM_RIGHT"] and meta["HAS_SOFTCAP"], meta
    config = tuned.first_config(meta)
    stats = measure(lower_launch(kernel, args, {**meta, **config.kwargs}, config.num_warps, config.num_stages))
    assert stats["shared_bytes"] <= H100_SHARED_BYTES and stats["wgmma"], (name, stats)
print("compiled masked", len(masked[:3]))
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled and run by every test above")
def test_triton_kernels_compile_for_sm90():
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "compiled masked 3" in result.stdout, result.stderr[-3000:]


def test_autotune_off_runs_the_leading_candidate(monkeypatch):
    from tformer.kernels import attention as fwd, attention_bwd as bwd, launch

    for tuned, table, fp32_table in ((fwd._attention_fwd_tuned, fwd.FWD_CONFIGS, fwd.FWD_CONFIGS_FP32),
                                     (bwd._dq_tuned, bwd.DQ_CONFIGS, bwd.DQ_CONFIGS_FP32)):
        assert tuned.first_config(dict(BLOCK_D=128, DOT_PRECISION="tf32")) is table[128][0]
        assert tuned.first_config(dict(BLOCK_D=32, DOT_PRECISION="ieee")) is fp32_table[64][0]
    from tformer.ops import overrides

    monkeypatch.delenv("TFORMER_AUTOTUNE", raising=False)
    assert overrides.kernel_options("triton", "attention")["autotune"]
    monkeypatch.setenv("TFORMER_AUTOTUNE", "0")
    assert not overrides.kernel_options("triton", "attention")["autotune"]


def test_autotune_pruning_picks_the_bucket_and_precision():
    from tformer.kernels import attention as fwd, attention_bwd as bwd, attention_tiles, launch

    for table, fp32_table in ((fwd.FWD_CONFIGS, fwd.FWD_CONFIGS_FP32), (bwd.DKDV_CONFIGS, bwd.DKDV_CONFIGS_FP32),
                              (bwd.DQ_CONFIGS, bwd.DQ_CONFIGS_FP32)):
        for head_dim, bucket in ((16, 64), (64, 64), (80, 128), (128, 128), (160, 256), (256, 256)):
            block_d = attention_tiles.block_d(head_dim)
            assert launch.configs_for_call(table, fp32_table, None, None, BLOCK_D=block_d,
                                           DOT_PRECISION="tf32") is table[bucket]
            assert launch.configs_for_call(table, fp32_table, None, None, BLOCK_D=block_d,
                                           DOT_PRECISION="ieee") is fp32_table[bucket]
            # The dK/dV pass with atomic dQ prunes to its own 16-bit table.
            assert bwd._dkdv_tuned.candidates(dict(BLOCK_D=block_d, DOT_PRECISION="tf32", ATOMIC_DQ=True)) is \
                bwd.DKDV_ATOMIC_DQ_CONFIGS[bucket]
            assert bwd._dkdv_tuned.candidates(dict(BLOCK_D=block_d, DOT_PRECISION="ieee", ATOMIC_DQ=True)) is \
                bwd.DKDV_CONFIGS_FP32[bucket]
            assert bwd._dkdv_tuned.candidates(dict(BLOCK_D=block_d, DOT_PRECISION="tf32", ATOMIC_DQ=False)) is \
                bwd.DKDV_CONFIGS[bucket]


@requires_backend("triton")
def test_triton_refuses_head_dim_over_256():
    q = torch.zeros(1, 1, 2, 264, device=DEVICE)
    with pytest.raises(tformer.BackendError, match="head dims up to 256"):
        attention(q, q, q, backend="triton")


# ---------------------------------------------------------------------------------------
# Triton dK/dV for grouped-query attention, expanded: one program per query head writes float32
# partials that are summed over the group afterwards. On a GPU ``dkdv_expanded`` picks it for
# launches with few programs; on the CPU it never does, so these tests force it.
# ---------------------------------------------------------------------------------------

@pytest.fixture
def expanded_dkdv(monkeypatch):
    """Forces the expanded path; returns the list of the heuristic's arguments, one per backward."""
    from tformer.kernels import attention_bwd

    asked = []

    def always_expanded(grouped_programs, group_size, expanded_bytes, sm_count):
        asked.append((grouped_programs, group_size, expanded_bytes, sm_count))
        return True

    monkeypatch.setattr(attention_bwd, "dkdv_expanded", always_expanded)
    return asked


def _assert_deterministic_and_close(first, second, expected, dtype, what):
    """Two runs of the same backward are bitwise equal, and the first matches float64."""
    for name, a, b, want in zip(("out", "dq", "dk", "dv"), first, second, expected):
        assert torch.equal(a, b), f"{what} {name} differs between two identical runs"
        assert_close_to_reference(a, want, dtype, kind="forward" if name == "out" else "grad",
                                  scale=max(1.0, want.abs().max().item()), what=f"{what} {name}")


# (Hq, Hkv, causal, key lengths or None, dtype); Sq = 17, Sk = 33; key length 0 pads a whole batch row.
EXPANDED_CASES = {
    "gqa_padding_all_padded_row": (4, 2, False, [20, 0], torch.float32),
    "gqa_causal": (4, 2, True, None, torch.float32),
    "mqa": (4, 1, False, None, torch.float32),
    "mqa_causal_padding_all_padded_row": (4, 1, True, [33, 0], torch.float32),
    "mqa_causal_fp16": (4, 1, True, None, torch.float16),
}


@requires_backend("triton")
@pytest.mark.parametrize("case", list(EXPANDED_CASES))
def test_triton_expanded_dkdv_matches_reference_deterministically(expanded_dkdv, case):
    num_heads, num_kv_heads, causal, lengths, dtype = EXPANDED_CASES[case]
    q, k, v = make_inputs(2, num_heads, num_kv_heads, 17, 33, 16, dtype)
    kwargs = dict(causal=causal, key_padding_mask=padding_mask(lengths, 33) if lengths else None)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    first = forward_backward("triton", q, k, v, grad_out, **kwargs)
    second = forward_backward("triton", q, k, v, grad_out, **kwargs)
    expected = forward_backward("reference", q.double(), k.double(), v.double(), grad_out.double(), **kwargs)
    _assert_deterministic_and_close(first, second, expected, dtype, f"expanded {case}")
    # The launcher asked the heuristic (so the forced answer was used) with this problem's numbers:
    # one 128-key block (the largest candidate BLOCK_N for hd 16) x Hkv x B grouped programs, and
    # two float32 (B, Hq, Sk, D) buffers; no SM count on CPU tensors.
    expected_bytes = 2 * 4 * 2 * num_heads * 33 * 16
    assert expanded_dkdv == [(num_kv_heads * 2, num_heads // num_kv_heads, expected_bytes, None)] * 2


@requires_backend("triton")
@pytest.mark.parametrize("num_kv_heads, causal", [(2, False), (1, True)], ids=["gqa", "mqa_causal"])
def test_triton_expanded_dkdv_varlen(expanded_dkdv, num_kv_heads, causal):
    # The middle sequence has no keys: its queries see nothing and its (empty) key range gets no gradient.
    lengths_q, lengths_k = [1, 17, 5], [3, 0, 33]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, num_kv_heads, 16, torch.float32)
    kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k),
                  causal=causal)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def run(backend, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = call_or_skip(attention_varlen, *leaves, backend=backend, **kwargs)
        out.backward(grad_out.to(out.dtype))
        return (out, *(t.grad for t in leaves))

    first, second = run("triton", (q, k, v)), run("triton", (q, k, v))
    expected = run("reference", (q.double(), k.double(), v.double()))
    _assert_deterministic_and_close(first, second, expected, torch.float32, "expanded varlen")
    assert len(expanded_dkdv) == 2


def test_dkdv_expanded_heuristic():
    from tformer.kernels.attention_bwd import EXPANDED_MAX_BYTES, dkdv_expanded

    mib_64 = 64 << 20
    # B=1, Hq=32, Hkv=1, S=2048, BLOCK_N=64: 32 grouped programs for an H100's 132 SMs.
    assert dkdv_expanded(32, group_size=32, expanded_bytes=mib_64, sm_count=132)
    assert dkdv_expanded(2 * 132 - 1, group_size=4, expanded_bytes=mib_64, sm_count=132)
    assert not dkdv_expanded(2 * 132, group_size=4, expanded_bytes=mib_64, sm_count=132)  # SMs already busy
    assert not dkdv_expanded(32, group_size=1, expanded_bytes=mib_64, sm_count=132)  # no group to expand
    assert not dkdv_expanded(32, group_size=32, expanded_bytes=EXPANDED_MAX_BYTES + 1, sm_count=132)
    assert dkdv_expanded(32, group_size=32, expanded_bytes=EXPANDED_MAX_BYTES, sm_count=132)
    assert not dkdv_expanded(32, group_size=32, expanded_bytes=mib_64, sm_count=None)  # CPU: interpreter


# ---------------------------------------------------------------------------------------
# Triton atomic dQ (TFORMER_ATTENTION_DQ=atomic): the dK/dV pass adds dQ in float32 atomics
# and no dQ pass runs. Its numbers are checked by every ``backend`` case above (triton-atomic_dq);
# these check the switch itself and its combination with the expanded dK/dV way.
# ---------------------------------------------------------------------------------------

def _launched_backward_kernels(dq_mode):
    from tformer.kernels.attention import attention_forward
    from tformer.kernels.attention_bwd import attention_backward
    from tformer.kernels.launch import launch

    names = []

    def recording(kernel, *args):
        names.append(kernel.__name__)
        launch(kernel, *args)

    q, k, v = make_inputs(1, 2, 1, 17, 17, 16, torch.float32)
    common = (None, None, None, 17, 17, True, 0.25, 0.0, 0)
    out, lse = attention_forward(q, k, v, *common)
    attention_backward(torch.ones_like(out), q, k, v, out, lse, *common, launcher=recording, dq_mode=dq_mode)
    return names


@requires_backend("triton")
def test_atomic_dq_replaces_the_dq_pass():
    assert _launched_backward_kernels("split") == ["_delta_kernel", "_dkdv_kernel", "_dq_kernel"]
    assert _launched_backward_kernels("atomic") == ["_delta_kernel", "_dkdv_kernel"]


@requires_backend("triton")
def test_dq_mode_errors(monkeypatch):
    from tformer.kernels.attention_bwd import resolve_dq_mode
    from tformer.ops import overrides

    assert resolve_dq_mode() == "split"
    monkeypatch.setenv(DQ_ENV, "atomics")
    with pytest.raises(ValueError, match=f"environment variable {DQ_ENV} is 'atomics'; expected one of split, atomic"):
        overrides.attention_dq_mode()
    with pytest.raises(ValueError, match="argument 'dq_mode' is 'fast'"):
        resolve_dq_mode("fast")
    monkeypatch.setenv(DQ_ENV, "atomic")
    assert overrides.kernel_options("triton", "attention")["dq_mode"] == "atomic"  # the override still works
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
            resolve_dq_mode("atomic")
        assert resolve_dq_mode("split") == "split"
    finally:
        torch.use_deterministic_algorithms(deterministic)


@requires_backend("triton")
@pytest.mark.parametrize("case", ["gqa_padding_all_padded_row", "mqa_causal_fp16"])
def test_atomic_dq_with_expanded_dkdv(expanded_dkdv, monkeypatch, case):
    num_heads, num_kv_heads, causal, lengths, dtype = EXPANDED_CASES[case]
    q, k, v = make_inputs(2, num_heads, num_kv_heads, 17, 33, 16, dtype)
    kwargs = dict(causal=causal, key_padding_mask=padding_mask(lengths, 33) if lengths else None)
    assert_matches_reference("triton:atomic_dq", q, k, v, f"atomic dq, expanded {case}", **kwargs)
    assert len(expanded_dkdv) == 1
