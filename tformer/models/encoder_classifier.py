"""``EncoderClassifier``: a bidirectional transformer encoder with a classification head."""

from __future__ import annotations

import torch
from torch import nn

from tformer.models.pretrained import PretrainedMixin
from tformer.nn import Pooling, add_and_norm, make_norm

from .config import EncoderClassifierConfig
from .trunk import build_blocks, init_gpt2, model_positional_encoding


class EncoderClassifier(PretrainedMixin, nn.Module):
    """Token embedding, positional encoding, ``config.n_layers`` bidirectional pre-LN blocks that
    ignore padding keys, a final norm, pooling and a linear head.

    Pooling (:class:`~tformer.nn.Pooling`): ``"cls"`` prepends a learned CLS embedding at position
    0 and classifies its output; ``"mean"`` averages (``"max"`` takes the maximum of) the outputs
    of the non-padding tokens. Padding never changes
    the logits: padding keys are masked in every layer and excluded from the pooling.
    """

    config_class = EncoderClassifierConfig

    def __init__(self, config: EncoderClassifierConfig):
        super().__init__()
        if not isinstance(config, EncoderClassifierConfig):
            raise TypeError(f"EncoderClassifier: argument 'config' must be an EncoderClassifierConfig, got "
                            f"{type(config).__name__}")
        self.config = config
        self.uses_cls = config.pooling == "cls"
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        positions = config.max_seq_len + (1 if self.uses_cls else 0)
        self.positional = model_positional_encoding(config, positions)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, config.d_model)) if self.uses_cls else None
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = build_blocks(config, causal=False)
        self.final_norm = make_norm(config.norm, config.d_model, bias=config.bias, backend=config.backend)
        self.pool = Pooling(config.pooling)
        self.head = nn.Linear(config.d_model, config.num_classes, bias=True)
        init_gpt2(self, self.blocks, config.n_layers)
        if self.cls_embedding is not None:
            nn.init.normal_(self.cls_embedding, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens ``(B, S)`` int64, key_padding_mask ``(B, S)`` bool (True = padding) -> logits
        ``(B, num_classes)``."""
        return self.head(self.pooled(tokens, key_padding_mask))

    def pooled(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled state the head reads, ``(B, d_model)`` (t-SNE plots, embeddings)."""
        hidden, key_padding_mask = self.encode(tokens, key_padding_mask)
        return self.pool(hidden, None if key_padding_mask is None else ~key_padding_mask)

    def encode(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        """The trunk without the head: ``(hidden, key_padding_mask)``, the final-norm outputs
        ``(B, S', d_model)`` and the mask over them; ``S' = S + 1`` with the CLS position first
        when ``pooling="cls"``. Shared with :class:`~tformer.models.EncoderMaskedLM`."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"{type(self).__name__}: argument 'tokens' must be a (B, S) int64 tensor, got shape "
                             f"{tuple(tokens.shape)} and dtype {tokens.dtype}")
        batch, length = tokens.shape
        if length > self.config.max_seq_len:
            raise ValueError(f"{type(self).__name__}: {length} tokens exceed config.max_seq_len="
                             f"{self.config.max_seq_len}")
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                             or tuple(key_padding_mask.shape) != (batch, length)):
            raise ValueError(f"{type(self).__name__}: argument 'key_padding_mask' must be a bool tensor of shape "
                             f"(B, S) = {(batch, length)}, got {key_padding_mask.dtype} "
                             f"{tuple(key_padding_mask.shape)}")
        hidden = self.token_embedding(tokens)
        if self.uses_cls:
            hidden = torch.cat([self.cls_embedding.to(hidden.dtype).expand(batch, 1, -1), hidden], dim=1)
            if key_padding_mask is not None:
                key_padding_mask = torch.cat([key_padding_mask.new_zeros(batch, 1), key_padding_mask], dim=1)
        hidden = self.embedding_dropout(self.positional.add_to_embeddings(hidden, 0))
        residual = None
        for block in self.blocks:
            hidden, residual = block(hidden, residual, key_padding_mask=key_padding_mask, positional=self.positional)
        hidden, _ = add_and_norm(self.final_norm, hidden, residual)
        return hidden, key_padding_mask
