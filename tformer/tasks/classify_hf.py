"""IMDb sentiment by fine-tuning a pretrained Hugging Face encoder (``task: classify_hf``).

The classify task (:class:`~tformer.tasks.classify.ClassificationTask`: archive, seeded
validation carve-out, limits, head+tail truncation, length buckets, metrics) built with two
other parts: the pretrained model's own tokenizer instead of a BPE trained on the reviews
(:class:`PretrainedReviewText`), and a :class:`~tformer.models.SentenceClassifier` (pretrained
trunk, pooling, fresh head) with ``attn_implementation="tformer"``. The ``data.bpe_*`` keys are
unused. Freezing, gradual unfreezing and layer-wise LRs come from the ``transfer`` section
(:mod:`tformer.training.transfer`).
"""

from __future__ import annotations

from collections.abc import Callable

from tformer.data.buckets import truncate_head_tail
from tformer.data.imdb import ReviewSet
from tformer.models import SentenceClassifier, SentenceClassifierConfig
from tformer.models.sentence_trunks import resolve_pretrained
from tformer.optional import require
from tformer.tasks.base import TaskVariant
from tformer.tasks.classify import ClassificationTask


class PretrainedReviewText:
    """Review text as ids of the pretrained model's tokenizer (``model.pretrained``)."""

    def __init__(self, data, config):
        self.data = data
        self.model_name = config.model.pretrained
        self.tokenizer = None

    def load(self, train_reviews: Callable[[], ReviewSet]):
        if self.tokenizer is None:  # the training reviews play no part: the tokenizer is pretrained
            AutoTokenizer = require("transformers", "task 'classify_hf'").AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.model_name))
        return self.tokenizer

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def encode_reviews(self, reviews: ReviewSet) -> list[list[int]]:
        """``[CLS] head ... tail [SEP]``: the special tokens the model was pretrained with,
        around ``data.max_tokens - 2`` review tokens (head+tail truncation)."""
        data, tokenizer = self.data, self.tokenizer
        body = data.max_tokens - 2
        rows = tokenizer(list(reviews.texts), add_special_tokens=False, verbose=False)["input_ids"]
        first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        start, end = [first] if first is not None else [], [last] if last is not None else []
        return [start + truncate_head_tail(row, body, min(data.head_tokens, body)) + end for row in rows]

    def model_values(self) -> dict:
        return {}  # the pretrained trunk fixes its own vocabulary

    def metadata(self) -> dict:
        return {"pretrained": self.model_name}


TASK = TaskVariant(ClassificationTask, name="classify_hf", model_config_class=SentenceClassifierConfig,
                   text=PretrainedReviewText, model_class=SentenceClassifier)
