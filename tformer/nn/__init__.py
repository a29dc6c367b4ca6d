"""Modules built on ``tformer.ops``: drop-ins for torch's (MultiheadAttention, LayerNorm,
Softmax), RMSNorm, positional encodings and the pre-LN transformer block."""

from . import functional
from .multihead_attention import MultiheadAttention
from .normalization import NORMS, LayerNorm, RMSNorm, make_norm
from .positional import (POSITIONAL_ENCODINGS, LearnedPositionalEncoding, NoPositionalEncoding,
                         PositionalEncoding, RotaryPositionalEncoding, SinusoidalPositionalEncoding,
                         positional_encoding)
from .cross_attention import CrossAttention
from .self_attention import SelfAttention
from .seq2seq_block import Seq2SeqBlock
from .softmax import Softmax
from .transformer_block import MLP, TransformerBlock, add_and_norm

__all__ = ["MultiheadAttention", "LayerNorm", "RMSNorm", "make_norm", "NORMS", "Softmax", "SelfAttention",
           "TransformerBlock", "MLP", "add_and_norm", "positional_encoding", "POSITIONAL_ENCODINGS",
           "PositionalEncoding", "NoPositionalEncoding", "SinusoidalPositionalEncoding", "LearnedPositionalEncoding",
           "RotaryPositionalEncoding", "CrossAttention", "Seq2SeqBlock"]
