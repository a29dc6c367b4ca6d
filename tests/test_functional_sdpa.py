"""tformer.nn.functional.scaled_dot_product_attention against torch's SDPA, mask kind by mask kind."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from tolerances import tolerance

import tformer
from tformer.nn import functional as tf

BATCH, HEADS, SEQ_Q, SEQ_K, HEAD_DIM = 2, 4, 5, 7, 8


@pytest.fixture(autouse=True)
def fresh_warnings():
    tf._warned_reasons.clear()
    yield
    tf._warned_reasons.clear()


def _dtype(backend):
    return torch.float64 if backend == "reference" else torch.float32  # Triton takes no float64


def _qkv(dtype, kv_heads=HEADS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda heads, seq: torch.randn(BATCH, heads, seq, HEAD_DIM, generator=gen, dtype=dtype)  # noqa: E731
    return [t.requires_grad_() for t in (make(HEADS, SEQ_Q), make(kv_heads, SEQ_K), make(kv_heads, SEQ_K))]


def _padding_keep():
    keep = torch.ones(BATCH, SEQ_K, dtype=torch.bool)
    keep[1, -3:] = False  # right padding in the second sequence
    keep[0, :2] = False  # left padding in the first
    return keep


def _mask(kind, dtype):
    """(kwargs for both SDPAs, fused by tformer's kernels?)."""
    gen = torch.Generator().manual_seed(1)
    if kind == "none":
        return {}, True
    if kind == "causal":
        return dict(is_causal=True), True
    if kind == "key_padding":  # (B, 1, 1, Sk), True = takes part
        return dict(attn_mask=_padding_keep()[:, None, None, :]), True
    if kind == "key_padding_expanded":  # a (B, 1, Sq, Sk) view with stride 0 over queries
        return dict(attn_mask=_padding_keep()[:, None, None, :].expand(BATCH, 1, SEQ_Q, SEQ_K)), True
    if kind == "bool_general":
        allowed = torch.rand(BATCH, 1, SEQ_Q, SEQ_K, generator=gen) > 0.4
        allowed[..., 0] = True  # no fully masked row: that case has its own test
        return dict(attn_mask=allowed), False
    if kind == "float_additive":
        bias = torch.randn(BATCH, HEADS, SEQ_Q, SEQ_K, generator=gen, dtype=dtype)
        bias[0, :, :, -2:] = float("-inf")
        return dict(attn_mask=bias), False
    if kind == "scale":
        return dict(scale=0.3, is_causal=True), True
    if kind == "dropout_zero":
        return dict(dropout_p=0.0, attn_mask=_padding_keep()[:, None, None, :]), True
    raise AssertionError(kind)


MASK_KINDS = ["none", "causal", "key_padding", "key_padding_expanded", "bool_general", "float_additive", "scale",
              "dropout_zero"]


def _compare(backend, kwargs, fused, kv_heads=HEADS):
    dtype = _dtype(backend)
    q, k, v = _qkv(dtype, kv_heads)
    q_ref, k_ref, v_ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tf.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    ours = [w for w in caught if "tformer.nn.functional" in str(w.message)]
    assert len(ours) == (0 if fused else 1), [str(w.message) for w in ours]
    expected = F.scaled_dot_product_attention(q_ref, k_ref, v_ref, **kwargs)
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    for name, ours_grad, ref_grad in (("q", q.grad, q_ref.grad), ("k", k.grad, k_ref.grad), ("v", v.grad, v_ref.grad)):
        torch.testing.assert_close(ours_grad, ref_grad, **tolerance(dtype, "grad"), msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_matches_torch_sdpa(backend, kind):
    kwargs, fused = _mask(kind, _dtype(backend))
    _compare(backend, kwargs, fused)


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(attn_mask=None)], ids=["causal", "no_mask"])
def test_grouped_query_attention_with_enable_gqa(backend, kwargs):
    _compare(backend, dict(kwargs, enable_gqa=True), fused=True, kv_heads=2)


def test_head_broadcast_without_enable_gqa_takes_the_reference_path():
    # torch broadcasts one key/value head over the query heads when enable_gqa is False.
    _compare("reference", {}, fused=False, kv_heads=1)


def test_general_path_warns_once_per_reason():
    q, k, v = _qkv(torch.float64)
    bias = torch.zeros(SEQ_Q, SEQ_K, dtype=torch.float64)
    with pytest.warns(UserWarning, match="float \\(additive\\) attn_mask"):
        tf.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # same reason: silent now


def test_three_dimensional_inputs_take_the_reference_path():
    q, k, v = (t[0].detach() for t in _qkv(torch.float64))
    with pytest.warns(UserWarning, match="dimensions"):
        out = tf.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_fully_masked_rows_give_zeros_and_finite_gradients(backend):
    # Documented difference: tformer returns zeros for a query that sees no key on every path;
    # torch's math backend does too since 2.5, but its fused CUDA kernels may return NaN.
    dtype = _dtype(backend)
    q, k, v = _qkv(dtype)
    keep = _padding_keep()
    keep[1] = False  # the second sequence has no key at all
    out = tf.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    expected = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(out[0], expected[0], **tolerance(dtype))


def test_dropout_is_applied():
    q, k, v = (t.detach() for t in _qkv(torch.float64))
    keep = _padding_keep()[:, None, None, :]
    plain = tf.scaled_dot_product_attention(q, k, v, attn_mask=keep, backend="reference")
    torch.manual_seed(0)
    dropped = tf.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.5, backend="reference")
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, plain)
    with pytest.warns(UserWarning, match="dropout_p=1.0"):
        everything_dropped = tf.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=1.0)
    assert torch.equal(everything_dropped, torch.zeros_like(plain))


def test_fused_path_runs_tformer_attention(monkeypatch):
    calls = []
    real = tformer.ops.attention
    monkeypatch.setattr(tformer.ops, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = (t.detach() for t in _qkv(torch.float64))
    tf.scaled_dot_product_attention(q, k, v, attn_mask=_padding_keep()[:1, None, None, :], backend="reference")
    assert len(calls) == 1
    assert torch.equal(calls[0]["key_padding_mask"], ~_padding_keep()[:1].expand(BATCH, SEQ_K))


def test_mask_and_is_causal_together_is_an_error():
    q, k, v = _qkv(torch.float64)
    with pytest.raises(ValueError, match="attn_mask"):
        tf.scaled_dot_product_attention(q, k, v, attn_mask=_padding_keep()[:, None, None, :], is_causal=True)
