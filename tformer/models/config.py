"""Model configurations as dataclasses, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from tformer.schema import check_choice, check_choices, unknown_key_error
from tformer.nn.normalization import NORMS
from tformer.nn.pooling import POOLINGS
from tformer.nn.positional import POSITIONAL_ENCODINGS
from tformer.nn.transformer_block import NORM_POSITIONS
from tformer.ops.registry import BACKENDS


# The choices of the string fields, as Literal types built from the modules' own lists, so the
# config loader (tformer.schema.from_dict) checks them and the API reference lists them.
Positional = Literal[POSITIONAL_ENCODINGS]
Norm = Literal[NORMS]
NormPosition = Literal[NORM_POSITIONS]
PoolingKind = Literal[POOLINGS]


@dataclass(kw_only=True)
class ModelConfig:
    """The shape of a decoder or encoder transformer: the ``model`` section of the ``lm`` task,
    and the base of the other tasks' model configs. A task fills ``vocab_size`` and
    ``max_seq_len`` from its data unless the section sets them."""

    vocab_size: int = 256
    """Rows of the token embedding (and of the output head)."""
    max_seq_len: int = 256
    """Positions the model can attend over."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads; ``d_model`` must be divisible by it."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None: ``n_heads`` (no grouping)."""
    d_ff: int | None = None
    """Hidden width of each MLP; None: ``4 * d_model``."""
    dropout: float = 0.0
    """Dropout on the embeddings and on each sublayer's output, in [0, 1)."""
    attn_dropout: float = 0.0
    """Dropout on the attention weights, in [0, 1)."""
    positional: Positional = "learned"
    """Position information: learned embeddings, sinusoidal, rotary (``rope``) or none."""
    norm: Norm = "layernorm"
    """The normalization layer."""
    norm_position: NormPosition = "pre"
    """pre: norm before each sublayer (GPT-2); post: after each residual add (Vaswani et al.)."""
    bias: bool = True
    """Biases in the linear layers and norms."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    backend: str | None = None
    """The op backend (``cuda``, ``triton``, ``torch``, ``reference`` or ``auto``); None takes the
    op default (``tformer.backend(...)``, ``TFORMER_BACKEND``, else ``auto``)."""

    def __post_init__(self):
        owner = type(self).__name__
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            _check_positive_int(owner, name, getattr(self, name), allow_zero=name == "n_layers")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check_positive_int(owner, "n_kv_heads", self.n_kv_heads)
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        _check_positive_int(owner, "d_ff", self.d_ff)
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"{owner}: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"{owner}: n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{owner}: argument '{name}' must be a float in [0, 1), got {value!r}")
        check_choices(self, owner)
        if self.backend is not None:
            check_choice(f"{owner}: argument 'backend'", self.backend, (*BACKENDS, "auto"))
        if self.positional == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"{owner}: positional='rope' needs an even head dim, got d_model / n_heads = "
                             f"{self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, values: dict):
        """Build from a plain dict (a parsed JSON/YAML file); unknown keys are rejected with the
        nearest valid name suggested."""
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in fields:
                raise unknown_key_error("", key, fields, prefix=f"{cls.__name__}: ")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class EncoderClassifierConfig(ModelConfig):
    """A bidirectional encoder with a classification head: the ``model`` section of the
    ``classify`` and ``mlm`` tasks (``num_classes`` comes from the data unless set)."""

    num_classes: int = 2
    """Classes of the head."""
    pooling: PoolingKind = "cls"
    """``cls`` reads a learned CLS token the model prepends (so positions go up to
    ``max_seq_len + 1``); ``mean`` averages and ``max`` takes the maximum over the non-padding
    tokens (:class:`~tformer.nn.Pooling`)."""

    def __post_init__(self):
        super().__post_init__()
        _check_positive_int(type(self).__name__, "num_classes", self.num_classes)


def _check_positive_int(owner: str, name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{owner}: argument '{name}' must be a {kind} int, got {value!r}")
