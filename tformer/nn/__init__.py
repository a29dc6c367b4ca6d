"""Modules built on ``tformer.ops``: drop-ins for torch's (MultiheadAttention, LayerNorm,
Softmax), RMSNorm, positional encodings, pooling, and the one attention module and transformer
block every tformer model is built of."""

from . import functional
from .multihead_attention import MultiheadAttention
from .normalization import NORMS, LayerNorm, RMSNorm, make_norm
from .positional import (POSITIONAL_ENCODINGS, LearnedPositionalEncoding, NoPositionalEncoding,
                         PositionalEncoding, RotaryPositionalEncoding, SinusoidalPositionalEncoding,
                         positional_encoding)
from .attention import Attention
from .pooling import POOLINGS, Pooling
from .softmax import Softmax
from .transformer_block import MLP, TransformerBlock, add_and_norm

__all__ = ["MultiheadAttention", "LayerNorm", "RMSNorm", "make_norm", "NORMS", "Softmax", "Attention",
           "TransformerBlock", "MLP", "add_and_norm", "positional_encoding", "POSITIONAL_ENCODINGS",
           "PositionalEncoding", "NoPositionalEncoding", "SinusoidalPositionalEncoding", "LearnedPositionalEncoding",
           "RotaryPositionalEncoding", "Pooling", "POOLINGS"]
