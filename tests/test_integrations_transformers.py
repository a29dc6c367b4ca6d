"""attn_implementation="tformer" in Hugging Face transformers against "eager", on tiny random models."""

import pytest
import torch
from conftest import requires_backend
from tolerances import tolerance

import tformer

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("tformer.integrations.transformers")

VOCAB, SEQ = 64, 7


def _llama(**overrides):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      **overrides)
    return transformers.LlamaForCausalLM(config)


def _bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


MODELS = {"llama": _llama, "bert": _bert, "gpt2": _gpt2}


def _batch(padding):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    attention_mask = torch.ones(3, SEQ, dtype=torch.long)
    if padding == "right":
        attention_mask[1, -3:] = 0
        attention_mask[2, -1:] = 0
    elif padding == "left":
        attention_mask[1, :3] = 0
        attention_mask[2, :1] = 0
    return ids, attention_mask


def _logits_and_grads(model, implementation, ids, attention_mask):
    model.set_attn_implementation(implementation)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    logits[real].square().mean().backward()  # padded positions are not compared
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[real], grads


@pytest.fixture
def fused_only(monkeypatch):
    """Fail if the general (unfused) path runs; count tformer.ops.attention calls."""
    calls = []
    real = tformer.ops.attention
    monkeypatch.setattr(tformer.ops, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))

    def general(*args, **kwargs):
        raise AssertionError("the general reference path ran: the mask was not recognized")

    monkeypatch.setattr(hf, "reference_sdpa", general)
    return calls


# Eager computes its softmax in float32 even for a float64 model, and its float64 left-padding
# mask (finfo.min) overflows there to NaN, so left padding is compared in float32 only.
CASES = [(name, padding, dtype) for name in MODELS for padding, dtype in
         (("none", torch.float64), ("right", torch.float64), ("left", torch.float32))]


@pytest.mark.parametrize("name,padding,dtype", CASES, ids=[f"{n}-{p}-{str(d)[6:]}" for n, p, d in CASES])
def test_matches_eager_reference_backend(name, padding, dtype, fused_only):
    _check_against_eager(name, padding, dtype, "reference", fused_only)


@requires_backend("triton")
def test_matches_eager_triton_backend(fused_only):
    _check_against_eager("llama", "left", torch.float32, "triton", fused_only)


def _check_against_eager(name, padding, dtype, backend, calls):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype)
    ids, attention_mask = _batch(padding)
    expected_logits, expected_grads = _logits_and_grads(model, "eager", ids, attention_mask)
    with tformer.backend(backend):
        logits, grads = _logits_and_grads(model, "tformer", ids, attention_mask)
    assert len(calls) == 2  # one fused call per layer
    assert all(call.get("key_padding_mask") is None for call in calls) == (padding == "none")
    # Eager's float32 softmax bounds the agreement, whatever the model's dtype.
    torch.testing.assert_close(logits, expected_logits, **tolerance(torch.float32, scale=10))
    assert grads.keys() == expected_grads.keys()
    for param, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[param], **tolerance(torch.float32, "grad", scale=10),
                                   msg=lambda m: f"grad of {param}: {m}")


def test_one_token_decoding_with_cache_matches_eager(fused_only):
    torch.manual_seed(0)
    model = _llama().eval()  # float32: see CASES on eager, float64 and left padding
    ids, attention_mask = _batch("left")
    outputs = {}
    for implementation in ("eager", "tformer"):
        model.set_attn_implementation(implementation)
        generated = model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        outputs[implementation] = torch.stack(generated.logits)
    # Prefill (causal + left padding) and two one-token steps (key padding only), 2 layers each.
    assert [call["causal"] for call in fused_only] == [True] * 2 + [False] * 4
    torch.testing.assert_close(outputs["tformer"], outputs["eager"], **tolerance(torch.float32, scale=10))


def test_from_pretrained_and_config_select_tformer(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="tformer")
    assert model.config._attn_implementation == "tformer"
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    config._attn_implementation = "tformer"
    assert transformers.GPT2LMHeadModel(config).config._attn_implementation == "tformer"


def test_dropout_in_training_only(monkeypatch):
    calls = []
    real = tformer.ops.attention
    monkeypatch.setattr(tformer.ops, "attention", lambda *a, **kw: calls.append(kw["dropout_p"]) or real(*a, **kw))
    torch.manual_seed(0)
    model = _llama(attention_dropout=0.5)
    model.set_attn_implementation("tformer")
    ids, _ = _batch("none")
    model.train()
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.isfinite(first).all() and not torch.allclose(first, second)
    model.eval()
    model(input_ids=ids)
    assert calls == [0.5] * 4 + [0.0] * 2


def test_other_masks_take_the_general_path_with_one_warning(caplog):
    hf._warned.clear()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    module = torch.nn.Module()
    # Packed sequences: block-diagonal causal; not causal + key padding.
    block = torch.zeros(5, 5, dtype=torch.bool)
    block[:2, :2] = block[2:, 2:] = True
    mask = (block & torch.ones(5, 5, dtype=torch.bool).tril())[None, None].expand(2, 1, 5, 5)
    with caplog.at_level("WARNING", logger="tformer"):
        out, weights = hf.tformer_attention_forward(module, q, k, v, mask, scaling=0.5)
        hf.tformer_attention_forward(module, q, k, v, mask.clone(), scaling=0.5)
    assert weights is None and sum("general" in r.message for r in caplog.records) == 1
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), **tolerance(torch.float64))


@pytest.mark.parametrize("kwarg", ["s_aux", "position_bias"])
def test_unsupported_features_raise(kwarg):
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="attn_implementation='tformer' does not support"):
        hf.tformer_attention_forward(torch.nn.Module(), q, q, q, None, **{kwarg: 4})


# ---------------------------------------------------------------------------------------
# Sliding windows and soft-capping: Mistral-, Qwen-2- and Gemma-2-style models. SEQ = 7 tokens
# against windows of 3: every prefill row past the third is cut by the window.
# ---------------------------------------------------------------------------------------

WINDOW = 3


def _mistral():
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        sliding_window=WINDOW)
    return transformers.MistralForCausalLM(config)


def _qwen2():
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    return transformers.Qwen2ForCausalLM(config)


def _gemma2():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=32, sliding_window=WINDOW,
                                       attn_logit_softcapping=2.0, query_pre_attn_scalar=8)
    return transformers.Gemma2ForCausalLM(config)


WINDOWED = {"mistral": _mistral, "qwen2": _qwen2, "gemma2": _gemma2}
WINDOWED_CASES = [(name, padding) for name in WINDOWED for padding in ("none", "right", "left")]


@pytest.mark.parametrize("name,padding", WINDOWED_CASES, ids=[f"{n}-{p}" for n, p in WINDOWED_CASES])
def test_sliding_window_and_softcap_models_match_eager(name, padding, fused_only):
    torch.manual_seed(0)
    model = WINDOWED[name]()  # float32: eager's left-padding mask overflows in float64 (see CASES)
    ids, attention_mask = _batch(padding)
    expected_logits, expected_grads = _logits_and_grads(model, "eager", ids, attention_mask)
    logits, grads = _logits_and_grads(model, "tformer", ids, attention_mask)
    windows = [call["window"] for call in fused_only]
    softcaps = {call["softcap"] for call in fused_only}
    assert len(fused_only) == 2
    if name == "qwen2":  # max_window_layers=1: layer 0 full causal, layer 1 sliding
        assert windows == [None, (WINDOW - 1, 0)]
    elif name == "gemma2":  # sliding and full layers alternate, every one soft-capped
        assert windows == [(WINDOW - 1, 0), None] and softcaps == {2.0}
    else:
        assert windows == [(WINDOW - 1, 0)] * 2
    torch.testing.assert_close(logits, expected_logits, **tolerance(torch.float32, scale=10))
    assert grads.keys() == expected_grads.keys()
    for param, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[param], **tolerance(torch.float32, "grad", scale=10),
                                   msg=lambda m: f"grad of {param}: {m}")


@pytest.mark.parametrize("name", list(WINDOWED))
def test_sliding_window_decoding_with_cache_matches_eager(name, fused_only):
    # Left-padded prefill, then one-token steps past the window against the cache (bottom-right).
    torch.manual_seed(0)
    model = WINDOWED[name]().eval()
    ids, attention_mask = _batch("left")
    outputs = {}
    for implementation in ("eager", "tformer"):
        model.set_attn_implementation(implementation)
        generated = model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        outputs[implementation] = torch.stack(generated.logits)
    assert len(fused_only) == 8
    torch.testing.assert_close(outputs["tformer"], outputs["eager"], **tolerance(torch.float32, scale=10))


@requires_backend("triton")
def test_gemma2_matches_eager_triton_backend(fused_only):
    torch.manual_seed(0)
    model = _gemma2()
    ids, attention_mask = _batch("left")
    expected_logits, _ = _logits_and_grads(model, "eager", ids, attention_mask)
    with tformer.backend("triton"):
        logits, _ = _logits_and_grads(model, "tformer", ids, attention_mask)
    torch.testing.assert_close(logits, expected_logits, **tolerance(torch.float32, scale=10))
