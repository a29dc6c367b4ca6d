"""tformer.nn against torch.nn: MultiheadAttention, LayerNorm, RMSNorm, Softmax; positional
encodings; the transformer block."""

import contextlib
import math

import pytest
import torch

import tformer
from tformer import nn as tnn
from conftest import backend_params
from tolerances import tolerance

F64 = torch.float64


@contextlib.contextmanager
def skip_if_not_implemented():
    """A backend that is available but does not take this input is skipped, with its reason."""
    try:
        yield
    except tformer.ops.UnsupportedInput as error:
        pytest.skip(str(error))


def dtype_for(backend: str) -> torch.dtype:
    # The reference is checked in float64; kernels in float32 (keeps the interpreter cheap).
    return F64 if backend == "reference" else torch.float32


# ---------------------------------------------------------------------------- MultiheadAttention
def _mha_pair(embed_dim=8, num_heads=2, kdim=None, vdim=None, batch_first=False, bias=True, dropout=0.0,
              dtype=F64, backend=None):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim,
                                      batch_first=batch_first, dtype=dtype)
    ours = tnn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim,
                                  batch_first=batch_first, dtype=dtype, backend=backend)
    with torch.no_grad():  # random biases so the test sees them
        for p in ref.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _run_mha(module, query, key, value, batch_first, **kwargs):
    """Inputs are given batch-first (N, L, E); returns batch-first outputs."""
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    out, weights = module(query, key, value, **kwargs)
    return (out if batch_first else out.transpose(0, 1)), weights


@pytest.mark.parametrize("kv_dims", [None, (5, 7)], ids=["same_dims", "kdim_vdim"])
@pytest.mark.parametrize("padding", ["none", "some", "full_row"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_matches_torch(batch_first, is_causal, need_weights, padding, kv_dims):
    kdim, vdim = kv_dims or (None, None)
    ref, ours = _mha_pair(kdim=kdim, vdim=vdim, batch_first=batch_first)
    batch, seq = 3, 5
    query = torch.randn(batch, seq, 8, dtype=F64, requires_grad=True)
    key = torch.randn(batch, seq, kdim or 8, dtype=F64, requires_grad=True)
    value = torch.randn(batch, seq, vdim or 8, dtype=F64, requires_grad=True)
    key_padding_mask = None
    if padding != "none":
        key_padding_mask = torch.zeros(batch, seq, dtype=torch.bool)
        key_padding_mask[0, 3:] = True
        if padding == "full_row":
            key_padding_mask[1] = True
    valid = [b for b in range(batch) if key_padding_mask is None or not key_padding_mask[b].all()]
    causal_mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)  # torch: True = not allowed

    out, weights = _run_mha(ours, query, key, value, batch_first, key_padding_mask=key_padding_mask,
                            need_weights=need_weights, is_causal=is_causal)
    # torch gives NaN for a fully padded batch element: compare with torch on the other elements.
    sub = [t.detach()[valid].requires_grad_() for t in (query, key, value)]
    ref_out, ref_weights = _run_mha(ref, *sub, batch_first,
                                    key_padding_mask=None if key_padding_mask is None else key_padding_mask[valid],
                                    need_weights=need_weights, is_causal=is_causal,
                                    attn_mask=causal_mask if is_causal else None)
    tol = tolerance(F64)
    torch.testing.assert_close(out[valid], ref_out, **tol)
    assert (weights is None) == (ref_weights is None) == (not need_weights)
    if need_weights:
        torch.testing.assert_close(weights[valid], ref_weights, **tol)

    cotangent = torch.randn_like(out)
    (out[valid] * cotangent[valid]).sum().backward()
    (ref_out * cotangent[valid]).sum().backward()
    gtol = tolerance(F64, "grad")
    for ours_input, ref_input in zip((query, key, value), sub):
        torch.testing.assert_close(ours_input.grad[valid], ref_input.grad, **gtol)
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, dict(ref.named_parameters())[name].grad, **gtol, msg=name)

    if padding == "full_row":  # a query with nothing to attend to gives zeros (then out_proj's bias), not NaN
        torch.testing.assert_close(out[1], ours.out_proj.bias.detach().expand(seq, -1), **tol)
        if need_weights:
            assert torch.count_nonzero(weights[1]) == 0
        assert not any(torch.isnan(t.grad).any() for t in (query, key, value))
        assert torch.count_nonzero(key.grad[1]) == 0 and torch.count_nonzero(query.grad[1]) == 0


@pytest.mark.parametrize("mask_kind", ["bool_2d", "float_2d", "bool_3d", "float_3d"])
def test_mha_explicit_attn_mask_matches_torch(mask_kind):
    ref, ours = _mha_pair(num_heads=2, batch_first=True)
    batch, seq_q, seq_k = 2, 4, 6
    query = torch.randn(batch, seq_q, 8, dtype=F64)
    key = torch.randn(batch, seq_k, 8, dtype=F64)
    shape = (seq_q, seq_k) if mask_kind.endswith("2d") else (batch * 2, seq_q, seq_k)
    blocked = torch.rand(shape) < 0.3
    blocked[..., 0] = False  # every query keeps one key (torch would give NaN otherwise)
    attn_mask = blocked if mask_kind.startswith("bool") else torch.randn(shape, dtype=F64).masked_fill(
        blocked, float("-inf"))
    kwargs = dict(attn_mask=attn_mask, need_weights=True, average_attn_weights=False)
    out, weights = ours(query, key, key, **kwargs)
    ref_out, ref_weights = ref(query, key, key, **kwargs)
    assert weights.shape == (batch, 2, seq_q, seq_k)
    torch.testing.assert_close(out, ref_out, **tolerance(F64))
    torch.testing.assert_close(weights, ref_weights, **tolerance(F64))
    # need_weights=False with an explicit mask still honours the mask.
    out_no_weights, none = ours(query, key, key, attn_mask=attn_mask, need_weights=False)
    assert none is None
    torch.testing.assert_close(out_no_weights, ref_out, **tolerance(F64))


def test_mha_unbatched_input_matches_torch():
    ref, ours = _mha_pair()
    query, key = torch.randn(4, 8, dtype=F64), torch.randn(6, 8, dtype=F64)
    mask = torch.tensor([False, False, True, False, True, False])
    out, weights = ours(query, key, key, key_padding_mask=mask)
    ref_out, ref_weights = ref(query, key, key, key_padding_mask=mask)
    torch.testing.assert_close(out, ref_out, **tolerance(F64))
    torch.testing.assert_close(weights, ref_weights, **tolerance(F64))


@pytest.mark.parametrize("kv_dims", [(None, None), (5, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_init_and_state_dict_keys_match_torch(kv_dims, bias):
    kdim, vdim = kv_dims
    torch.manual_seed(1)
    ref = torch.nn.MultiheadAttention(8, 2, bias=bias, kdim=kdim, vdim=vdim)
    torch.manual_seed(1)
    ours = tnn.MultiheadAttention(8, 2, bias=bias, kdim=kdim, vdim=vdim)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    for name in ref_state:  # same RNG draws in the same order: bit-identical initialization
        torch.testing.assert_close(our_state[name], ref_state[name], atol=0, rtol=0, msg=name)


def test_mha_grouped_query_equals_mha_with_repeated_kv_heads():
    embed_dim, num_heads, num_kv_heads = 8, 4, 2
    head_dim, group = embed_dim // num_heads, num_heads // num_kv_heads
    ours = tnn.MultiheadAttention(embed_dim, num_heads, num_kv_heads=num_kv_heads, batch_first=True, dtype=F64)
    kv_dim = num_kv_heads * head_dim
    assert ours.in_proj_weight.shape == (embed_dim + 2 * kv_dim, embed_dim)
    assert ours.in_proj_bias.shape == (embed_dim + 2 * kv_dim,)
    with torch.no_grad():
        ours.in_proj_bias.normal_()
    # The equivalent full MHA: each kv head's rows repeated for the query heads of its group.
    weight_q, weight_k, weight_v = ours.in_proj_weight.detach().split([embed_dim, kv_dim, kv_dim])
    bias_q, bias_k, bias_v = ours.in_proj_bias.detach().split([embed_dim, kv_dim, kv_dim])

    def expand(t):
        return t.reshape(num_kv_heads, head_dim, *t.shape[1:]).repeat_interleave(group, 0).reshape(embed_dim,
                                                                                                    *t.shape[1:])

    ref = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, dtype=F64)
    state = dict(ours.state_dict())
    state["in_proj_weight"] = torch.cat([weight_q, expand(weight_k), expand(weight_v)])
    state["in_proj_bias"] = torch.cat([bias_q, expand(bias_k), expand(bias_v)])
    ref.load_state_dict(state)
    x = torch.randn(2, 5, embed_dim, dtype=F64)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    for need_weights in (True, False):
        out, _ = ours(x, x, x, key_padding_mask=mask, need_weights=need_weights)
        ref_out, _ = ref(x, x, x, key_padding_mask=mask)
        torch.testing.assert_close(out, ref_out, **tolerance(F64))


def test_mha_fast_path_on_backend(backend):
    dtype = dtype_for(backend)
    ref, ours = _mha_pair(embed_dim=16, num_heads=2, batch_first=True, dtype=dtype, backend=backend)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    causal_mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    with skip_if_not_implemented():
        out, _ = ours(x, x, x, key_padding_mask=mask, need_weights=False, is_causal=True)
    ref_out, _ = ref(x, x, x, key_padding_mask=mask, need_weights=False, attn_mask=causal_mask, is_causal=True)
    torch.testing.assert_close(out, ref_out, **tolerance(dtype, scale=10))
    grad = torch.autograd.grad(out.sum(), [x, ours.in_proj_weight])
    ref_grad = torch.autograd.grad(ref_out.sum(), [x, ref.in_proj_weight])
    for ours_grad, reference_grad in zip(grad, ref_grad):
        torch.testing.assert_close(ours_grad, reference_grad, **tolerance(dtype, "grad", scale=10))


def test_mha_dropout_only_in_training():
    ours = tnn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True, dtype=F64)
    x = torch.randn(2, 6, 8, dtype=F64)
    ours.eval()
    first, weights = ours(x, x, x)
    torch.testing.assert_close(ours(x, x, x)[0], first, atol=0, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6, dtype=F64))
    ours.train()
    torch.manual_seed(0)
    dropped, dropped_weights = ours(x, x, x)
    assert not torch.allclose(dropped, first)
    assert not torch.allclose(dropped_weights.sum(-1), torch.ones(2, 6, dtype=F64))
    assert not torch.allclose(ours(x, x, x, need_weights=False)[0], first)


def test_mha_errors_are_clear():
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        tnn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(NotImplementedError, match="add_zero_attn"):
        tnn.MultiheadAttention(8, 2, add_zero_attn=True)
    with pytest.raises(ValueError, match="num_heads"):
        tnn.MultiheadAttention(8, 3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tnn.MultiheadAttention(8, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        tnn.MultiheadAttention(8, 2, dropout=1.5)
    mha = tnn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match="key_padding_mask.*bool"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="float 'key_padding_mask' must hold only 0"):
        mha(x, x, x, key_padding_mask=torch.full((2, 5), 0.5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="'query'"):
        mha(torch.randn(2, 5, 7), x, x)


# ---------------------------------------------------------------------------- norms and softmax
@pytest.mark.parametrize("shape,kwargs", [
    (8, {}),
    ((3, 4), {}),
    (8, dict(bias=False)),
    (8, dict(elementwise_affine=False)),
], ids=["int", "tuple", "no_bias", "no_affine"])
def test_layer_norm_matches_torch(backend, shape, kwargs):
    dtype = dtype_for(backend)
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(shape, eps=1e-5, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours = tnn.LayerNorm(shape, eps=1e-5, dtype=dtype, backend=backend, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    normalized = (shape,) if isinstance(shape, int) else shape
    x = (torch.randn(2, 3, *normalized, dtype=dtype) * 3 + 1).requires_grad_()
    with skip_if_not_implemented():
        out = ours(x)
    ref_out = ref(x)
    torch.testing.assert_close(out, ref_out, **tolerance(dtype))
    cotangent = torch.randn_like(out)
    params = list(ours.parameters())
    grads = torch.autograd.grad(out, [x, *params], cotangent)
    ref_grads = torch.autograd.grad(ref_out, [x, *ref.parameters()], cotangent)
    for ours_grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(ours_grad, ref_grad, **tolerance(dtype, "grad", scale=10))


@pytest.mark.parametrize("norm_cls", [tnn.LayerNorm, tnn.RMSNorm])
def test_norm_with_residual_is_norm_of_sum(backend, norm_cls):
    dtype = dtype_for(backend)
    norm = norm_cls((2, 4), dtype=dtype, backend=backend)
    x, residual = torch.randn(3, 2, 4, dtype=dtype), torch.randn(3, 2, 4, dtype=dtype)
    with skip_if_not_implemented():
        y, residual_out = norm(x, residual=residual)
    torch.testing.assert_close(residual_out, x + residual, **tolerance(dtype))
    torch.testing.assert_close(y, norm(x + residual), **tolerance(dtype))


def test_rms_norm_matches_torch():
    ref = torch.nn.RMSNorm(8, eps=1e-6, dtype=F64)
    with torch.no_grad():
        ref.weight.normal_()
    ours = tnn.RMSNorm(8, dtype=F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 8, dtype=F64, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x), **tolerance(F64))
    torch.testing.assert_close(torch.autograd.grad(ours(x).sum(), x)[0], torch.autograd.grad(ref(x).sum(), x)[0],
                               **tolerance(F64, "grad"))


def test_norm_errors_are_clear():
    with pytest.raises(ValueError, match="normalized_shape"):
        tnn.LayerNorm(0)
    with pytest.raises(ValueError, match="must end with normalized_shape"):
        tnn.LayerNorm(8)(torch.randn(2, 7))
    # Without weights nothing else would notice the width: the module still checks it.
    with pytest.raises(ValueError, match="must end with normalized_shape"):
        tnn.LayerNorm(8, elementwise_affine=False)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="must end with normalized_shape"):
        tnn.RMSNorm(8, elementwise_affine=False)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="'residual'"):
        tnn.LayerNorm(8)(torch.randn(2, 8), residual=torch.randn(3, 8))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_over_the_last_dimension_adds_no_views_to_the_graph(norm):
    # A reshape per call would put view nodes around every norm of a model (and keep autograd
    # from accumulating the residual stream's gradients in place).
    module = tnn.make_norm(norm, 8, backend="torch")
    x = torch.randn(2, 3, 8, requires_grad=True)
    y, summed = module(x, residual=torch.randn(2, 3, 8))
    for out in (y, summed):
        assert "View" not in type(out.grad_fn).__name__ and "Reshape" not in type(out.grad_fn).__name__
    with pytest.raises(ValueError, match="Did you mean 'rmsnorm'"):
        tnn.make_norm("rms_norm", 8)


def test_softmax_module_matches_torch_and_masks():
    x = torch.randn(2, 5, 3, dtype=F64)
    torch.testing.assert_close(tnn.Softmax(dim=1)(x, scale=0.5), torch.softmax(x * 0.5, dim=1))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1] = False  # a row where nothing takes part gives zeros
    out = tnn.Softmax(dim=-1)(x[:, 0], mask=mask)
    torch.testing.assert_close(out[0], torch.softmax(x[0, 0], -1))
    assert torch.count_nonzero(out[1]) == 0


# ---------------------------------------------------------------------------- positional encodings
def test_rope_scores_depend_only_on_relative_position():
    rope = tnn.positional_encoding("rope", max_seq_len=32, d_model=16, head_dim=8).double()
    q = torch.randn(1, 1, 1, 8, dtype=F64).expand(1, 1, 32, 8)  # the same vector at every position
    k = torch.randn(1, 1, 1, 8, dtype=F64).expand(1, 1, 32, 8)
    rotated_q, rotated_k = rope.rotate_queries_keys(q, k)
    scores = rotated_q[0, 0] @ rotated_k[0, 0].T
    torch.testing.assert_close(scores[5, 2], scores[20, 17])
    torch.testing.assert_close(scores[3, 3], q[0, 0, 0] @ k[0, 0, 0])  # relative position 0: no rotation effect
    assert not torch.allclose(scores[5, 2], scores[5, 3])


def test_positional_offset_equals_slice_of_full_sequence():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16, dtype=F64)
    q, k = torch.randn(2, 4, 10, 8, dtype=F64), torch.randn(2, 2, 10, 8, dtype=F64)
    for name in tnn.POSITIONAL_ENCODINGS:
        encoding = tnn.positional_encoding(name, max_seq_len=12, d_model=16, head_dim=8).double()
        full = encoding.add_to_embeddings(x)
        torch.testing.assert_close(encoding.add_to_embeddings(x[:, 6:], offset=6), full[:, 6:])
        full_q, full_k = encoding.rotate_queries_keys(q, k)
        part_q, part_k = encoding.rotate_queries_keys(q[:, :, 6:], k[:, :, 6:], offset=6)
        torch.testing.assert_close(part_q, full_q[:, :, 6:])
        torch.testing.assert_close(part_k, full_k[:, :, 6:])
        with pytest.raises(ValueError, match="max_seq_len"):
            encoding.add_to_embeddings(x, offset=3)


def test_sinusoidal_table_values():
    encoding = tnn.positional_encoding("sinusoidal", max_seq_len=8, d_model=6).double()
    table = encoding.add_to_embeddings(torch.zeros(1, 8, 6, dtype=F64))[0]
    position, i = 5, 1
    torch.testing.assert_close(table[position, 2 * i], torch.tensor(math.sin(position / 10000 ** (2 * i / 6)),
                                                                    dtype=F64))
    torch.testing.assert_close(table[position, 2 * i + 1], torch.tensor(math.cos(position / 10000 ** (2 * i / 6)),
                                                                        dtype=F64))
    assert encoding.state_dict() == {}  # fixed: nothing saved
    scaled = tnn.positional_encoding("sinusoidal", max_seq_len=8, d_model=6, sinusoidal_scale=0.02).double()
    torch.testing.assert_close(scaled.add_to_embeddings(torch.zeros(1, 8, 6, dtype=F64))[0], 0.02 * table)
    with pytest.raises(ValueError, match="'scale'"):
        tnn.SinusoidalPositionalEncoding(8, 6, scale=0.0)


def test_positional_factory_errors():
    with pytest.raises(ValueError, match="Did you mean 'rope'"):
        tnn.positional_encoding("rop", max_seq_len=8, d_model=8, head_dim=4)
    with pytest.raises(ValueError, match="head_dim"):
        tnn.positional_encoding("rope", max_seq_len=8, d_model=8)
    with pytest.raises(ValueError, match="even"):
        tnn.positional_encoding("rope", max_seq_len=8, d_model=8, head_dim=3)


# ---------------------------------------------------------------------------- transformer block
def _block(backend, norm="layernorm", num_kv_heads=None, dtype=F64):
    torch.manual_seed(0)
    block = tnn.TransformerBlock(16, 4, num_kv_heads=num_kv_heads, norm=norm, causal=True, backend=backend)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name:
                p.normal_()
    return block.to(dtype)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_block_on_backend_matches_reference(backend, norm):
    dtype = dtype_for(backend)
    block, reference = _block(backend, norm, num_kv_heads=2, dtype=dtype), _block("reference", norm, num_kv_heads=2)
    rope = tnn.positional_encoding("rope", max_seq_len=8, d_model=16, head_dim=4)
    hidden, residual = torch.randn(2, 5, 16, dtype=F64), torch.randn(2, 5, 16, dtype=F64)
    with skip_if_not_implemented():
        out = block(hidden.to(dtype), residual.to(dtype), positional=rope.to(dtype))
    expected = reference(hidden, residual, positional=rope.double())
    for actual, wanted in zip(out, expected):
        torch.testing.assert_close(actual.double(), wanted, **tolerance(dtype, scale=10))


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_block_compiles_fullgraph(backend):
    # The kernel backends' custom ops (test_registry covers the reference's dispatch). A model built on the ops (fused residual-add norm, RoPE, grouped-query attention) traces
    # into one graph through the custom ops' fake implementations: no graph break. aot_eager
    # on the CPU (inductor would compile C++ for little gain); outputs and grads match eager.
    dtype = dtype_for(backend)
    block = _block(backend, num_kv_heads=2, dtype=dtype)
    rope = tnn.positional_encoding("rope", max_seq_len=8, d_model=16, head_dim=4).to(dtype)
    hidden = torch.randn(2, 5, 16, dtype=dtype)

    def loss(hidden):
        out, residual = block(hidden, positional=rope)
        return (out + residual).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_in, compiled_in = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with skip_if_not_implemented():
        expected = loss(eager_in)
    expected.backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    actual = compiled(compiled_in)
    actual.backward()
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(compiled_in.grad, eager_in.grad)
    for p, wanted in zip(block.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, wanted)


def test_block_residual_stream_contract():
    """block(h, r) continues the stream h + r: the same as block(h + r) started fresh, and the
    returned residual is the stream before the MLP adds its output."""
    block = _block("reference")
    hidden, residual = torch.randn(2, 5, 16, dtype=F64), torch.randn(2, 5, 16, dtype=F64)
    out_hidden, out_residual = block(hidden, residual)
    fresh_hidden, fresh_residual = block(hidden + residual)
    torch.testing.assert_close(out_hidden + out_residual, fresh_hidden + fresh_residual)
    attention_out = block.attention(block.attention_norm(hidden + residual))
    torch.testing.assert_close(out_residual, hidden + residual + attention_out)


def test_block_is_causal():
    block = _block("reference")
    x = torch.randn(1, 6, 16, dtype=F64)
    changed = x.clone()
    changed[:, 4] += 1.0
    out, changed_out = sum(block(x)), sum(block(changed))
    torch.testing.assert_close(out[:, :4], changed_out[:, :4], atol=0, rtol=0)
    assert not torch.allclose(out[:, 4:], changed_out[:, 4:])


def test_multihead_attention_takes_torch_float_padding_mask():
    # nn.TransformerEncoderLayer hands its attention a float mask: 0 = keep, -inf = padding.
    mha = tnn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    padding = torch.tensor([[False, False, False, True, True], [False] * 5])
    as_float = torch.zeros(2, 5, dtype=torch.float64).masked_fill(padding, float("-inf"))
    expected, _ = mha(x, x, x, key_padding_mask=padding, need_weights=False)
    actual, _ = mha(x, x, x, key_padding_mask=as_float, need_weights=False)
    torch.testing.assert_close(actual, expected)


def test_nothing_outside_the_reference_backend_builds_a_score_matrix():
    # Every attention path runs tformer.ops.attention (or, for returned weights and arbitrary
    # masks, the reference backend's masked_attention): a q @ k^T written outside the backends
    # would be a second, unfused attention. The patterns are how a score matrix gets written in
    # torch. Only the reference backend, the definition of correct, builds one.
    import re
    from pathlib import Path

    package = Path(tformer.__file__).resolve().parent
    backends = package / "backends" / "reference"
    pattern = re.compile(r"@\s*\w+\.(transpose\(\s*-[12]\s*,\s*-[12]\s*\)|mT\b)|torch\.(matmul|bmm|baddbmm|einsum)\(")
    found = [f"{path.relative_to(package)}:{number}: {line.strip()}"
             for path in package.rglob("*.py") if backends not in path.parents
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_one_attention_module_for_self_and_cross_attention():
    torch.manual_seed(0)
    self_attention = tnn.Attention(16, 4, num_kv_heads=2, causal=True, backend="reference")
    cross = tnn.Attention(16, 4, cross=True, backend="reference")
    assert set(self_attention.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert set(cross.state_dict()) == {"q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"}
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    assert cross(x, cross.project_memory(memory)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="no causal order"):
        tnn.Attention(16, 4, cross=True, causal=True)
    with pytest.raises(ValueError, match="needs argument 'memory_kv'"):
        cross(x)
    with pytest.raises(ValueError, match="are for cross-attention"):
        self_attention(x, cross.project_memory(memory))
    with pytest.raises(ValueError, match="project_memory is for cross-attention"):
        self_attention.project_memory(memory)
