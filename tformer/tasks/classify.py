"""Review sentiment classification (IMDb, Maas et al. 2011) with :class:`EncoderClassifier`.

Data flow: read the archive (``tformer.data.imdb``) -> carve a seeded validation split from
train -> train (or load the cached) byte-level BPE on the rest of train -> encode and truncate
each review head+tail -> length-bucketed batches padded with a key padding mask. The test
split is read only for the final evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.data.buckets import LengthBucketBatches, deal_eval_batches, pad_batch
from tformer.data.dealing import BatchStream, batches_per_rank
from tformer.data.imdb import LABEL_NAMES, OFFICIAL_PER_CLASS, OFFICIAL_SHA256, ReviewSet
from tformer.models import EncoderClassifier, EncoderClassifierConfig
from tformer.schema import ConfigError, not_given
from tformer.tasks.base import Task
from tformer.tasks.imdb_reviews import ImdbReviews
from tformer.tasks.losses import CrossEntropySum
from tformer.tasks.metrics import classification_metrics, confusion_matrix, format_confusion
from tformer.tasks.model_builder import ModelBuilder, check_at_least
from tformer.tasks.review_text import BpeReviewText


@dataclass(kw_only=True)
class ClassifyDataConfig:
    """The ``data`` section of the ``classify`` and ``classify_hf`` tasks: the IMDb reviews and
    their tokenizer."""

    path: str | None = None
    """The .tar.gz, the extracted aclImdb/ (or its parent), or a URL to download; None: the official
    URL."""
    cache_dir: str = "~/.cache/tformer/imdb"
    """downloads and tokenizers (keyed by their settings)."""
    download_sha256: str | None = OFFICIAL_SHA256
    """checked on download; null: structural checks only."""
    expected_per_class: int | None = OFFICIAL_PER_CLASS
    """None: accept any non-empty subset layout."""
    bpe_vocab_size: int = 16384
    """Byte-level BPE vocabulary trained on the training reviews."""
    bpe_min_frequency: int = 2
    """A pair must occur this often to become a BPE merge."""
    max_tokens: int = 511
    """per review after truncation (+1 CLS position = 512)."""
    head_tokens: int = 128
    """of max_tokens, taken from the start; the rest from the end."""
    val_size: int = 2500
    """reviews carved from train with split_seed."""
    split_seed: int = 0
    """Seeds the validation split and the evaluation sample."""
    train_limit: int | None = None
    """balanced subsets, for quick runs."""
    val_limit: int | None = None
    """Balanced validation subset."""
    test_limit: int | None = None
    """Balanced test subset."""
    eval_batch_size: int | None = None
    """None: 2 x training.micro_batch_size."""
    pool_batches: int = 50
    """length buckets: sort within pools of this many batches."""
    pad_to_multiple: int = 8
    """Batch widths are padded to a multiple of this (tensor-core friendly)."""
    test_at_end: bool = True
    """the final evaluation also scores the test split."""
    show_misclassified: int = 3
    """the most confidently wrong validation reviews shown per evaluation."""

    def __post_init__(self):
        for name in ("bpe_vocab_size", "bpe_min_frequency", "max_tokens", "val_size", "pool_batches",
                     "pad_to_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config: data.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.head_tokens <= self.max_tokens:
            raise ConfigError(f"config: data.head_tokens must be in [0, data.max_tokens={self.max_tokens}], got "
                              f"{self.head_tokens}")
        for name in ("train_limit", "val_limit", "test_limit", "eval_batch_size", "expected_per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"config: data.{name} must be >= 1 or null, got {value}")
        if self.show_misclassified < 0:
            raise ConfigError(f"config: data.show_misclassified must be >= 0, got {self.show_misclassified}")


@dataclass
class EncodedSplit:
    """A split ready to batch: truncated token ids, labels, and the texts for showing errors."""

    ids: list[list[int]]
    labels: list[int]
    reviews: ReviewSet


class ClassificationTask(Task):
    """Binary sentiment of a review: cross-entropy on the classifier's logits.

    Composed of the IMDb reviews (:class:`ImdbReviews`), a text part that turns them into ids
    (``text``: :class:`BpeReviewText` by default) and a :class:`ModelBuilder` for
    ``model_class`` (:class:`EncoderClassifier` by default); ``classify_hf`` is the same task
    with other parts (:class:`~tformer.tasks.base.TaskVariant`).
    """

    name = "classify"
    model_config_class = EncoderClassifierConfig
    data_config_class = ClassifyDataConfig

    def __init__(self, config, *, text=BpeReviewText, model_class=EncoderClassifier, **kwargs):
        super().__init__(config, **kwargs)
        self.reviews = ImdbReviews(self.data_config)
        self.text = text(self.data_config, config)
        self.builder = review_model_builder(config.model, model_class, self.text, self.data_config)
        self.loss = CrossEntropySum()
        self.last_misclassified: list[str] = []

    # --- data -------------------------------------------------------------------------------------
    @property
    def _raw(self):
        return self.reviews.splits

    def archive_path(self) -> Path:
        return self.reviews.archive_path()

    def _tokenizer(self):
        return self.text.load(lambda: self.reviews.read()["train"])

    def prepare_data(self) -> None:
        self._tokenizer()  # download, read and train the tokenizer once, on rank 0

    def load_data(self) -> None:
        data = self.data_config
        self.tokenizer = self._tokenizer()
        self.pad_id = self.text.pad_id
        raw = self.reviews.read()
        self.splits: dict[str, EncodedSplit] = {split: self.encode(raw[split]) for split in ("train", "val")}
        # Every rank takes every world_size-th batch of the same epoch order.
        self.train_batches = LengthBucketBatches([len(i) for i in self.splits["train"].ids],
                                                 self.config.training.micro_batch_size, shuffle=True,
                                                 seed=self.config.training.seed, pool_batches=data.pool_batches)
        self.train_stream = BatchStream(self.train_batches, rank=self.rank, world_size=self.world_size)

    def encode(self, reviews: ReviewSet) -> EncodedSplit:
        return EncodedSplit(self.text.encode_reviews(reviews), list(reviews.labels), reviews)

    def _split(self, name: str) -> EncodedSplit:
        if name not in self.splits:  # the test split is encoded only when first needed, at the end
            self.splits[name] = self.encode(self.reviews.read()[name])
        return self.splits[name]

    def _batch(self, split: EncodedSplit, indices: list[int], weight: float = 1.0) -> dict:
        model_config = self.model_config()
        tokens, key_padding_mask = pad_batch([split.ids[i] for i in indices], self.pad_id,
                                             pad_to_multiple=self.data_config.pad_to_multiple,
                                             extra_positions=1 if model_config.pooling == "cls" else 0,
                                             max_width=model_config.max_seq_len)
        return {"tokens": tokens, "key_padding_mask": key_padding_mask,
                "labels": torch.tensor([split.labels[i] for i in indices], dtype=torch.long),
                "weights": torch.full((len(indices),), weight), "indices": torch.tensor(indices, dtype=torch.long)}

    # --- model ------------------------------------------------------------------------------------
    def model_config(self):
        return self.builder.config()

    def model_config_dict(self) -> dict:
        return self.builder.config_dict()

    def build_model(self) -> torch.nn.Module:
        return self.builder.build()

    # --- training ---------------------------------------------------------------------------------
    def next_train_batch(self) -> dict:
        return self._batch(self.splits["train"], self._next_train_indices()[0])

    def _next_train_indices(self) -> tuple[list[int], int]:
        """This rank's next batch of training indices and its place in the epoch's global order."""
        return self.train_stream.next_indices_and_place()

    def num_items(self, batch: dict) -> int:
        return int(batch["weights"].sum().item())

    def steps_per_epoch(self) -> int:
        return max(1, -(-batches_per_rank(self.train_batches, self.world_size) // self.config.training.grad_accum_steps))

    def loss_sum(self, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        logits = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"])
        loss = self.loss(logits, batch["labels"], weights=batch["weights"], label_smoothing=label_smoothing)
        return loss, self.num_items(batch)

    def state_dict(self) -> dict:
        return self.train_stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train_stream.load_state_dict(state)

    # --- evaluation -------------------------------------------------------------------------------
    def eval_splits(self, final: bool) -> list[str]:
        return ["val", "test"] if final and self.data_config.test_at_end else ["val"]

    def eval_batches(self, split: str, final: bool):
        """The whole split (final, unless run.final_eval_batches caps it) or a fixed seeded sample of
        ``run.eval_batches`` batches, sorted by length (least padding), dealt round-robin to ranks;
        a rank that runs short gets zero-weight filler so all ranks run as many forward passes."""
        encoded = self._split(split)
        for indices in deal_review_batches(self, [len(ids) for ids in encoded.ids], final):
            yield self._batch(encoded, indices) if indices is not None else self._batch(encoded, [0], weight=0.0)

    @torch.no_grad()
    def evaluate(self, model, final: bool, all_reduce) -> dict[str, float]:
        """Loss, accuracy, F1 (positive class) and macro F1, and the confusion matrix entries
        (``<split>/confusion/<true>_as_<predicted>``) per split; misclassified reviews are kept
        for :meth:`samples`."""
        metrics, shown = {}, []
        for split in self.eval_splits(final):
            encoded = self._split(split)
            totals = torch.zeros(2, dtype=torch.float64)
            confusion = torch.zeros(len(LABEL_NAMES), len(LABEL_NAMES), dtype=torch.float64)
            wrong = []  # (probability of the wrong label, index, predicted)
            for batch in self.eval_batches(split, final):
                batch = self.to_device(batch)
                logits = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"]).float()
                loss = self.loss(logits, batch["labels"], weights=batch["weights"])
                keep = batch["weights"] > 0
                predicted = logits.argmax(dim=-1)
                totals += torch.tensor([loss.item(), keep.sum().item()], dtype=torch.float64)
                confusion += confusion_matrix(predicted[keep], batch["labels"][keep], len(LABEL_NAMES)).double()
                probabilities = logits.softmax(dim=-1)
                for row in torch.nonzero(keep & (predicted != batch["labels"])).flatten().tolist():
                    wrong.append((probabilities[row, predicted[row]].item(), int(batch["indices"][row]),
                                  int(predicted[row])))
            totals, confusion = all_reduce(totals.to(self.device)).cpu(), all_reduce(confusion.to(self.device)).cpu()
            metrics.update(split_metrics(split, totals, confusion))
            if split == "val":
                shown = sorted(wrong, reverse=True)[:self.data_config.show_misclassified]
                self.last_misclassified = [describe_error(encoded.reviews, index, predicted, probability)
                                           for probability, index, predicted in shown]
                self.last_confusion = format_confusion(confusion.long(), LABEL_NAMES)
        return metrics

    def samples(self, model) -> list[str]:
        """The validation confusion matrix and the most confidently misclassified reviews of the
        latest evaluation (the trainer prints and logs these next to LM samples)."""
        if not self.last_misclassified and not hasattr(self, "last_confusion"):
            return []
        return [f"val confusion matrix:\n{self.last_confusion}", *self.last_misclassified]

    def export_metadata(self) -> dict:
        """Everything :mod:`tformer.generation.classify` needs to turn raw text into the model's input."""
        data = self.data_config
        return {"labels": list(LABEL_NAMES), **self.text.metadata(), "max_tokens": data.max_tokens,
                "head_tokens": data.head_tokens}


def review_model_builder(section, model_class, text, data: ClassifyDataConfig) -> ModelBuilder:
    """The model builder of the review tasks (classify, classify_hf, mlm): the text part's values
    (the rounded vocabulary), ``data.max_tokens`` positions and two classes, unless the config's
    ``model`` section (``section``) sets them."""

    def values() -> dict:
        return not_given(section, {**text.model_values(), "max_seq_len": data.max_tokens,
                                   "num_classes": len(LABEL_NAMES)})

    def check(config) -> None:
        if "vocab_size" in text.model_values():
            check_at_least("vocab_size", config.vocab_size, text.vocab_size, "is smaller than the tokenizer's "
                           "vocabulary")
        if config.max_seq_len < data.max_tokens:
            raise ConfigError(f"config: model.max_seq_len={config.max_seq_len} < data.max_tokens={data.max_tokens}")

    return ModelBuilder(section, model_class, values, check)


def deal_review_batches(task: Task, lengths: list[int], final: bool) -> list[list[int] | None]:
    """This rank's evaluation batches of item indices for items of ``lengths``: the whole split
    (final, unless run.final_eval_batches caps it) or a fixed seeded sample of ``run.eval_batches``
    batches, sorted by length, dealt round-robin (``None``: filler for a rank that runs short)."""
    data, config = task.data_config, task.config
    batch_size = data.eval_batch_size or 2 * config.training.micro_batch_size
    max_batches = config.run.final_eval_batches if final else config.run.eval_batches
    return deal_eval_batches(lengths, batch_size, max_batches, world_size=task.world_size, rank=task.rank,
                             seed=data.split_seed)


def split_metrics(split: str, totals: torch.Tensor, confusion: torch.Tensor) -> dict[str, float]:
    count = max(totals[1].item(), 1.0)
    result = {f"{split}/loss": totals[0].item() / count}
    scores = classification_metrics(confusion.long())
    for key in ("accuracy", "f1", "macro_f1"):
        result[f"{split}/{key}"] = scores[key]
    for true, true_name in enumerate(LABEL_NAMES):
        for predicted, predicted_name in enumerate(LABEL_NAMES):
            result[f"{split}/confusion/{true_name}_as_{predicted_name}"] = confusion[true, predicted].item()
    return result


def describe_error(reviews: ReviewSet, index: int, predicted: int, probability: float, width: int = 300) -> str:
    text = reviews.texts[index].replace("\n", " ")
    text = text if len(text) <= width else text[:width - 3] + "..."
    return (f"misclassified {reviews.names[index]}: true {LABEL_NAMES[reviews.labels[index]]}, predicted "
            f"{LABEL_NAMES[predicted]} (p={probability:.3f}): {text}")


TASK = ClassificationTask
