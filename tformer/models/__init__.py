"""Models built on ``tformer.nn``: a causal byte/character LM, an encoder classifier, its
masked-LM twin for self-pretraining, a sentence encoder over tformer or Hugging Face trunks,
a multi-task encoder with named heads, and an encoder-decoder (speech recognition)."""

from .config import EncoderClassifierConfig, ModelConfig
from .decoder_lm import DecoderLM
from .encoder_classifier import EncoderClassifier
from .encoder_decoder import EncoderDecoderConfig, EncoderDecoderTransformer
from .encoder_mlm import EncoderMaskedLM
from .kv_cache import KVCache
from .multitask import HeadConfig, MultiTaskConfig, MultiTaskModel
from .multitask_loss import MultiTaskLoss
from .sentence_classifier import SentenceClassifier, SentenceClassifierConfig
from .sentence_encoder import SentenceEncoder
from .sentence_trunks import HFTrunk, TformerTrunk

__all__ = ["ModelConfig", "EncoderClassifierConfig", "DecoderLM", "EncoderClassifier", "EncoderMaskedLM", "KVCache",
           "SentenceEncoder", "SentenceClassifier", "SentenceClassifierConfig", "TformerTrunk", "HFTrunk",
           "HeadConfig", "MultiTaskConfig", "MultiTaskModel", "MultiTaskLoss",
           "EncoderDecoderConfig", "EncoderDecoderTransformer"]
