"""DecoderLM, EncoderClassifier, KVCache and the model configs (reference backend, float64)."""

import math

import pytest
import torch
from torch import nn

from tformer.models import DecoderLM, EncoderClassifier, EncoderClassifierConfig, KVCache, ModelConfig
from tformer.nn import POSITIONAL_ENCODINGS

F64 = torch.float64
VOCAB = 13


def tiny(cls=ModelConfig, **overrides):
    values = dict(vocab_size=VOCAB, max_seq_len=12, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24)
    values.update(overrides)
    return cls(**values)


def decoder(**overrides) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(tiny(**overrides)).double().eval()


def encoder(**overrides) -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(tiny(EncoderClassifierConfig, num_classes=3, **overrides)).double().eval()


def tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_trains(model, logits):
    assert torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    # every block's weights learn something
    assert all(torch.count_nonzero(p.grad) > 0 for n, p in model.named_parameters() if n.startswith("blocks")
               and n.endswith("weight")), "a block weight got an all-zero gradient"


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("positional", POSITIONAL_ENCODINGS)
def test_decoder_forward_backward(positional, norm):
    model = decoder(positional=positional, norm=norm).train()
    logits = model(tokens(2, 7))
    assert logits.shape == (2, 7, VOCAB) and logits.dtype == F64
    assert_trains(model, logits)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("positional", POSITIONAL_ENCODINGS)
def test_encoder_forward_backward(positional, norm):
    pooling = "cls" if norm == "layernorm" else "mean"
    model = encoder(positional=positional, norm=norm, pooling=pooling).train()
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True
    logits = model(tokens(2, 7), key_padding_mask=mask)
    assert logits.shape == (2, 3)
    assert_trains(model, logits)


@pytest.mark.parametrize("positional", POSITIONAL_ENCODINGS)
def test_decoder_is_causal(positional):
    model = decoder(positional=positional)
    original = tokens(2, 8)
    changed = original.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    before, after = model(original), model(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], atol=0, rtol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_encoder_logits_ignore_padding(positional, pooling):
    model = encoder(positional=positional, pooling=pooling)
    lengths = torch.tensor([6, 3])
    batch = tokens(2, 6)
    mask = torch.arange(6)[None, :] >= lengths[:, None]
    logits = model(batch, key_padding_mask=mask)
    # More padding, with different token ids under it: the same logits.
    padded = torch.cat([batch, tokens(2, 4, seed=7)], dim=1)
    padded[1, 3:] = (padded[1, 3:] + 5) % VOCAB
    padded_mask = torch.arange(10)[None, :] >= lengths[:, None]
    torch.testing.assert_close(model(padded, key_padding_mask=padded_mask), logits, atol=1e-12, rtol=1e-12)
    # And the second sequence alone, unpadded, agrees too.
    torch.testing.assert_close(model(batch[1:, :3]), logits[1:], atol=1e-12, rtol=1e-12)
    # The padding mask matters: without it the padded sequence reads its pad tokens.
    assert not torch.allclose(model(padded)[1], logits[1])


@pytest.mark.parametrize("positional,n_kv_heads", [("learned", 2), ("rope", 1), ("sinusoidal", 4), ("none", 2)])
def test_kv_cache_decoding_matches_full_forward(positional, n_kv_heads):
    model = decoder(positional=positional, n_kv_heads=n_kv_heads)
    sequence = tokens(2, 10)
    full = model(sequence)
    cache = KVCache.for_model(model, batch_size=2)
    assert cache.keys[0].shape == (2, n_kv_heads, 12, 4)
    with torch.no_grad():
        # prefill 4 (empty cache), 2 single steps, then a 3-token chunk after a prefix, then 1 more
        pieces = [model(sequence[:, a:b], cache=cache) for a, b in ((0, 4), (4, 5), (5, 6), (6, 9), (9, 10))]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(sequence[:, :3], cache=cache)
    cache.reset()
    with torch.no_grad():
        torch.testing.assert_close(model(sequence[:, :4], cache=cache), full[:, :4], atol=1e-10, rtol=1e-10)


def test_tied_embeddings_and_num_params():
    tied = decoder(positional="learned")
    assert tied.lm_head.weight is tied.token_embedding.weight
    total = sum(p.numel() for p in tied.parameters())
    assert tied.num_params(non_embedding=False) == total
    assert tied.num_params() == total - 12 * 16  # the learned position table
    untied = decoder(positional="rope", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert untied.num_params() == untied.num_params(non_embedding=False) - VOCAB * 16


def test_estimate_mfu_follows_the_6n_formula():
    model = decoder()
    n, seq_len = model.num_params(), 12
    flops_per_token = 6 * n + 12 * 2 * 16 * seq_len
    assert model.estimate_mfu(1000.0, seq_len, peak_flops=1e9) == pytest.approx(flops_per_token * 1000.0 / 1e9)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(d_model=64, n_layers=8, n_heads=4, vocab_size=VOCAB))
    block = model.blocks[3]
    assert block.attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.attention.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert torch.count_nonzero(block.attention.qkv.bias) == 0
    assert torch.all(block.attention_norm.weight == 1)


def test_blocks_can_be_wrapped_from_outside_for_checkpointing():
    """A trainer wraps each block (here: activation checkpointing); the results do not change."""

    class Checkpointed(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args, **kwargs):
            return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False, **kwargs)

    model = decoder(positional="rope")
    batch = tokens(2, 6)
    expected = model(batch)
    expected_grad = torch.autograd.grad(expected.sum(), model.token_embedding.weight)[0]
    model.blocks = nn.ModuleList(Checkpointed(block) for block in model.blocks)
    logits = model(batch)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(torch.autograd.grad(logits.sum(), model.token_embedding.weight)[0], expected_grad)


def test_dropout_only_in_training():
    model = decoder(dropout=0.5, attn_dropout=0.5)
    batch = tokens(2, 6)
    torch.testing.assert_close(model(batch), model(batch), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(batch), model(batch))


def test_config_errors_name_the_argument_and_suggest():
    with pytest.raises(ValueError, match="d_model=30 must be divisible by n_heads=4"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_heads=4 must be divisible by n_kv_heads=3"):
        ModelConfig(n_kv_heads=3)
    with pytest.raises(ValueError, match="positional.*Did you mean 'rope'"):
        ModelConfig(positional="RoPE")
    with pytest.raises(ValueError, match="norm.*Did you mean 'layernorm'"):
        ModelConfig(norm="layer_norm")
    with pytest.raises(ValueError, match="backend.*Did you mean 'triton'"):
        ModelConfig(backend="trition")
    with pytest.raises(ValueError, match="pooling.*Did you mean 'mean'"):
        EncoderClassifierConfig(pooling="mena")
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown key 'n_layer'.*Did you mean 'n_layers'"):
        ModelConfig.from_dict({"n_layer": 2})
    assert ModelConfig.from_dict({"n_layers": 2}).n_layers == 2
    config = ModelConfig(d_model=64, n_heads=8)
    assert (config.d_ff, config.n_kv_heads, config.head_dim) == (256, 8, 8)


def test_model_input_errors():
    model = decoder()
    with pytest.raises(ValueError, match="tokens.*int64"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 13))
    with pytest.raises(ValueError, match="key_padding_mask"):
        encoder()(tokens(2, 4), key_padding_mask=torch.zeros(2, 4))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_models_run_under_autocast(norm):
    """Under autocast the sublayers return bfloat16 while the residual stream stays float32."""
    torch.manual_seed(0)
    lm = DecoderLM(tiny(positional="rope", norm=norm))
    classifier = EncoderClassifier(tiny(EncoderClassifierConfig, norm=norm))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lm(tokens(2, 6))
        class_logits = classifier(tokens(2, 6), key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    assert logits.dtype == torch.bfloat16
    (logits.float().mean() + class_logits.float().mean()).backward()
    assert torch.isfinite(lm.token_embedding.weight.grad).all()
    assert torch.isfinite(classifier.token_embedding.weight.grad).all()


def test_sinusoidal_positions_are_at_the_scale_of_the_token_embeddings():
    """The table is added to embeddings that start at std 0.02: at unit amplitude it swamps the
    tokens (a 2-layer LM stayed at unigram loss), so every model builds it at the embeddings' scale."""
    from tformer.models import EncoderDecoderConfig, EncoderDecoderTransformer

    models = [decoder(positional="sinusoidal"), encoder(positional="sinusoidal"),
              EncoderDecoderTransformer(tiny(EncoderDecoderConfig, positional="sinusoidal", encoder_input="tokens",
                                             src_vocab_size=VOCAB, n_kv_heads=4))]
    tables = [models[0].positional.table, models[1].positional.table, models[2].encoder_positional.table,
              models[2].decoder_positional.table]
    token_std = models[0].token_embedding.weight.std().item()
    for table in tables:
        table_rms = table.pow(2).mean().sqrt().item()  # sin/cos of unit amplitude: RMS 1/sqrt(2)
        assert 0.5 < table_rms / token_std < 2.0, (table_rms, token_std)
    # A speech encoder's frames come from the conv front end: its table keeps unit amplitude.
    speech = EncoderDecoderTransformer(tiny(EncoderDecoderConfig, positional="sinusoidal", encoder_input="speech",
                                            n_kv_heads=4, n_mels=16, conv_channels=4, max_source_len=64))
    assert abs(speech.encoder_positional.table.pow(2).mean().sqrt().item() - 2 ** -0.5) < 0.05
    assert speech.decoder_positional.table.abs().max().item() <= 0.02 + 1e-6
