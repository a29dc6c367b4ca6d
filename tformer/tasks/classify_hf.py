"""IMDb sentiment by fine-tuning a pretrained Hugging Face encoder (``task: classify_hf``).

The classify task's data path (archive, seeded validation carve-out, limits, head+tail
truncation, length buckets, metrics) with the pretrained model's own tokenizer instead of a
BPE trained on the reviews, and a :class:`~tformer.models.SentenceClassifier` (pretrained
trunk, pooling, fresh head) with ``attn_implementation="tformer"``. The ``data.bpe_*`` keys are
unused. Freezing, gradual unfreezing and layer-wise LRs come from the ``transfer`` section
(:mod:`tformer.training.transfer`).
"""

from __future__ import annotations

from tformer.data.buckets import truncate_head_tail
from tformer.data.imdb import LABEL_NAMES, ReviewSet
from tformer.models import SentenceClassifier, SentenceClassifierConfig
from tformer.models.sentence_trunks import resolve_pretrained
from tformer.optional import require
from tformer.schema import ConfigError
from tformer.tasks.classify import ClassificationTask, EncodedSplit


class HFClassificationTask(ClassificationTask):
    name = "classify_hf"
    model_config_class = SentenceClassifierConfig

    def _tokenizer(self):
        if getattr(self, "_hf_tokenizer", None) is None:
            AutoTokenizer = require("transformers", "task 'classify_hf'").AutoTokenizer
            self._hf_tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.model_name))
        return self._hf_tokenizer

    @property
    def model_name(self) -> str:
        return self.config.model.get("pretrained", SentenceClassifierConfig.pretrained)

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def encode(self, reviews: ReviewSet) -> EncodedSplit:
        """``[CLS] head ... tail [SEP]``: the special tokens the model was pretrained with,
        around ``data.max_tokens - 2`` review tokens (head+tail truncation)."""
        data, tokenizer = self.data_config, self.tokenizer
        body = data.max_tokens - 2
        rows = tokenizer(list(reviews.texts), add_special_tokens=False, verbose=False)["input_ids"]
        first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        start, end = [first] if first is not None else [], [last] if last is not None else []
        ids = [start + truncate_head_tail(row, body, min(data.head_tokens, body)) + end for row in rows]
        return EncodedSplit(ids, list(reviews.labels), reviews)

    def model_config_dict(self) -> dict:
        values = {"max_seq_len": self.data_config.max_tokens, "num_classes": len(LABEL_NAMES), **self.config.model}
        config = SentenceClassifierConfig.from_dict(values)
        if config.max_seq_len < self.data_config.max_tokens:
            raise ConfigError(f"config: model.max_seq_len={config.max_seq_len} < data.max_tokens="
                              f"{self.data_config.max_tokens}")
        return config.to_dict()

    def model_config(self) -> SentenceClassifierConfig:
        if not hasattr(self, "_model_config"):
            self._model_config = SentenceClassifierConfig.from_dict(self.model_config_dict())
        return self._model_config

    def build_model(self):
        return SentenceClassifier(self.model_config())

    def export_metadata(self) -> dict:
        data = self.data_config
        return {"labels": list(LABEL_NAMES), "pretrained": self.model_name, "max_tokens": data.max_tokens,
                "head_tokens": data.head_tokens}


TASK = HFClassificationTask
