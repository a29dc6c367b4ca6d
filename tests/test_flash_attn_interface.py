"""tformer.integrations.flash_attn: FlashAttention's API gives FlashAttention's answers.

Each twin runs on every backend (float32 inputs) and is compared with ``attention_ref``
(tests/flash_attn_reference.py: FlashAttention's test semantics) computed in float64 on the
same inputs: bottom-right causal alignment, windows, soft-capping, GQA/MQA, varlen with unequal
lengths, its log-sum-exp convention and its refusals.
"""

import pytest
import torch

from tformer.integrations.flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                             flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                             flash_attn_varlen_qkvpacked_func)

from conftest import DEVICE, call_or_skip
from flash_attn_reference import attention_ref, pad, unpad
from tolerances import assert_close_to_reference


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator).to(DEVICE)


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, FlashAttention keyword arguments)
CASES = {
    "decode_one_query": (2, 1, 33, 4, 1, 16, dict(causal=True)),
    "causal_sq_gt_sk": (1, 40, 17, 2, 2, 16, dict(causal=True)),
    "causal_sq_lt_sk": (1, 17, 50, 4, 2, 40, dict(causal=True)),
    "window": (1, 33, 50, 2, 1, 16, dict(window_size=(6, 3))),
    "window_causal": (1, 50, 33, 2, 2, 16, dict(causal=True, window_size=(9, 4))),
    "softcap_scale": (2, 17, 33, 2, 1, 16, dict(softcap=4.0, softmax_scale=0.4)),
    "everything": (2, 33, 33, 4, 2, 40, dict(causal=True, window_size=(11, 0), softcap=3.0)),
}


def _run(fn, inputs, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = call_or_skip(fn, *leaves, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return (out, *(t.grad for t in leaves))


def _ref(q, k, v, **kwargs):
    return attention_ref(q, k, v, **kwargs)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_flash_attn_func_gives_flash_attentions_answer(backend, case):
    batch, seq_q, seq_k, heads, heads_k, dim, kwargs = CASES[case]
    generator = torch.Generator().manual_seed(0)
    q = _randn(generator, batch, seq_q, heads, dim) * 2
    k, v = _randn(generator, batch, seq_k, heads_k, dim), _randn(generator, batch, seq_k, heads_k, dim)
    grad_out = _randn(generator, batch, seq_q, heads, dim)
    got = _run(flash_attn_func, (q, k, v), grad_out, backend=backend, **kwargs)
    ref_kwargs = {name: value for name, value in kwargs.items()}
    want = _run(_ref, (q.double(), k.double(), v.double()), grad_out.double(), **ref_kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close_to_reference(a, b, torch.float32, "forward" if name == "out" else "grad",
                                  scale=max(1.0, b.abs().max().item()), what=f"{case} {name}")


def test_decoding_is_not_top_left(backend):
    # FlashAttention's causal decode step sees the whole cache; a top-left mask would return v[0].
    generator = torch.Generator().manual_seed(1)
    q, k, v = _randn(generator, 1, 1, 2, 16), _randn(generator, 1, 9, 2, 16), _randn(generator, 1, 9, 2, 16)
    out = call_or_skip(flash_attn_func, q, k, v, causal=True, backend=backend)
    assert not torch.allclose(out, v[:, :1], atol=1e-3)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=False, backend="reference"), atol=1e-5,
                               rtol=1e-5)


def test_mask_diagram_of_flash_attentions_docstring(backend):
    # seqlen_q = 2, seqlen_k = 5 -> [[1 1 1 1 0], [1 1 1 1 1]]; seqlen_q = 5, seqlen_k = 2 ->
    # [[0 0], [0 0], [0 0], [1 0], [1 1]] (rows of zeros give zero output).
    for seq_q, seq_k, expected in ((2, 5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
                                   (5, 2, [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])):
        q, k = torch.randn(1, seq_q, 1, 8, device=DEVICE), torch.randn(1, seq_k, 1, 8, device=DEVICE)
        out, lse, probs = call_or_skip(flash_attn_func, q, k, k, causal=True, return_attn_probs=True, backend=backend)
        assert torch.equal(probs[0, 0] > 0, torch.tensor(expected, dtype=torch.bool, device=DEVICE))
        empty = ~torch.tensor(expected, dtype=torch.bool).any(-1).to(DEVICE)
        assert torch.equal(out[0, empty], torch.zeros_like(out[0, empty]))
        # FlashAttention 2's log-sum-exp of a row that sees nothing is +inf.
        assert torch.isposinf(lse[0, 0, empty]).all() and torch.isfinite(lse[0, 0, ~empty]).all()
        assert lse.shape == (1, 1, seq_q) and lse.dtype == torch.float32


@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(causal=True, window_size=(5, 0), softcap=2.0),
                                    dict(window_size=(3, 8))], ids=["causal", "causal_window_softcap", "window"])
def test_varlen_unequal_lengths(backend, kwargs):
    # Padded batch with FlashAttention's masks (True = token), unpadded as its tests do; each
    # sequence's own lengths align the band (one with Sq > Sk, one with Sq < Sk, one Sq = 1).
    generator = torch.Generator().manual_seed(2)
    lengths_q, lengths_k = torch.tensor([30, 1, 12]), torch.tensor([9, 25, 12])
    query_mask = torch.arange(30)[None, :] < lengths_q[:, None]
    key_mask = torch.arange(25)[None, :] < lengths_k[:, None]
    q, k, v = _randn(generator, 3, 30, 4, 16) * 2, _randn(generator, 3, 25, 2, 16), _randn(generator, 3, 25, 2, 16)
    q_packed, cu_q, max_q = unpad(q, query_mask.to(DEVICE))
    k_packed, cu_k, max_k = unpad(k, key_mask.to(DEVICE))
    v_packed, _, _ = unpad(v, key_mask.to(DEVICE))
    grad_packed = _randn(generator, *q_packed.shape)
    got = _run(flash_attn_varlen_func, (q_packed, k_packed, v_packed), grad_packed, cu_seqlens_q=cu_q,
               cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, backend=backend, **kwargs)
    masks = dict(query_padding_mask=query_mask.to(DEVICE), key_padding_mask=key_mask.to(DEVICE))
    want = _run(_ref, (q.double(), k.double(), v.double()), pad(grad_packed, query_mask.to(DEVICE)).double(),
                **masks, **kwargs)
    out, dq, dk, dv = got
    for name, a, b, mask in (("out", out, want[0], query_mask), ("dq", dq, want[1], query_mask),
                             ("dk", dk, want[2], key_mask), ("dv", dv, want[3], key_mask)):
        assert_close_to_reference(pad(a, mask.to(DEVICE)), b, torch.float32, "forward" if name == "out" else "grad",
                                  scale=max(1.0, b.abs().max().item()), what=f"varlen {name}")
    _, lse, probs = flash_attn_varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k,
                                           return_attn_probs=True, backend="reference", **kwargs)
    assert lse.shape == (4, int(cu_q[-1])) and probs.shape == (3, 4, max_q, max_k)
    ref_probs = attention_ref(q.double(), k.double(), v.double(), **masks, **kwargs)[1]
    torch.testing.assert_close(probs.double(), ref_probs[:, :, :max_q, :max_k], atol=1e-6, rtol=1e-6)


def test_packed_twins_equal_the_unpacked_ones():
    generator = torch.Generator().manual_seed(3)
    qkv = _randn(generator, 2, 17, 3, 2, 16)
    q, k, v = qkv.unbind(2)
    kwargs = dict(causal=True, window_size=(4, 0), backend="reference")
    expected = flash_attn_func(q, k, v, **kwargs)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, **kwargs), expected, atol=0, rtol=0)
    torch.testing.assert_close(flash_attn_kvpacked_func(q, torch.stack([k, v], 2), **kwargs), expected, atol=0, rtol=0)
    cu = torch.tensor([0, 17, 34], dtype=torch.int32, device=DEVICE)
    packed = qkv.flatten(0, 1)
    varlen = flash_attn_varlen_qkvpacked_func(packed, cu, 17, **kwargs)
    torch.testing.assert_close(varlen, expected.flatten(0, 1), atol=1e-6, rtol=1e-6)
    varlen_kv = flash_attn_varlen_kvpacked_func(packed[:, 0], packed[:, 1:], cu, cu, 17, 17, **kwargs)
    torch.testing.assert_close(varlen_kv, expected.flatten(0, 1), atol=1e-6, rtol=1e-6)


def test_unsupported_arguments_are_refused_by_name(monkeypatch):
    q = torch.randn(1, 4, 2, 8, device=DEVICE)
    with pytest.raises(NotImplementedError, match="argument 'alibi_slopes'"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(NotImplementedError, match="argument 'block_table'"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32))
    monkeypatch.setenv("TFORMER_ATTENTION_DQ", "atomic")
    with pytest.raises(ValueError, match="argument 'deterministic'"):
        flash_attn_func(q, q, q, deterministic=True)
    with pytest.raises(ValueError, match="argument 'q' must be a 4-D tensor"):
        flash_attn_func(q[0], q, q)
