"""Review text as token ids with a byte-level BPE trained on the training reviews (cached by its
settings and the texts, so the classify and mlm tasks share one tokenizer). The text part of
the classify and mlm tasks; ``classify_hf`` uses its pretrained model's tokenizer instead
(:class:`tformer.tasks.classify_hf.PretrainedReviewText`)."""

from __future__ import annotations

import json
from collections.abc import Callable

from tformer.data import bpe
from tformer.data.buckets import truncate_head_tail
from tformer.data.imdb import ReviewSet, texts_digest
from tformer.tasks.model_builder import round_vocab


class BpeReviewText:
    """``load`` trains (or loads the cached) tokenizer; ``encode`` truncates head+tail to
    ``data.max_tokens``."""

    def __init__(self, data, config=None):
        self.data = data
        self.tokenizer = None

    def load(self, train_reviews: Callable[[], ReviewSet]):
        if self.tokenizer is None:
            data, train = self.data, train_reviews()
            self.tokenizer = bpe.load_or_train_bpe(train.texts, data.bpe_vocab_size, data.cache_dir,
                                                   data_digest=texts_digest(train.texts),
                                                   min_frequency=data.bpe_min_frequency)[0]
        return self.tokenizer

    @property
    def pad_id(self) -> int:
        return bpe.pad_id(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return bpe.encode(self.tokenizer, texts)

    def encode_reviews(self, reviews: ReviewSet) -> list[list[int]]:
        """Head+tail truncated ids (an empty review becomes one padding token)."""
        data = self.data
        return [truncate_head_tail(row, data.max_tokens, data.head_tokens) or [self.pad_id]
                for row in self.encode(reviews.texts)]

    def model_values(self) -> dict:
        return {"vocab_size": round_vocab(self.vocab_size)}

    def metadata(self) -> dict:
        return {"tokenizer": json.loads(self.tokenizer.to_str())}
