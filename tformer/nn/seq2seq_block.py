"""``Seq2SeqBlock``: an encoder or decoder layer of the encoder-decoder transformer
(self-attention, optional cross-attention, MLP), pre-LN or post-LN."""

from __future__ import annotations

import torch
from torch import nn

from .cross_attention import CrossAttention
from .normalization import make_norm
from .self_attention import SelfAttention
from .transformer_block import MLP


class Seq2SeqBlock(nn.Module):
    """One layer of Vaswani et al. (2017): self-attention (causal in the decoder), then
    cross-attention over the encoder output when ``cross_attention``, then the MLP, each a
    residual sublayer.

    ``norm_first=True`` (default) is pre-LN, ``x + f(norm(x))`` (Xiong et al., 2020: trains
    without warm-up tricks and needs a final norm); ``False`` is the original post-LN,
    ``norm(x + f(x))``. Unlike :class:`~tformer.nn.TransformerBlock` this keeps one stream, since
    post-LN's norm sits on the stream itself.
    """

    # Methods besides ``forward`` that read this block's weights. A wrapper that gathers sharded
    # weights around ``forward`` (FSDP2, see tformer.training.parallelize) gathers around these too.
    forward_methods = ("project_memory",)

    def __init__(self, d_model: int, num_heads: int, *, d_ff: int | None = None, causal: bool,
                 cross_attention: bool, norm_first: bool = True, dropout: float = 0.0, attn_dropout: float = 0.0,
                 norm: str = "layernorm", bias: bool = True, layer_index: int = 0, backend: str | None = None):
        super().__init__()
        self.norm_first = norm_first
        self.self_attention = SelfAttention(d_model, num_heads, bias=bias, attn_dropout=attn_dropout, causal=causal,
                                            layer_index=layer_index, backend=backend)
        self.self_attention_norm = make_norm(norm, d_model, bias=bias, backend=backend)
        self.cross_attention = None
        self.cross_attention_norm = None
        if cross_attention:
            self.cross_attention = CrossAttention(d_model, num_heads, bias=bias, attn_dropout=attn_dropout,
                                                  backend=backend)
            self.cross_attention_norm = make_norm(norm, d_model, bias=bias, backend=backend)
        self.mlp = MLP(d_model, d_ff if d_ff is not None else 4 * d_model, bias=bias)
        self.mlp_norm = make_norm(norm, d_model, bias=bias, backend=backend)
        self.residual_dropout = nn.Dropout(dropout)

    def residual_projections(self) -> list[nn.Linear]:
        """The layers that write into the residual stream (GPT-2 scales their init)."""
        layers = [self.self_attention.proj, self.mlp.proj]
        if self.cross_attention is not None:
            layers.append(self.cross_attention.proj)
        return layers

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cross-attention keys and values of the encoder output ``memory``
        ``(B, Sk, d_model)`` (:meth:`CrossAttention.project_memory`), passed back as ``memory_kv``."""
        if self.cross_attention is None:
            raise ValueError("Seq2SeqBlock: project_memory needs a block with cross-attention")
        return self.cross_attention.project_memory(memory)

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        if self.norm_first:
            return x + self.residual_dropout(fn(norm(x)))
        return norm(x + self.residual_dropout(fn(x)))

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None, positional=None,
                position_offset: int = 0, kv_cache=None, memory_kv=None,
                memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x ``(B, T, d_model)``. ``key_padding_mask``, ``positional``, ``position_offset`` and
        ``kv_cache`` go to the self-attention (:class:`SelfAttention`); ``memory_kv`` (this
        layer's :meth:`project_memory` of the encoder output) and
        ``memory_padding_mask`` ``(B, Sk)`` to the cross-attention."""
        x = self._sublayer(x, self.self_attention_norm, lambda h: self.self_attention(
            h, key_padding_mask=key_padding_mask, positional=positional, position_offset=position_offset,
            kv_cache=kv_cache))
        if self.cross_attention is not None:
            if memory_kv is None:
                raise ValueError("Seq2SeqBlock: a block with cross-attention needs argument 'memory_kv'")
            x = self._sublayer(x, self.cross_attention_norm, lambda h: self.cross_attention(
                h, memory_kv, memory_padding_mask=memory_padding_mask))
        return self._sublayer(x, self.mlp_norm, self.mlp)
