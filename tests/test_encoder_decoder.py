"""EncoderDecoderTransformer and its decoding: cross-attention against the float64 reference
on every backend, causality, the KV cache, greedy and beam search."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tformer.generation.seq2seq import beam_search, decode
from tformer.models import EncoderDecoderConfig, EncoderDecoderTransformer
from tformer.models.pretrained import load_pretrained, save_pretrained
from tformer.nn import Attention, TransformerBlock
from tformer.nn.transformer_block import rename_old_keys

from conftest import DEVICE, call_or_skip
from tolerances import assert_close_to_reference

BOS, EOS = 1, 2


def token_model(seed=0, **overrides):
    torch.manual_seed(seed)
    values = dict(encoder_input="tokens", vocab_size=11, src_vocab_size=13, d_model=32, n_heads=4, n_layers=2,
                  n_encoder_layers=2, max_seq_len=24, max_source_len=24, backend="reference")
    values.update(overrides)
    return EncoderDecoderTransformer(EncoderDecoderConfig(**values)).eval()


def source_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(3, 13, (3, 9), generator=generator)
    lengths = torch.tensor([9, 4, 6])
    return source, lengths


# --- cross-attention ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cross_attention_matches_reference_with_encoder_padding(backend, dtype):
    # Plain PyTorch implementation in float64: Sq=7 decoder positions over Sk=19 encoder frames,
    # the second row padded after 5 frames.
    torch.manual_seed(0)
    layer = Attention(32, 4, cross=True, backend=backend).to(device=DEVICE, dtype=torch.float64)
    x = torch.randn(2, 7, 32, dtype=torch.float64, device=DEVICE)
    memory = torch.randn(2, 19, 32, dtype=torch.float64, device=DEVICE)
    padding = torch.arange(19, device=DEVICE)[None, :] >= torch.tensor([19, 5], device=DEVICE)[:, None]
    q = layer.q(x).view(2, 7, 4, 8).transpose(1, 2)
    k, v = (t.view(2, 19, 4, 8).transpose(1, 2) for t in layer.kv(memory).chunk(2, dim=-1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    expected = layer.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))

    # Check results: the backend in dtype, padding frames changed to garbage must not matter.
    layer = layer.to(dtype)
    memory_garbage = memory.clone()
    memory_garbage[1, 5:] = 1e3
    for mem in (memory, memory_garbage):
        out = call_or_skip(lambda: layer(x.to(dtype), layer.project_memory(mem.to(dtype)),
                                         memory_padding_mask=padding))
        assert_close_to_reference(out, expected, dtype, what=f"cross-attention {backend}")


# --- the model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_decoder_never_sees_the_future(norm_first):
    model = token_model(norm_first=norm_first, positional="rope")
    source, lengths = source_batch()
    targets = torch.randint(3, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    logits = model(source, lengths, targets)
    for position in (0, 3, 6):
        changed = targets.clone()
        changed[:, position + 1:] = (changed[:, position + 1:] + 1) % 11
        other = model(source, lengths, changed)
        assert torch.equal(logits[:, :position + 1], other[:, :position + 1])
        assert not torch.equal(logits[:, position + 1:], other[:, position + 1:])


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_decoder_block_computes_the_single_stream_layer(norm_position):
    # Plain PyTorch implementation in float64 of one decoder layer of Vaswani et al. on one
    # stream: pre-LN x + f(norm(x)), post-LN norm(x + f(x)), for self-attention, cross-attention
    # and the MLP in turn (the formulas of the encoder-decoder's former layer class).
    torch.manual_seed(0)
    block = TransformerBlock(16, 4, causal=True, cross_attention=True, norm_position=norm_position,
                             backend="reference").to(torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    memory = torch.randn(2, 7, 16, dtype=torch.float64)
    padding = torch.arange(7)[None, :] >= torch.tensor([7, 3])[:, None]
    memory_kv = block.project_memory(memory)
    sublayers = [(block.attention_norm, lambda h: block.attention(h)),
                 (block.cross_attention_norm, lambda h: block.cross_attention(h, memory_kv,
                                                                              memory_padding_mask=padding)),
                 (block.mlp_norm, block.mlp)]
    expected = x
    for norm, f in sublayers:
        expected = expected + f(norm(expected)) if norm_position == "pre" else norm(expected + f(expected))

    # Check results
    hidden, residual = block(x, memory_kv=memory_kv, memory_padding_mask=padding)
    out = hidden if residual is None else hidden + residual
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs argument 'memory_kv'"):
        block(x)


def test_norm_first_is_an_alias_of_norm_position():
    assert EncoderDecoderConfig(norm_first=False).norm_position == "post"
    assert EncoderDecoderConfig(norm_position="post").norm_first is False
    assert EncoderDecoderConfig().norm_position == "pre" and EncoderDecoderConfig().norm_first is True
    post = token_model(norm_first=False)
    assert all(block.norm_position == "post" for block in post.blocks)
    assert isinstance(post.encoder_norm, nn.Identity)
    config = EncoderDecoderConfig(norm_first=False)
    assert EncoderDecoderConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_checkpoints_with_the_former_layer_keys_still_load(norm_first):
    # The encoder-decoder's layers saved their self-attention as 'self_attention.*' and
    # 'self_attention_norm.*'; the one block names them 'attention.*' and 'attention_norm.*'.
    model = token_model(seed=0, norm_first=norm_first)
    old_state = {}
    for key, value in model.state_dict().items():
        for new, old in ((".attention.", ".self_attention."), (".attention_norm.", ".self_attention_norm.")):
            if "_blocks." in key and new in key and ".cross_attention" not in key:
                key = key.replace(new, old, 1)
        old_state[key] = value
    assert any(".self_attention." in key for key in old_state)
    # The former sublayer order too: seeded init draws and optimizer states follow it.
    assert [name for name, _ in model.decoder_blocks[0].named_children()][:6] == [
        "attention", "attention_norm", "cross_attention", "cross_attention_norm", "mlp", "mlp_norm"]
    assert rename_old_keys(model, old_state).keys() == model.state_dict().keys()
    fresh = token_model(seed=1, norm_first=norm_first)
    fresh.load_state_dict(old_state, strict=True)
    source, lengths = source_batch()
    targets = torch.randint(3, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(fresh(source, lengths, targets), model(source, lengths, targets))


def test_encoder_padding_does_not_change_the_output():
    model = token_model()
    source, lengths = source_batch()
    targets = torch.randint(3, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    logits = model(source, lengths, targets)
    garbage = source.clone()
    garbage[1, 4:] = 5
    alone = model(source[1:2, :4], lengths[1:2], targets[1:2])
    torch.testing.assert_close(model(garbage, lengths, targets), logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(alone, logits[1:2], atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_export_round_trip(tmp_path):
    model = token_model(tie_embeddings=True, ctc=True)
    assert model.lm_head.weight is model.token_embedding.weight
    assert token_model(tie_embeddings=False).lm_head.weight is not token_model().token_embedding.weight
    save_pretrained(model, tmp_path / "export", task="asr")
    loaded, _ = load_pretrained(tmp_path / "export")
    source, lengths = source_batch()
    targets = torch.full((3, 2), BOS)
    assert torch.equal(loaded(source, lengths, targets), model(source, lengths, targets))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="encoder_input"):
        EncoderDecoderConfig(encoder_input="pixels")
    with pytest.raises(ValueError, match="n_kv_heads"):
        EncoderDecoderConfig(n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="max_source_len"):
        token_model()(torch.zeros(1, 30, dtype=torch.long), torch.tensor([30]), torch.zeros(1, 1, dtype=torch.long))


# --- decoding -----------------------------------------------------------------------------------
def test_cached_and_uncached_decoding_give_the_same_tokens():
    model = token_model(positional="learned")
    source, lengths = source_batch()
    cached = decode(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=15)
    uncached = decode(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=15, use_cache=False)
    assert cached == uncached and max(len(row) for row in cached) > 3


def test_sampling_shares_the_lm_helper_and_is_seeded():
    model = token_model()
    source, lengths = source_batch()

    def sample(seed):
        return decode(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=12, greedy=False, temperature=1.5,
                      top_k=5, generator=torch.Generator().manual_seed(seed))

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    with pytest.raises(ValueError, match="temperature"):
        decode(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=4, greedy=False, temperature=0.0)


def test_beam_width_one_is_greedy():
    model = token_model(seed=3)
    source, lengths = source_batch(seed=3)
    greedy = decode(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=12)
    assert beam_search(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=12, num_beams=1) == greedy


class ToyBigramModel(nn.Module):
    """A hand-built decoder whose next-token distribution depends only on the previous token:
    after BOS, "a" (3) 0.6 and "b" (4) 0.4; after "a", EOS 0.34, "a" 0.33, "b" 0.33; after "b",
    EOS 0.99. Greedy takes "a" then EOS (p = 0.204); the best sequence is "b" EOS (p = 0.396)."""

    TABLE = {BOS: {3: 0.6, 4: 0.4}, 3: {EOS: 0.34, 3: 0.33, 4: 0.33}, 4: {EOS: 0.99}}

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(n_layers=1, n_kv_heads=1, head_dim=1, max_seq_len=16)
        self.dummy = nn.Parameter(torch.zeros(1))
        log_table = torch.full((5, 5), -30.0)
        for previous, row in self.TABLE.items():
            for token, prob in row.items():
                log_table[previous, token] = math.log(prob)
        self.register_buffer("log_table", log_table)

    def encode(self, source, lengths):
        return torch.zeros(source.shape[0], 1, 1), torch.zeros(source.shape[0], 1, dtype=torch.bool)

    def memory_kv(self, memory):
        return [None]

    def decode(self, tokens, memory_kv, padding_mask, cache=None):
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.log_table[tokens]


def test_beam_search_finds_the_known_best_sequence_on_a_toy_model():
    model = ToyBigramModel()
    source, lengths = torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 1])
    assert decode(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=5) == [[3], [3]]
    for penalty in (0.0, 1.0):
        found = beam_search(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=5, num_beams=2,
                            length_penalty=penalty)
        assert found == [[4], [4]]


def test_beam_search_is_batched_consistently():
    model = token_model(seed=4)
    source, lengths = source_batch(seed=4)
    together = beam_search(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=10, num_beams=3)
    alone = [beam_search(model, source[i:i + 1, :lengths[i]], lengths[i:i + 1], bos_id=BOS, eos_id=EOS, max_len=10,
                         num_beams=3)[0] for i in range(3)]
    assert together == alone
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, source, lengths, bos_id=BOS, eos_id=EOS, max_len=4, num_beams=0)
