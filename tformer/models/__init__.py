"""Models built on ``tformer.nn``: a causal byte/character LM, an encoder classifier, its
masked-LM twin for self-pretraining, and a multi-task encoder with named heads."""

from .config import EncoderClassifierConfig, ModelConfig
from .decoder_lm import DecoderLM
from .encoder_classifier import EncoderClassifier
from .encoder_mlm import EncoderMaskedLM
from .kv_cache import KVCache
from .multitask import HeadConfig, MultiTaskConfig, MultiTaskModel
from .multitask_loss import MultiTaskLoss

__all__ = ["ModelConfig", "EncoderClassifierConfig", "DecoderLM", "EncoderClassifier", "EncoderMaskedLM", "KVCache",
           "HeadConfig", "MultiTaskConfig", "MultiTaskModel", "MultiTaskLoss"]
