"""``TransformerBlock``: the one transformer block, pre-LN or post-LN (``norm_position``), on the
fused residual-add norm: self-attention, optional cross-attention over an encoder's output, then
the MLP. The decoder LM, the encoders and both stacks of the encoder-decoder are built of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tformer.schema import check_choice
from .normalization import make_norm
from .attention import Attention

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
    if hidden.dtype != residual.dtype:
        hidden = hidden.to(residual.dtype)
    return norm(hidden, residual=residual)


class MLP(nn.Module):
    """``proj(gelu(fc(x)))``, ``d_model -> d_ff -> d_model``."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.proj = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


# The state-dict names an encoder-decoder layer had before it became a TransformerBlock; old
# checkpoints load through this mapping (_rename_old_keys, rename_old_keys).
_OLD_KEY_PREFIXES = {"self_attention.": "attention.", "self_attention_norm.": "attention_norm."}


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

    ``cross_attention=True`` adds a cross-attention sublayer between the self-attention and the
    MLP (a decoder layer of Vaswani et al., 2017): it reads ``memory_kv``, the encoder output
    projected by :meth:`project_memory`, under ``memory_padding_mask``.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, d_ff: int | None = None,
                 dropout: float = 0.0, attn_dropout: float = 0.0, norm: str = "layernorm", bias: bool = True,
                 causal: bool = True, layer_index: int = 0, norm_position: str = "pre", cross_attention: bool = False,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        check_choice("TransformerBlock: argument 'norm_position'", norm_position, NORM_POSITIONS)
        self.norm_position = norm_position
        factory = dict(device=device, dtype=dtype)
        self.attention_norm = make_norm(norm, d_model, bias=bias, backend=backend, **factory)
        self.attention = Attention(d_model, num_heads, num_kv_heads=num_kv_heads, bias=bias,
                                   attn_dropout=attn_dropout, causal=causal, layer_index=layer_index,
                                   backend=backend, **factory)
        self.cross_attention = None
        self.cross_attention_norm = None
        # Methods besides ``forward`` that read this block's weights. A wrapper that gathers sharded
        # weights around ``forward`` (FSDP2, see tformer.training.parallelize) gathers around these too.
        self.forward_methods: tuple[str, ...] = ()
        if cross_attention:
            self.cross_attention = Attention(d_model, num_heads, num_kv_heads=num_kv_heads, cross=True, bias=bias,
                                             attn_dropout=attn_dropout, layer_index=layer_index, backend=backend,
                                             **factory)
            self.cross_attention_norm = make_norm(norm, d_model, bias=bias, backend=backend, **factory)
            self.forward_methods = ("project_memory",)
        self.mlp_norm = make_norm(norm, d_model, bias=bias, backend=backend, **factory)
        self.mlp = MLP(d_model, d_ff if d_ff is not None else 4 * d_model, bias=bias, **factory)
        self.residual_dropout = nn.Dropout(dropout)
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    def residual_projections(self) -> list[nn.Linear]:
        """The layers that write into the residual stream (GPT-2 scales their init)."""
        layers = [self.attention.proj, self.mlp.proj]
        if self.cross_attention is not None:
            layers.append(self.cross_attention.proj)
        return layers

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cross-attention keys and values of the encoder output ``memory``
        ``(B, Sk, d_model)`` (:meth:`Attention.project_memory`), passed back as ``memory_kv``."""
        if self.cross_attention is None:
            raise ValueError("TransformerBlock: project_memory needs a block with cross_attention=True")
        return self.cross_attention.project_memory(memory)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, positional=None, position_offset: int = 0,
                kv_cache=None, memory_kv=None,
                memory_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden, residual ``(B, T, d_model)``. ``key_padding_mask``, ``positional``,
        ``position_offset`` and ``kv_cache`` go to the self-attention (:meth:`Attention.forward`);
        ``memory_kv`` (this layer's :meth:`project_memory` of the encoder output) and
        ``memory_padding_mask`` ``(B, Sk)`` to the cross-attention."""
        if self.cross_attention is not None and memory_kv is None:
            raise ValueError("TransformerBlock: a block with cross-attention needs argument 'memory_kv'")
        if self.cross_attention is None and (memory_kv is not None or memory_padding_mask is not None):
            raise ValueError("TransformerBlock: 'memory_kv' and 'memory_padding_mask' need a block with "
                             "cross_attention=True")
        def attend(x):
            return self.attention(x, key_padding_mask=key_padding_mask, positional=positional,
                                  position_offset=position_offset, kv_cache=kv_cache)

        sublayers = [(self.attention_norm, attend)]
        if self.cross_attention is not None:
            sublayers.append((self.cross_attention_norm, lambda x: self.cross_attention(
                x, memory_kv, memory_padding_mask=memory_padding_mask)))
        sublayers.append((self.mlp_norm, self.mlp))
        if self.norm_position == "post":
            return self._post_norm_forward(hidden, residual, sublayers)
        for norm, sublayer in sublayers:
            normed, residual = add_and_norm(norm, hidden, residual)  # norm(x), x = hidden + residual
            hidden = self._dropout(sublayer(normed))
        return hidden, residual

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # Skipped when it cannot act: the call would return x anyway, and a block runs it per sublayer.
        return self.residual_dropout(x) if self.training and self.residual_dropout.p > 0 else x

    def _post_norm_forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                           sublayers: list) -> tuple[torch.Tensor, None]:
        stream = hidden if residual is None else hidden.to(residual.dtype) + residual
        for norm, sublayer in sublayers:
            transformed = self._dropout(sublayer(stream))
            stream, _ = add_and_norm(norm, transformed, stream)  # norm(x + f(x))
        return stream, None


def _rename_old_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                     error_msgs) -> None:
    """Load-time hook: a pre-unification encoder-decoder layer's keys (``self_attention.*``,
    ``self_attention_norm.*``) become this block's (``attention.*``, ``attention_norm.*``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        renamed = _renamed(key, prefix)
        if renamed != key:
            state_dict[renamed] = state_dict.pop(key)


def _renamed(key: str, prefix: str) -> str:
    local = key[len(prefix):]
    for old, new in _OLD_KEY_PREFIXES.items():
        if local.startswith(old):
            return prefix + new + local[len(old):]
    return key


def rename_old_keys(model: nn.Module, state: dict) -> dict:
    """``state`` (a stored state dict of ``model``) with the keys its :class:`TransformerBlock` s
    had before the encoder-decoder layer became one renamed to today's, for readers that match
    stored names themselves instead of calling ``model.load_state_dict`` (which renames them by
    itself)."""
    prefixes = [f"{name}." if name else "" for name, module in model.named_modules()
                if isinstance(module, TransformerBlock)]
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        renamed[key if prefix is None else _renamed(key, prefix)] = value
    return renamed


def old_spellings(key: str) -> list[str]:
    """The names ``key`` (a state-dict key of today's model) may have had before the
    encoder-decoder layer became a :class:`TransformerBlock`, for readers that look stored tensors
    up by name (a torch.distributed.checkpoint load). Candidates only: a reader keeps the one the
    checkpoint holds."""
    candidates = []
    for old, new in _OLD_KEY_PREFIXES.items():
        start = 0
        while (at := key.find(new, start)) != -1:
            if at == 0 or key[at - 1] == ".":  # a whole module name, not the tail of cross_attention.
                candidates.append(key[:at] + old + key[at + len(new):])
            start = at + 1
    return candidates
