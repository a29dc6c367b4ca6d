"""``TransformerBlock``: a pre-LN (or post-LN) block (attention, then MLP) on the fused residual-add norm."""

from __future__ import annotations

import torch
from torch import nn

from tformer.schema import check_choice
from .normalization import make_norm
from .self_attention import SelfAttention

# "pre": norm before each sublayer (GPT-2, Xiong et al. 2020); "post": norm after each residual
# add (the original Transformer, Vaswani et al. 2017).
NORM_POSITIONS: tuple[str, ...] = ("pre", "post")


def add_and_norm(norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None):
    """``(norm(hidden + residual), hidden + residual)`` by the fused residual-add norm;
    ``residual=None`` starts the stream at ``hidden``.

    The stream keeps the residual's dtype (the embeddings' dtype: float32 under autocast, as
    in flash-attn's ``residual_in_fp32``), so a sublayer's half-precision output is cast up to
    it before the add instead of rounding the stream down to half precision.
    """
    if residual is None:
        return norm(hidden), hidden
    return norm(hidden.to(residual.dtype), residual=residual)


class MLP(nn.Module):
    """``proj(gelu(fc(x)))``, ``d_model -> d_ff -> d_model``."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.activation = nn.GELU()
        self.proj = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block (GPT-2 / Xiong et al., 2020), written on the residual stream.

    ``forward(hidden, residual)`` returns ``(hidden, residual)``: the block's input stream is
    ``hidden + residual`` (``residual=None`` for the first block) and its output stream is the
    returned ``hidden + residual``. Keeping the two apart lets every norm be the fused
    residual-add norm ``norm(hidden, residual=residual) -> (norm(sum), sum)``, one kernel that
    reads both and writes both, instead of an add followed by a norm. The model finishes with
    ``final_norm(hidden, residual=residual)``.

    ``norm_position="post"`` is the original Transformer's post-LN block,
    ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``: the stream is normalized after every add,
    so the block returns ``(x, None)`` (its output is the whole stream) and the same fused
    kernel computes each ``norm(sublayer + x)``.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, d_ff: int | None = None,
                 dropout: float = 0.0, attn_dropout: float = 0.0, norm: str = "layernorm", bias: bool = True,
                 causal: bool = True, layer_index: int = 0, norm_position: str = "pre", backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        check_choice("TransformerBlock: argument 'norm_position'", norm_position, NORM_POSITIONS)
        self.norm_position = norm_position
        factory = dict(device=device, dtype=dtype)
        self.attention_norm = make_norm(norm, d_model, bias=bias, backend=backend, **factory)
        self.attention = SelfAttention(d_model, num_heads, num_kv_heads=num_kv_heads, bias=bias,
                                       attn_dropout=attn_dropout, causal=causal, layer_index=layer_index,
                                       backend=backend, **factory)
        self.mlp_norm = make_norm(norm, d_model, bias=bias, backend=backend, **factory)
        self.mlp = MLP(d_model, d_ff if d_ff is not None else 4 * d_model, bias=bias, **factory)
        self.residual_dropout = nn.Dropout(dropout)

    def residual_projections(self) -> list[nn.Linear]:
        """The layers that write into the residual stream (GPT-2 scales their init)."""
        return [self.attention.proj, self.mlp.proj]

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, positional=None, position_offset: int = 0,
                kv_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual ``(B, T, d_model)``; the keyword arguments go to
        :meth:`SelfAttention.forward`."""
        attention_kwargs = dict(key_padding_mask=key_padding_mask, positional=positional,
                                position_offset=position_offset, kv_cache=kv_cache)
        if self.norm_position == "post":
            return self._post_norm_forward(hidden, residual, attention_kwargs)
        normed, residual = add_and_norm(self.attention_norm, hidden, residual)
        hidden = self.residual_dropout(self.attention(normed, key_padding_mask=key_padding_mask,
                                                      positional=positional, position_offset=position_offset,
                                                      kv_cache=kv_cache))
        normed, residual = add_and_norm(self.mlp_norm, hidden, residual)
        hidden = self.residual_dropout(self.mlp(normed))
        return hidden, residual

    def _post_norm_forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                           attention_kwargs: dict) -> tuple[torch.Tensor, None]:
        stream = hidden if residual is None else hidden.to(residual.dtype) + residual
        attended = self.residual_dropout(self.attention(stream, **attention_kwargs))
        stream, _ = add_and_norm(self.attention_norm, attended, stream)  # norm1(x + attn(x))
        transformed = self.residual_dropout(self.mlp(stream))
        stream, _ = add_and_norm(self.mlp_norm, transformed, stream)  # norm2(x + mlp(x))
        return stream, None
