"""What DecoderLM and EncoderClassifier share: the block stack and GPT-2 weight init."""

from __future__ import annotations

import math

from torch import nn

from tformer.nn import PositionalEncoding, TransformerBlock, positional_encoding

from .config import ModelConfig


def build_blocks(config: ModelConfig, *, causal: bool) -> nn.ModuleList:
    """``config.n_layers`` :class:`~tformer.nn.TransformerBlock` s in an ``nn.ModuleList`` (so a
    trainer can wrap each one for activation checkpointing or FSDP from outside)."""
    return nn.ModuleList(
        TransformerBlock(config.d_model, config.n_heads, num_kv_heads=config.n_kv_heads, d_ff=config.d_ff,
                         dropout=config.dropout, attn_dropout=config.attn_dropout, norm=config.norm, bias=config.bias,
                         causal=causal, layer_index=index, norm_position=config.norm_position,
                         backend=config.backend)
        for index in range(config.n_layers))


# GPT-2's init std of linear and embedding weights (Radford et al., 2019).
EMBEDDING_STD = 0.02


def model_positional_encoding(config, max_seq_len: int, *, embedding_std: float = EMBEDDING_STD) -> PositionalEncoding:
    """``config.positional`` added to embeddings of std ``embedding_std`` (an :func:`init_gpt2`
    table by default): a sinusoidal table at that scale (see SinusoidalPositionalEncoding), the
    others as they are."""
    return positional_encoding(config.positional, max_seq_len=max_seq_len, d_model=config.d_model,
                               head_dim=config.head_dim, sinusoidal_scale=embedding_std)


def init_gpt2(model: nn.Module, blocks: nn.ModuleList, n_layers: int) -> None:
    """GPT-2 initialization (Radford et al., 2019): linear and embedding weights ~ N(0, 0.02),
    biases zero, norms at identity; the projections that write into the residual stream get
    std ``0.02 / sqrt(2 * n_layers)`` so the stream's variance does not grow with depth."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=EMBEDDING_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=EMBEDDING_STD)
    residual_std = EMBEDDING_STD / math.sqrt(2 * max(n_layers, 1))
    for block in blocks:
        for layer in block.residual_projections():
            nn.init.normal_(layer.weight, mean=0.0, std=residual_std)
