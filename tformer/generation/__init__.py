"""Using trained models: sampling, greedy decoding and beam search with the KV cache
(:mod:`.sampling`, behind ``tformer sample``) and the classifier's prediction path
(:mod:`.classify`, behind ``tformer classify``)."""

from .sampling import beam_search, filter_logits, generate

__all__ = ["beam_search", "filter_logits", "generate"]
