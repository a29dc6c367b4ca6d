"""tformer.patch / tformer.unpatch on torch's own transformer modules."""

import pytest
import torch
from tolerances import tolerance
from torch import nn

import tformer

D_MODEL, HEADS, BATCH, SEQ = 16, 4, 3, 6


def _dtype(backend):
    return torch.float64 if backend == "reference" else torch.float32  # Triton takes no float64


def _encoder(dtype, batch_first=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D_MODEL)).to(dtype)


def _inputs(dtype, batch_first=True):
    gen = torch.Generator().manual_seed(1)
    shape = (BATCH, SEQ, D_MODEL) if batch_first else (SEQ, BATCH, D_MODEL)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[1, -2:] = True  # right padding, so torch's nested-tensor fast path takes it
    padding[2, -1:] = True
    return x, padding


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _run(model, x, padding, train):
    model.train(train)
    model.zero_grad()
    with torch.set_grad_enabled(train):
        out = model(x, src_key_padding_mask=padding)
    if train:
        out[~padding].square().sum().backward()  # padded positions are not compared
    return out


@pytest.fixture
def no_torch_fast_path(monkeypatch):
    """Call it once patched: from then on torch's fused encoder layer fails the test, and
    tformer's op calls are counted (returned)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch._transformer_encoder_layer_fwd ran: the patched modules were bypassed")

    def arm():
        monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", forbidden)
        _count_op_calls(monkeypatch, calls)
        return calls

    calls = {"attention": 0, "layer_norm": 0}
    return arm


def _count_op_calls(monkeypatch, calls):
    for op in calls:
        real = getattr(tformer.ops, op)

        def counting(*args, _op=op, _real=real, **kwargs):
            calls[_op] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(tformer.ops, op, counting)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_patched_encoder_matches_torch(backend, train, no_torch_fast_path):
    dtype = _dtype(backend)
    model = _encoder(dtype)
    x, padding = _inputs(dtype)
    expected = _run(model, x, padding, train)  # eval + no grad: torch's fast path, nested tensors
    expected_grads = _grads(model) if train else None
    originals = dict(model.named_modules())

    replaced = tformer.patch(model, backend=backend)
    expected_names = [f"layers.{i}.{m}" for i in range(2) for m in ("self_attn", "norm1", "norm2")] + ["norm"]
    assert sorted(replaced) == sorted(expected_names)
    assert all(replaced[name] is originals[name] for name in replaced)
    calls = no_torch_fast_path()
    out = _run(model, x, padding, train)
    assert calls == {"attention": 2, "layer_norm": 5}

    torch.testing.assert_close(out[~padding], expected[~padding], **tolerance(dtype, scale=10))
    if train:
        for name, grad in _grads(model).items():
            torch.testing.assert_close(grad, expected_grads[name], **tolerance(dtype, "grad", scale=10),
                                       msg=lambda m: f"grad of {name}: {m}")


def test_transformer_with_decoder_and_sequence_first_layout(no_torch_fast_path):
    torch.manual_seed(0)
    model = nn.Transformer(D_MODEL, HEADS, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                           dropout=0.0).double()
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(SEQ, BATCH, D_MODEL, generator=gen, dtype=torch.float64)
    tgt = torch.randn(SEQ - 1, BATCH, D_MODEL, generator=gen, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(SEQ - 1, dtype=torch.float64)
    expected = model(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    expected.square().sum().backward()
    expected_grads = _grads(model)

    replaced = tformer.patch(model, backend="reference")
    assert len(replaced) == 3 + 5 + 2  # encoder layer: attn + 2 norms; decoder layer: 2 attns + 3 norms; 2 final norms
    calls = no_torch_fast_path()
    model.zero_grad()
    out = model(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, **tolerance(torch.float64, scale=10))
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], **tolerance(torch.float64, "grad", scale=10))
    # All three attentions fused: the decoder's causal float mask comes with tgt_is_causal=True.
    assert calls == {"attention": 3, "layer_norm": 7}


def test_unpatch_restores_originals_with_shared_training():
    model = _encoder(torch.float64)
    originals = dict(model.named_modules())
    encoder_fast_path = model.use_nested_tensor
    tformer.patch(model, backend="reference")
    assert not any(type(m) in (nn.MultiheadAttention, nn.LayerNorm) for m in model.modules())
    # Parameters are shared, not copied: an optimizer built before patching keeps working and
    # training done while patched shows in the restored modules.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = originals["layers.0.self_attn"].in_proj_weight.detach().clone()
    x, padding = _inputs(torch.float64)
    _run(model, x, padding, train=True)
    optimizer.step()

    removed = tformer.unpatch(model)
    assert len(removed) == 7
    after = dict(model.named_modules())
    assert after.keys() == originals.keys()
    assert all(after[name] is module for name, module in originals.items())
    assert model.use_nested_tensor == encoder_fast_path
    assert model.layers[0].activation_relu_or_gelu == 1
    assert not torch.equal(originals["layers.0.self_attn"].in_proj_weight, before)
    assert tformer.unpatch(model) == {}


def test_patch_what_is_asked_and_state_dict_keys_unchanged():
    model = _encoder(torch.float64)
    keys = list(model.state_dict())
    replaced = tformer.patch(model, attention=False, backend="reference")
    assert all(isinstance(replaced[n], nn.LayerNorm) for n in replaced) and len(replaced) == 5
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention
    assert list(model.state_dict()) == keys
    replaced_again = tformer.patch(model, layer_norm=False, backend="reference")
    assert sorted(replaced_again) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert len(tformer.unpatch(model)) == 7


def test_unsupported_module_is_refused_before_anything_changes():
    model = nn.Sequential(nn.LayerNorm(8), nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_bias_kv"):
        tformer.patch(model)
    assert type(model[0]) is nn.LayerNorm
    with pytest.raises(ValueError, match="itself"):
        tformer.patch(nn.LayerNorm(8))
