"""Models built on ``tformer.nn``: a causal byte/character LM and an encoder classifier."""

from .config import EncoderClassifierConfig, ModelConfig
from .decoder_lm import DecoderLM
from .encoder_classifier import EncoderClassifier
from .kv_cache import KVCache

__all__ = ["ModelConfig", "EncoderClassifierConfig", "DecoderLM", "EncoderClassifier", "KVCache"]
