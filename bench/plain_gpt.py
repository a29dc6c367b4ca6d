"""The baseline for the training-step benchmark: the same GPT-style decoder as
``tformer.models.DecoderLM``, written the way a user would write it in plain PyTorch
(nn.Linear, nn.LayerNorm, F.scaled_dot_product_attention) with no tformer op anywhere.

Same architecture as DecoderLM's defaults: learned positions, pre-LN blocks with biases,
a 4x GELU MLP, a final LayerNorm and a bias-free head tied to the token embedding, GPT-2
initialization. The benchmark checks that both have the same number of parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PlainGPTConfig:
    vocab_size: int = 256
    max_seq_len: int = 1024
    d_model: int = 512
    n_layers: int = 12
    n_heads: int = 8


class CausalSelfAttention(nn.Module):
    def __init__(self, config: PlainGPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # (B, T, 3·d) -> three (B, H, T, D), the layout SDPA takes.
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: PlainGPTConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = CausalSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.mlp_proj = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp_proj(F.gelu(self.fc(self.mlp_norm(x))))


class PlainGPT(nn.Module):
    def __init__(self, config: PlainGPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_gpt2()
        self.lm_head.weight = self.token_embedding.weight

    def _init_gpt2(self) -> None:
        # GPT-2: N(0, 0.02), zero biases; residual projections scaled by 1/sqrt(2·n_layers).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * max(self.config.n_layers, 1))
        for block in self.blocks:
            for layer in (block.attention.proj, block.mlp_proj):
                nn.init.normal_(layer.weight, mean=0.0, std=residual_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``(B, T)`` int64 -> logits ``(B, T, vocab_size)``."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))
