"""Positional encodings, selectable by name: "none", "sinusoidal", "learned", "rope".

Every encoding has the same two hooks, so a model calls both and never branches on the kind:

- ``add_to_embeddings(x, offset)``: x ``(B, T, d_model)`` holds tokens at absolute positions
  ``offset .. offset + T - 1``; additive encodings (sinusoidal, learned) add theirs here.
- ``rotate_queries_keys(q, k, offset)``: q ``(B, Hq, T, D)``, k ``(B, Hkv, T, D)``; RoPE
  rotates them here. ``offset`` is the absolute position of the first token, which is what
  KV-cached decoding needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tformer.schema import check_choice

POSITIONAL_ENCODINGS: tuple[str, ...] = ("none", "sinusoidal", "learned", "rope")


class PositionalEncoding(nn.Module):
    """Base class and the "none" encoding: both hooks are the identity."""

    def __init__(self, max_seq_len: int):
        super().__init__()
        if not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"{type(self).__name__}: argument 'max_seq_len' must be a positive int, "
                             f"got {max_seq_len!r}")
        self.max_seq_len = max_seq_len

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.max_seq_len:
            raise ValueError(f"{type(self).__name__}: positions [{offset}, {offset + length}) do not fit "
                             f"max_seq_len={self.max_seq_len}")

    def add_to_embeddings(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        self._check_range(offset, x.shape[-2])
        return x

    def rotate_queries_keys(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        return q, k


class NoPositionalEncoding(PositionalEncoding):
    """No position information at all (a causal decoder can still infer order)."""


class SinusoidalPositionalEncoding(PositionalEncoding):
    """Fixed sinusoids (Vaswani et al., 2017, section 3.5): ``PE[p, 2i] = scale * sin(p / 10000^(2i/d))``,
    ``PE[p, 2i+1] = scale * cos(...)``. A non-persistent buffer: nothing to learn or to save.

    ``scale`` matches the table to the embeddings it is added to. Vaswani et al. add the
    unit-amplitude table to embeddings of RMS about 1; tformer's models start embeddings at std
    0.02 (GPT-2's init) and pass ``scale=0.02``: at scale 1 the table swamps the tokens, and a
    2-layer character LM stayed at unigram loss (3.31 nats after 300 steps, against 2.37 at 0.02
    and 2.36 with learned positions)."""

    def __init__(self, max_seq_len: int, d_model: int, *, base: float = 10000.0, scale: float = 1.0, device=None,
                 dtype=None):
        super().__init__(max_seq_len)
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"SinusoidalPositionalEncoding: argument 'scale' must be a positive number, got {scale!r}")
        positions = torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None]
        frequencies = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
                                * (-math.log(base) / d_model))
        table = torch.zeros(max_seq_len, d_model, dtype=torch.float64, device=device)
        table[:, 0::2] = torch.sin(positions * frequencies)
        table[:, 1::2] = torch.cos(positions * frequencies[: d_model // 2])
        self.register_buffer("table", (scale * table).to(dtype or torch.get_default_dtype()), persistent=False)

    def add_to_embeddings(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        self._check_range(offset, x.shape[-2])
        return x + self.table[offset: offset + x.shape[-2]].to(x.dtype)


class LearnedPositionalEncoding(PositionalEncoding):
    """A learned table of ``max_seq_len`` position embeddings (GPT-2's ``wpe``)."""

    def __init__(self, max_seq_len: int, d_model: int, *, device=None, dtype=None):
        super().__init__(max_seq_len)
        self.embedding = nn.Embedding(max_seq_len, d_model, device=device, dtype=dtype)

    def add_to_embeddings(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        self._check_range(offset, x.shape[-2])
        positions = torch.arange(offset, offset + x.shape[-2], device=x.device)
        return x + self.embedding(positions).to(x.dtype)


class RotaryPositionalEncoding(PositionalEncoding):
    """RoPE (Su et al., 2021, "RoFormer"), rotate-half convention (as GPT-NeoX / Llama): the
    pair ``(x[i], x[i + D/2])`` at position p is rotated by the angle ``p * base^(-2i/D)``.
    q and k are rotated; the dot product then depends only on the relative position."""

    def __init__(self, max_seq_len: int, head_dim: int, *, base: float = 10000.0, device=None):
        super().__init__(max_seq_len)
        if head_dim % 2 != 0:
            raise ValueError(f"RotaryPositionalEncoding: argument 'head_dim' must be even, got {head_dim}")
        self.head_dim = head_dim
        inverse_frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
        angles = torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None] * inverse_frequencies
        angles = torch.cat([angles, angles], dim=-1)  # (max_seq_len, D): both halves share an angle
        # Tables in float64 so every compute dtype gets correctly rounded values; non-persistent.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)

    def _rotate(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryPositionalEncoding: expected head dim {self.head_dim}, got a tensor of "
                             f"shape {tuple(x.shape)}")
        length = x.shape[-2]
        cos = self.cos[offset: offset + length].to(x.dtype)
        sin = self.sin[offset: offset + length].to(x.dtype)
        return x * cos + self._rotate_half(x) * sin

    def rotate_queries_keys(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        self._check_range(offset, q.shape[-2])
        return self._rotate(q, offset), self._rotate(k, offset)


def positional_encoding(name: str, *, max_seq_len: int, d_model: int, head_dim: int | None = None,
                        base: float = 10000.0, sinusoidal_scale: float = 1.0, device=None,
                        dtype=None) -> PositionalEncoding:
    """The positional encoding called ``name`` (one of :data:`POSITIONAL_ENCODINGS`).
    ``head_dim`` is needed by "rope" only, ``sinusoidal_scale`` is the "sinusoidal" table's amplitude."""
    check_choice("positional_encoding: argument 'name'", name, POSITIONAL_ENCODINGS)
    if name == "none":
        return NoPositionalEncoding(max_seq_len)
    if name == "sinusoidal":
        return SinusoidalPositionalEncoding(max_seq_len, d_model, base=base, scale=sinusoidal_scale, device=device,
                                            dtype=dtype)
    if name == "learned":
        return LearnedPositionalEncoding(max_seq_len, d_model, device=device, dtype=dtype)
    if head_dim is None:
        raise ValueError("positional_encoding: name='rope' needs argument 'head_dim'")
    return RotaryPositionalEncoding(max_seq_len, head_dim, base=base, device=device)
