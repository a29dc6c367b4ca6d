"""Masked-language-model self-pretraining on IMDb reviews with :class:`EncoderMaskedLM`.

The classifier's first stage (Krishna et al. 2022, "Downstream Datasets Make Surprisingly
Good Pretraining Corpora"; Amos et al. 2023, "Never Train from Scratch"): learn the text of
the task's own training reviews (and ``train/unsup`` when the archive has it) by predicting
masked tokens, then fine-tune a classifier from these weights (``training.init_from``).

Shared with the 'classify' task, so a fine-tune run sees the same ids and never trains on
what it validates on: the archive reading, the seeded validation carve-out
(``data.split_seed``/``val_size``/limits) and the cached BPE (the same texts give the same
cache file). The test split is dropped right after the archive is read (``load_imdb`` checks
its counts): it is never encoded, batched or evaluated here.

Masking (BERT, Devlin et al. 2019, sec. 3.1): each non-padding token is chosen with
``data.mask_probability`` (at least one per sequence); a chosen token becomes ``<mask>``
(80%), a random token (10%) or stays (10%), drawn anew for every batch (dynamic masking,
RoBERTa) from a generator seeded by the batch's place in the run, so a resumed run masks
exactly as the uninterrupted one. The loss is the cross-entropy at the chosen positions only,
normalised by their count.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from tformer.data import bpe
from tformer.data.buckets import LengthBucketBatches, pad_batch
from tformer.data.dealing import BatchStream, batches_per_rank
from tformer.data.imdb import ReviewSet, load_imdb
from tformer.models import EncoderClassifierConfig, EncoderMaskedLM
from tformer.schema import ConfigError
from tformer.tasks.base import Task, loss_metrics
from tformer.tasks.classify import ClassifyDataConfig, deal_review_batches, review_model_builder
from tformer.tasks.imdb_reviews import ImdbReviews
from tformer.tasks.losses import CrossEntropySum
from tformer.tasks.review_text import BpeReviewText


@dataclass(kw_only=True)
class MaskedLMDataConfig(ClassifyDataConfig):
    """The classify task's data settings (keep them equal in both stages' configs) plus the
    masking. ``show_misclassified`` is unused here; the test split is never read, so
    ``test_at_end`` must stay false and ``test_limit`` null."""

    test_at_end: bool = False
    """Must stay false: pretraining never reads the test split."""
    include_unsup: bool = True
    """pretrain on train/unsup too, when the archive holds it."""
    mask_probability: float = 0.15
    """Fraction of the tokens chosen for prediction (BERT's 15%)."""
    mask_token_fraction: float = 0.8
    """of the chosen tokens: replaced by <mask>."""
    random_token_fraction: float = 0.1
    """replaced by a random token; the rest stay as they are."""

    def __post_init__(self):
        super().__post_init__()
        if self.test_at_end or self.test_limit is not None:
            raise ConfigError(f"config: the 'mlm' task never reads the test split; data.test_at_end must be false "
                              f"and data.test_limit null, got {self.test_at_end} and {self.test_limit}")
        if not 0.0 < self.mask_probability < 1.0:
            raise ConfigError(f"config: data.mask_probability must be in (0, 1), got {self.mask_probability}")
        fractions = (self.mask_token_fraction, self.random_token_fraction)
        if min(fractions) < 0.0 or sum(fractions) > 1.0:
            raise ConfigError(f"config: data.mask_token_fraction and data.random_token_fraction must be >= 0 with a "
                              f"sum <= 1, got {self.mask_token_fraction} and {self.random_token_fraction}")


@dataclass
class Chunks:
    """Token id sequences of at most ``data.max_tokens`` (long reviews cut into several)."""

    ids: list[list[int]]


def mask_tokens(tokens: torch.Tensor, key_padding_mask: torch.Tensor, *, mask_id: int, random_ids: tuple[int, int],
                probability: float, mask_fraction: float = 0.8, random_fraction: float = 0.1,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT masking of ``tokens`` ``(B, S)``; padding (``key_padding_mask`` True) is never chosen.

    Returns ``(inputs, positions, targets)``: the corrupted ``(B, S)`` inputs, the chosen
    positions as ``(N,)`` indices into the flattened ``(B * S)`` tokens (row-major) and the
    original tokens there ``(N,)``. Random replacements are drawn from ``range(*random_ids)``
    (the real tokens, no specials). The same generator state gives the same result.
    """
    real = ~key_padding_mask
    chosen = (torch.rand(tokens.shape, generator=generator) < probability) & real
    # At least one prediction per sequence: a short review may otherwise draw none.
    action = torch.rand(tokens.shape, generator=generator)
    fallback = torch.rand(tokens.shape, generator=generator).masked_fill(~real, -1.0).argmax(dim=1)
    empty = ~chosen.any(dim=1) & real.any(dim=1)
    chosen[empty, fallback[empty]] = True
    replacements = torch.randint(random_ids[0], random_ids[1], tokens.shape, generator=generator)
    inputs = tokens.clone()
    to_mask = chosen & (action < mask_fraction)
    to_random = chosen & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    inputs[to_mask] = mask_id
    inputs[to_random] = replacements[to_random]
    positions = chosen.flatten().nonzero().squeeze(1)
    return inputs, positions, tokens.flatten()[positions]


def split_into_chunks(ids: list[int], max_tokens: int) -> list[list[int]]:
    """``ids`` cut into ``ceil(len / max_tokens)`` pieces of near-equal length (no short tail
    piece): pretraining uses the whole review, not only its head and tail."""
    pieces = max(1, math.ceil(len(ids) / max_tokens))
    bounds = [round(index * len(ids) / pieces) for index in range(pieces + 1)]
    return [ids[start:end] for start, end in zip(bounds, bounds[1:]) if end > start]


def batch_seed(*parts) -> int:
    """A 63-bit seed from the parts (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class MaskedLanguageModelTask(Task):
    """Masked-token prediction on IMDb's training reviews; evaluated on the validation reviews.

    Composed of the classify task's reviews (:class:`ImdbReviews`, without the test split) and
    tokenizer (:class:`BpeReviewText`), the review model builder (the classifier's config, so a
    fine-tune loads these weights) for :class:`EncoderMaskedLM`, and cross-entropy at the chosen
    positions.
    """

    name = "mlm"
    model_config_class = EncoderClassifierConfig
    data_config_class = MaskedLMDataConfig

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        data = self.data_config
        self.reviews = ImdbReviews(data, include_unsup=data.include_unsup, keep_test=False, load=load_imdb)
        self.text = BpeReviewText(data)
        self.builder = review_model_builder(config.model, EncoderMaskedLM, self.text, data)
        self.loss = CrossEntropySum()

    # --- data -------------------------------------------------------------------------------------
    @property
    def _raw(self):
        return self.reviews.splits

    def _read(self) -> dict[str, ReviewSet]:
        """``{"train", "val"}`` exactly as the classify task carves them (same seed, size and
        limits: the tokenizer's training texts, hence its cache key, are the same), plus
        ``"unsup"`` when asked for and present. The test split is not kept."""
        return self.reviews.read()

    def _tokenizer(self):
        return self.text.load(lambda: self._read()["train"])

    def prepare_data(self) -> None:
        self._tokenizer()  # download, read and train the tokenizer once, on rank 0

    def load_data(self) -> None:
        data = self.data_config
        self.tokenizer = self._tokenizer()
        self.pad_id, self.mask_id = bpe.pad_id(self.tokenizer), bpe.mask_id(self.tokenizer)
        raw = self._read()
        train_reviews = raw["train"].texts + (raw["unsup"].texts if "unsup" in raw else [])
        self.splits = {"train": self.encode(train_reviews), "val": self.encode(raw["val"].texts)}
        self.train_batches = LengthBucketBatches([len(i) for i in self.splits["train"].ids],
                                                 self.config.training.micro_batch_size, shuffle=True,
                                                 seed=self.config.training.seed, pool_batches=data.pool_batches)
        self.train_stream = BatchStream(self.train_batches, rank=self.rank, world_size=self.world_size)

    def encode(self, texts: list[str]) -> Chunks:
        chunks = []
        for row in self.text.encode(texts):
            chunks.extend(split_into_chunks(row, self.data_config.max_tokens))
        return Chunks(chunks)

    def _split(self, name: str) -> Chunks:
        if name not in self.splits:
            raise ValueError(f"mlm: no split {name!r}; the 'mlm' task holds only {sorted(self.splits)}")
        return self.splits[name]

    def _batch(self, split: Chunks, indices: list[int], weight: float = 1.0, *, seed: int | None = None) -> dict:
        """A masked batch. ``seed`` None (evaluation): a seed fixed by the chunks in the batch,
        so every evaluation scores the same masks."""
        model_config = self.model_config()
        tokens, key_padding_mask = pad_batch([split.ids[i] for i in indices], self.pad_id,
                                             pad_to_multiple=self.data_config.pad_to_multiple,
                                             extra_positions=1 if model_config.pooling == "cls" else 0,
                                             max_width=model_config.max_seq_len)
        if seed is None:
            seed = batch_seed("eval", self.data_config.split_seed, indices)
        data = self.data_config
        inputs, positions, targets = mask_tokens(
            tokens, key_padding_mask, mask_id=self.mask_id,
            random_ids=(len(bpe.SPECIAL_TOKENS), self.tokenizer.get_vocab_size()),
            probability=data.mask_probability, mask_fraction=data.mask_token_fraction,
            random_fraction=data.random_token_fraction, generator=torch.Generator().manual_seed(seed))
        return {"tokens": inputs, "key_padding_mask": key_padding_mask, "positions": positions, "targets": targets,
                "weights": torch.full((len(targets),), weight), "indices": torch.tensor(indices, dtype=torch.long)}

    # --- model ------------------------------------------------------------------------------------
    def model_config(self) -> EncoderClassifierConfig:
        return self.builder.config()

    def model_config_dict(self) -> dict:
        return self.builder.config_dict()

    def build_model(self) -> torch.nn.Module:
        return self.builder.build()

    # --- training ---------------------------------------------------------------------------------
    def next_train_batch(self) -> dict:
        indices, place = self.train_stream.next_indices_and_place()
        # Seeded by the batch's place in the global order, not the rank: the masks do not depend
        # on how many ranks share the epoch.
        seed = batch_seed("train", self.config.training.seed, self.train_stream.epoch, place)
        return self._batch(self.splits["train"], indices, seed=seed)

    def num_items(self, batch: dict) -> int:
        return int(batch["weights"].sum().item())

    def steps_per_epoch(self) -> int:
        return max(1, -(-batches_per_rank(self.train_batches, self.world_size) // self.config.training.grad_accum_steps))

    def loss_sum(self, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        logits = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"],
                       prediction_positions=batch["positions"])
        loss = self.loss(logits, batch["targets"], weights=batch["weights"], label_smoothing=label_smoothing)
        return loss, self.num_items(batch)

    def state_dict(self) -> dict:
        return self.train_stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train_stream.load_state_dict(state)

    # --- evaluation -------------------------------------------------------------------------------
    def eval_splits(self, final: bool) -> list[str]:
        return ["val"]

    def eval_batches(self, split: str, final: bool):
        """The classify task's dealing of ``split`` (see :func:`deal_review_batches`), masked."""
        encoded = self._split(split)
        for indices in deal_review_batches(self, [len(ids) for ids in encoded.ids], final):
            yield self._batch(encoded, indices) if indices is not None else self._batch(encoded, [0], weight=0.0)

    @torch.no_grad()
    def evaluate(self, model, final: bool, all_reduce) -> dict[str, float]:
        """Masked-token loss (nats), bits, perplexity and top-1 accuracy on the validation reviews."""
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, predictions, correct
        for batch in self.eval_batches("val", final):
            batch = self.to_device(batch)
            logits = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"],
                           prediction_positions=batch["positions"]).float()
            loss = self.loss(logits, batch["targets"], weights=batch["weights"])
            correct = ((logits.argmax(dim=-1) == batch["targets"]).double() * batch["weights"].double()).sum()
            totals += torch.stack([loss.double(), batch["weights"].double().sum(), correct]).cpu()
        totals = all_reduce(totals.to(self.device)).cpu()
        return {**loss_metrics("val", totals[0].item(), totals[1].item()),
                "val/accuracy": totals[2].item() / max(totals[1].item(), 1.0)}

    def samples(self, model) -> list[str]:
        return []

    def export_metadata(self) -> dict:
        """The tokenizer (a fine-tune run checks it matches its own) and the masking settings."""
        data = self.data_config
        return {"tokenizer": json.loads(self.tokenizer.to_str()), "max_tokens": data.max_tokens,
                "mask_probability": data.mask_probability}


TASK = MaskedLanguageModelTask
