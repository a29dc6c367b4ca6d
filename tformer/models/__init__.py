"""Models built on ``tformer.nn``: a causal byte/character LM, an encoder classifier and its
masked-LM twin for self-pretraining, and an encoder-decoder (speech recognition)."""

from .config import EncoderClassifierConfig, ModelConfig
from .decoder_lm import DecoderLM
from .encoder_classifier import EncoderClassifier
from .encoder_decoder import EncoderDecoderConfig, EncoderDecoderTransformer
from .encoder_mlm import EncoderMaskedLM
from .kv_cache import KVCache

__all__ = ["ModelConfig", "EncoderClassifierConfig", "DecoderLM", "EncoderClassifier", "EncoderMaskedLM", "KVCache",
           "EncoderDecoderConfig", "EncoderDecoderTransformer"]
