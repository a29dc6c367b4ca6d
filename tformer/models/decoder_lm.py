"""``DecoderLM``: a causal, token-level (bytes or characters) language model."""

from __future__ import annotations

import torch
from torch import nn

from tformer.models.pretrained import PretrainedMixin
from tformer.nn import LearnedPositionalEncoding, add_and_norm, make_norm

from .config import ModelConfig
from .kv_cache import KVCache, first_position
from .trunk import build_blocks, init_gpt2, model_positional_encoding


class DecoderLM(PretrainedMixin, nn.Module):
    """GPT-style decoder: token embedding, positional encoding, ``config.n_layers`` pre-LN
    causal :class:`~tformer.nn.TransformerBlock` s, a final norm and a linear head (tied to the
    token embedding when ``config.tie_embeddings``).

    The model knows nothing about parallelism: ``blocks`` is an ``nn.ModuleList`` that a
    trainer may wrap per block (activation checkpointing, FSDP ``fully_shard``).
    """

    config_class = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.positional = model_positional_encoding(config, config.max_seq_len)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = build_blocks(config, causal=True)
        self.final_norm = make_norm(config.norm, config.d_model, bias=config.bias, backend=config.backend)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_gpt2(self, self.blocks, config.n_layers)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        """tokens ``(B, T)`` int64 -> logits ``(B, T, vocab_size)``.

        With ``cache``, tokens continue the cached sequence (positions ``cache.length ..``): their
        keys and values are appended and they attend to everything before them.
        """
        offset = first_position("DecoderLM", tokens, cache)
        length = tokens.shape[1]
        if offset + length > self.config.max_seq_len:
            raise ValueError(f"DecoderLM: positions [{offset}, {offset + length}) exceed config.max_seq_len="
                             f"{self.config.max_seq_len}")
        hidden = self.positional.add_to_embeddings(self.token_embedding(tokens), offset)
        hidden = self.embedding_dropout(hidden)
        residual = None
        for block in self.blocks:
            hidden, residual = block(hidden, residual, positional=self.positional, position_offset=offset,
                                     kv_cache=cache)
        hidden, _ = add_and_norm(self.final_norm, hidden, residual)
        if cache is not None:
            cache.advance(length)
        return self.lm_head(hidden)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (shared ones counted once). ``non_embedding`` leaves out the
        lookup tables (position table; token table when it is not tied to the head), as in
        nanoGPT and Kaplan et al. (2020)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if isinstance(self.positional, LearnedPositionalEncoding):
                total -= self.positional.embedding.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.token_embedding.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT:
        ``6 N`` for the weights plus ``12 * n_layers * d_model * seq_len`` for attention."""
        config = self.config
        return 6 * self.num_params() + 12 * config.n_layers * config.d_model * seq_len

    def estimate_mfu(self, tokens_per_second: float, seq_len: int, peak_flops: float | None) -> float | None:
        """Model FLOPs utilization: achieved training FLOP/s over the device's ``peak_flops``
        (:func:`tformer.training.device_peak.device_peak_flops`); None when the peak is unknown."""
        if peak_flops is None:
            return None
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops
