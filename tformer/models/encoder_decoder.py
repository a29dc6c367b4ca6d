"""``EncoderDecoderTransformer``: the encoder-decoder of Vaswani et al. (2017), over token or
speech inputs, with a KV cache for the decoder and cached encoder projections for decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tformer.models.pretrained import PretrainedMixin
from tformer.nn import TransformerBlock, add_and_norm, make_norm
from tformer.nn.speech import SpeechEmbedding

from .config import ModelConfig, _check_positive_int
from .kv_cache import KVCache, first_position
from .trunk import EMBEDDING_STD, init_gpt2, model_positional_encoding

ENCODER_INPUTS: tuple[str, ...] = ("speech", "tokens")
EncoderInput = Literal[ENCODER_INPUTS]


@dataclass(kw_only=True)
class EncoderDecoderConfig(ModelConfig):
    """An encoder-decoder: the ``model`` section of the ``asr`` task. The inherited fields
    describe the decoder (``vocab_size`` targets, ``max_seq_len`` target positions, ``n_layers``
    decoder layers, ``tie_embeddings`` ties the decoder's input embedding to its output head);
    ``d_model``, ``n_heads``, ``d_ff``, norms, dropout and positional encoding are shared by both
    stacks. ``norm_position`` is "pre" (pre-LN, default) or "post" (the original post-LN), as in
    every model."""

    encoder_input: EncoderInput = "speech"
    """``speech`` (waveforms through :class:`~tformer.nn.speech.SpeechEmbedding`) or ``tokens``
    (``src_vocab_size`` embeddings)."""
    n_encoder_layers: int = 4
    """Encoder depth."""
    src_vocab_size: int = 256
    """Source embeddings (``encoder_input="tokens"``)."""
    max_source_len: int = 512
    """Encoder positions (after the x4 subsampling for speech)."""
    norm_first: bool = True
    """The older spelling of ``norm_position``, kept for the configs that write it: False means
    ``norm_position="post"``. Either key set to post-LN makes both say so."""
    ctc: bool = False
    """Add a linear CTC head on the encoder output (for an auxiliary loss); blank = id 0."""
    sample_rate: int = 16000
    """Waveform samples per second (speech)."""
    n_mels: int = 80
    """Mel bands of the speech front end."""
    conv_channels: int = 64
    """Channels of the speech front end's subsampling convolutions."""
    spec_augment: bool = True
    """SpecAugment-style time and frequency masking of the features while training."""

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        if not isinstance(self.norm_first, bool):
            raise ValueError(f"{owner}: argument 'norm_first' must be a bool, got {self.norm_first!r}")
        if not self.norm_first:
            self.norm_position = "post"
        self.norm_first = self.norm_position == "pre"
        for name in ("n_encoder_layers", "src_vocab_size", "max_source_len", "sample_rate", "n_mels", "conv_channels"):
            _check_positive_int(owner, name, getattr(self, name))
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"{owner}: n_kv_heads must equal n_heads (cross-attention has no grouped heads), got "
                             f"n_kv_heads={self.n_kv_heads}, n_heads={self.n_heads}")


class EncoderDecoderTransformer(PretrainedMixin, nn.Module):
    """Encoder (bidirectional self-attention that ignores padding frames) and decoder (causal
    self-attention, cross-attention over the encoder output with the encoder's padding mask),
    every attention through ``tformer.ops.attention``.

    Teacher forcing: ``forward(source, source_lengths, targets_in)`` -> logits. Decoding:
    :meth:`encode` once, :meth:`memory_kv` once (each decoder layer's keys and values of the
    encoder output), then :meth:`decode` one token at a time with a :class:`KVCache`.
    """

    config_class = EncoderDecoderConfig

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        if not isinstance(config, EncoderDecoderConfig):
            raise TypeError(f"EncoderDecoderTransformer: argument 'config' must be an EncoderDecoderConfig, got "
                            f"{type(config).__name__}")
        self.config = config
        if config.encoder_input == "speech":
            self.source_embedding = SpeechEmbedding(config.d_model, sample_rate=config.sample_rate,
                                                    n_mels=config.n_mels, channels=config.conv_channels,
                                                    spec_augment=config.spec_augment)
        else:
            self.source_embedding = nn.Embedding(config.src_vocab_size, config.d_model)
        # Speech frames come from the conv front end, not from a 0.02 table, and the encoder needs
        # strong positions to align them: on asr_espeak.json a unit table gave val CER 0.552 (loss
        # 1.89), a 0.02 one 0.734 (loss 2.29). Token inputs (either stack) take 0.02.
        source_std = 1.0 if config.encoder_input == "speech" else EMBEDDING_STD
        self.encoder_positional = model_positional_encoding(config, config.max_source_len, embedding_std=source_std)
        self.decoder_positional = model_positional_encoding(config, config.max_seq_len)
        block = dict(d_ff=config.d_ff, norm_position=config.norm_position, dropout=config.dropout,
                     attn_dropout=config.attn_dropout, norm=config.norm, bias=config.bias, backend=config.backend)
        self.encoder_blocks = nn.ModuleList(
            TransformerBlock(config.d_model, config.n_heads, causal=False, cross_attention=False, layer_index=index,
                             **block) for index in range(config.n_encoder_layers))
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(config.d_model, config.n_heads, causal=True, cross_attention=True, layer_index=index,
                             **block) for index in range(config.n_layers))
        for layer in (*self.encoder_blocks, *self.decoder_blocks):
            _in_former_order(layer)
        # Pre-LN leaves the stream un-normalized, so each stack ends with a norm; post-LN's
        # stream is already normalized.
        final_norm = (lambda: make_norm(config.norm, config.d_model, bias=config.bias, backend=config.backend)) \
            if config.norm_position == "pre" else nn.Identity
        self.encoder_norm = final_norm()
        self.decoder_norm = final_norm()
        self.dropout = nn.Dropout(config.dropout)
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.ctc_head = nn.Linear(config.d_model, config.vocab_size) if config.ctc else None
        init_gpt2(self, nn.ModuleList([*self.encoder_blocks, *self.decoder_blocks]),
                  config.n_encoder_layers + config.n_layers)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    @property
    def blocks(self) -> nn.ModuleList:
        """Both stacks (the trainer wraps each block for activation checkpointing)."""
        return nn.ModuleList([*self.encoder_blocks, *self.decoder_blocks])

    # --- encoder --------------------------------------------------------------------------------
    def encode(self, source: torch.Tensor, source_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source: waveforms ``(B, N)`` float (speech) or tokens ``(B, S)`` int64; source_lengths
        ``(B,)`` samples or tokens per row. Returns ``(memory (B, S', d_model), memory_padding_mask
        (B, S') bool)``, True = padding."""
        if source.dim() != 2 or source_lengths.shape != source.shape[:1]:
            raise ValueError(f"EncoderDecoderTransformer: arguments 'source' (B, N) and 'source_lengths' (B,) "
                             f"must agree, got {tuple(source.shape)} and {tuple(source_lengths.shape)}")
        if self.config.encoder_input == "speech":
            hidden, padding_mask = self.source_embedding(source, source_lengths)
        else:
            if source.dtype != torch.long:
                raise ValueError(f"EncoderDecoderTransformer: token 'source' must be int64, got {source.dtype}")
            hidden = self.source_embedding(source)
            padding_mask = torch.arange(source.shape[1], device=source.device)[None, :] >= source_lengths[:, None]
        if hidden.shape[1] > self.config.max_source_len:
            raise ValueError(f"EncoderDecoderTransformer: the encoder input has {hidden.shape[1]} positions, more "
                             f"than config.max_source_len={self.config.max_source_len}")
        hidden = self.dropout(self.encoder_positional.add_to_embeddings(hidden, 0))
        residual = None
        for block in self.encoder_blocks:
            hidden, residual = block(hidden, residual, key_padding_mask=padding_mask,
                                     positional=self.encoder_positional)
        hidden, _ = add_and_norm(self.encoder_norm, hidden, residual)
        return hidden, padding_mask

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values of ``memory``, computed once per
        input and reused at every decoding step."""
        return [block.project_memory(memory) for block in self.decoder_blocks]

    def ctc_logits(self, memory: torch.Tensor) -> torch.Tensor:
        """``(B, S', vocab_size)`` CTC logits of the encoder output (needs ``config.ctc``)."""
        if self.ctc_head is None:
            raise ValueError("EncoderDecoderTransformer: ctc_logits needs config.ctc=True")
        return self.ctc_head(memory)

    # --- decoder --------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor, memory_kv, memory_padding_mask: torch.Tensor | None, *,
               cache: KVCache | None = None) -> torch.Tensor:
        """tokens ``(B, T)`` int64 (continuing the cached ones when ``cache`` is given) ->
        logits ``(B, T, vocab_size)``."""
        offset = first_position("EncoderDecoderTransformer", tokens, cache)
        length = tokens.shape[1]
        hidden = self.dropout(self.decoder_positional.add_to_embeddings(self.token_embedding(tokens), offset))
        residual = None
        for block, kv in zip(self.decoder_blocks, memory_kv):
            hidden, residual = block(hidden, residual, positional=self.decoder_positional, position_offset=offset,
                                     kv_cache=cache, memory_kv=kv, memory_padding_mask=memory_padding_mask)
        if cache is not None:
            cache.advance(length)
        hidden, _ = add_and_norm(self.decoder_norm, hidden, residual)
        return self.lm_head(hidden)

    def forward(self, source: torch.Tensor, source_lengths: torch.Tensor, tokens: torch.Tensor, *,
                return_ctc: bool = False):
        """Teacher forcing: logits ``(B, T, vocab_size)`` for decoder inputs ``tokens (B, T)``.
        ``return_ctc`` (needs ``config.ctc``) also returns the encoder's CTC logits ``(B, S',
        vocab_size)`` and its padding mask ``(B, S')``, in one forward call (as wrappers such as
        FSDP need)."""
        memory, padding_mask = self.encode(source, source_lengths)
        logits = self.decode(tokens, self.memory_kv(memory), padding_mask)
        if return_ctc:
            return logits, self.ctc_logits(memory), padding_mask
        return logits


# The order this model's layers registered their sublayers in before they became
# TransformerBlocks. It fixes the order of the seeded initialization draws (init_gpt2 walks
# modules in order) and of ``parameters()`` (what optimizer states index by), so a run seeded as
# before starts from the same weights and an optimizer state saved before still lines up.
_FORMER_ORDER = ("attention", "attention_norm", "cross_attention", "cross_attention_norm", "mlp", "mlp_norm")


def _in_former_order(block: TransformerBlock) -> None:
    first = [name for name in _FORMER_ORDER if name in block._modules]
    block._modules = {**{name: block._modules[name] for name in first}, **block._modules}

