"""``SentenceClassifier``: a pretrained Hugging Face encoder, pooled by a
:class:`~tformer.models.SentenceEncoder`, under a fresh linear head (transfer learning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tformer.models.pretrained import PretrainedMixin
from tformer.schema import ConfigError, check_choices, from_dict


from .config import PoolingKind
from .sentence_encoder import SentenceEncoder
from .sentence_trunks import HFTrunk, resolve_pretrained


@dataclass(kw_only=True)
class SentenceClassifierConfig:
    """The ``model`` section of the ``classify_hf`` task (``num_classes`` and ``max_seq_len``
    come from the data unless set)."""

    pretrained: str = "all-MiniLM-L6-v2"
    """Packaged name, local folder or hub name (:meth:`SentenceEncoder.from_pretrained`)."""
    pooling: PoolingKind = "mean"
    """cls, mean or max over the trunk's token embeddings."""
    num_classes: int = 2
    """Classes of the head."""
    max_seq_len: int = 256
    """Tokens per input, special tokens included."""
    dropout: float = 0.1
    """Dropout on the pooled embedding, before the head."""
    attn_implementation: str = "tformer"
    """``sdpa`` or ``eager`` to compare against transformers' own attention."""
    backend: str | None = None
    """tformer backend for the attention (None: tformer's default)."""

    def __post_init__(self):
        check_choices(self, "SentenceClassifierConfig")
        if self.num_classes < 2 or self.max_seq_len < 2:
            raise ConfigError(f"config: model.num_classes and model.max_seq_len must be >= 2, got "
                              f"{self.num_classes} and {self.max_seq_len}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config: model.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, values: dict) -> SentenceClassifierConfig:
        return from_dict(cls, values, "model.")

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


class SentenceClassifier(PretrainedMixin, nn.Module):
    """Pretrained trunk -> pooling -> dropout -> ``head`` (Linear to ``num_classes``).

    The trunk's weights come from ``config.pretrained``; only ``head`` starts fresh.
    """

    config_class = SentenceClassifierConfig

    def __init__(self, config: SentenceClassifierConfig):
        super().__init__()
        self.config = config
        trunk = HFTrunk.from_pretrained(resolve_pretrained(config.pretrained), backend=config.backend,
                                        attn_implementation=config.attn_implementation)
        self.encoder = SentenceEncoder(trunk, pooling=config.pooling, normalize=False, max_length=config.max_seq_len)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(trunk.hidden_size, config.num_classes)

    @property
    def blocks(self) -> nn.ModuleList:
        """The trunk's layers (the trainer shards and checkpoints per layer)."""
        return self.encoder.trunk.blocks

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens ``(B, S)``, key_padding_mask ``(B, S)`` bool (True = padding) -> logits ``(B, C)``."""
        attention_mask = torch.ones_like(tokens) if key_padding_mask is None else (~key_padding_mask).long()
        return self.head(self.dropout(self.encoder(tokens, attention_mask)))
