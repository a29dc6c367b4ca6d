"""Multi-task training: one shared encoder (:class:`~tformer.models.MultiTaskModel`), a head per
task, each micro-batch from one task chosen by a :class:`TaskSampler`.

The tasks are the keys of ``model.heads``: ``sentiment`` and ``rating`` (IMDb), ``ner``
(CoNLL / synthetic); see :mod:`tformer.tasks.multitask_data`. Every task keeps its own
resumable batch stream; the sampler's generator and the streams' positions are the task's
``state_dict``, so ``--resume`` draws the same next task and batch as an uninterrupted run.

Loss bookkeeping with the trainer: a micro-batch of ``B`` examples returns
``(B * weighted mean loss, B)``, so every task counts examples (a token-level loss does not
outweigh sentence-level ones in an accumulated batch by its token count). Each task's
unweighted loss and its current weight are logged as ``train/<task>/loss`` and
``train/<task>/weight`` (:meth:`train_metrics`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

import torch

from tformer.data import bpe
from tformer.data.buckets import LengthBucketBatches, pad_batch
from tformer.data.conll import IGNORE_INDEX, tag_names
from tformer.data.dealing import BatchStream
from tformer.models import MultiTaskConfig, MultiTaskModel
from tformer.schema import ConfigError, check_choices, from_dict, given_keys, not_given
from tformer.tasks.base import Task
from tformer.tasks.classify import ClassifyDataConfig, deal_review_batches
from tformer.tasks.imdb_reviews import ImdbReviews
from tformer.tasks.model_builder import ModelBuilder, round_vocab
from tformer.tasks.metrics import classification_metrics, confusion_matrix
from tformer.tasks.multitask_data import (IMDB_TASKS, TASK_KINDS, EncodedSplit, encode_reviews, encode_sentences,
                                          load_ner_split, review_ratings, tokenizer_texts, train_tokenizer, word_tags)
from tformer.tasks.multitask_metrics import entity_metrics, regression_metrics
from tformer.tasks.task_sampler import SCHEDULES, TaskSampler


@dataclass(kw_only=True)
class MultiTaskDataConfig(ClassifyDataConfig):
    """IMDb's settings (the classify task's; used when ``sentiment`` or ``rating`` is a task),
    the NER corpus and the task schedule. ``show_misclassified`` is unused."""

    schedule: Literal[SCHEDULES] = "round_robin"
    """How the next training batch's task is chosen: round_robin, proportional (to the task's
    training size) or temperature."""
    temperature: float = 2.0
    """schedule "temperature": p_t ~ n_t^(1/T)."""
    ner_path: str | None = None
    """a folder with train.txt, valid.txt, test.txt (CoNLL-2003 / IOB2 columns)."""
    ner_scheme: Literal["iob2", "iob1"] = "iob2"
    """iob2, or iob1 (the original CoNLL-2003 files), converted to IOB2."""
    ner_synthetic: bool = False
    """generate the SYNTHETIC template corpus instead (tformer.data.synthetic_ner)."""
    ner_synthetic_train: int = 2000
    """sentences."""
    ner_synthetic_eval: int = 300
    """sentences in each of val and test."""

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, "MultiTaskDataConfig")
        if not self.temperature > 0:
            raise ConfigError(f"config: data.temperature must be > 0, got {self.temperature}")
        if self.ner_synthetic and self.ner_path is not None:
            raise ConfigError("config: set data.ner_path or data.ner_synthetic, not both")
        if min(self.ner_synthetic_train, self.ner_synthetic_eval) < 1:
            raise ConfigError("config: data.ner_synthetic_train and data.ner_synthetic_eval must be >= 1")


class MultiTask(Task):
    """Sentiment, star rating and NER with one shared trunk: composed of the classify task's
    IMDb reviews (:class:`ImdbReviews`), the NER corpus, a tokenizer trained on both, and a
    :class:`ModelBuilder` for :class:`MultiTaskModel` (whose heads hold the loss weighting)."""

    name = "multitask"
    model_config_class = MultiTaskConfig
    data_config_class = MultiTaskDataConfig

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.reviews = ImdbReviews(self.data_config)
        self.builder = ModelBuilder(config.model, MultiTaskModel, self._model_values)
        self.tasks = list(config.model.heads)
        if "ner" in self.tasks and not (self.data_config.ner_synthetic or self.data_config.ner_path):
            raise ConfigError("config: the 'ner' head needs data.ner_path (a CoNLL folder) or data.ner_synthetic=true")
        self._logged: dict[str, list[float]] = {}

    @classmethod
    def complete_heads(cls, model: dict) -> dict:
        """``model.heads`` with each head's kind filled from its task name (and checked)."""
        heads = model.get("heads") or {}
        if not isinstance(heads, dict) or not heads:
            raise ConfigError(f"config: model.heads must name at least one of {sorted(TASK_KINDS)}, got {heads!r}")
        completed = {}
        for name, head in heads.items():
            if name not in TASK_KINDS:
                raise ConfigError(f"config: model.heads.{name}: unknown task; the multitask task reads data for "
                                  f"{sorted(TASK_KINDS)}")
            head = dict(head or {})
            if head.setdefault("kind", TASK_KINDS[name]) != TASK_KINDS[name]:
                raise ConfigError(f"config: model.heads.{name}.kind must be {TASK_KINDS[name]!r} (its data's kind), "
                                  f"got {head['kind']!r}")
            completed[name] = head
        return completed

    @classmethod
    def parse_model_section(cls, model: dict) -> MultiTaskConfig:
        return from_dict(MultiTaskConfig, {**model, "heads": cls.complete_heads(model)}, "model.")

    # --- data -------------------------------------------------------------------------------------
    def _read(self):
        return self.reviews.read()

    def archive_path(self):
        return self.reviews.archive_path()

    def prepare_data(self) -> None:
        self._tokenizer()  # download, read and train the tokenizer once, on rank 0

    def _ner(self, split: str):
        if not hasattr(self, "_ner_raw"):
            self._ner_raw = {}
        if split not in self._ner_raw:
            self._ner_raw[split] = load_ner_split(self.data_config, split, self.config.training.seed)
        return self._ner_raw[split]

    def _tokenizer(self):
        imdb = self._read()["train"] if any(t in IMDB_TASKS for t in self.tasks) else None
        ner = self._ner("train") if "ner" in self.tasks else None
        return train_tokenizer(tokenizer_texts(imdb, ner), self.data_config)

    def load_data(self) -> None:
        self.tokenizer = self._tokenizer()
        self.pad_id = bpe.pad_id(self.tokenizer)
        if "ner" in self.tasks:
            self.tag_names = tag_names(self._ner("train"))
            self.tag_ids = {tag: index for index, tag in enumerate(self.tag_names)}
        self.encoded: dict[tuple[str, str], EncodedSplit] = {}
        seed = self.config.training.seed
        self.streams = {}
        for index, task in enumerate(self.tasks):
            train = self._encoded(task, "train")
            # Each task its own order (seed offset), so sentiment and rating see the reviews differently.
            batches = LengthBucketBatches([len(i) for i in train.ids], self.config.training.micro_batch_size,
                                          shuffle=True, seed=seed + 1000 * (index + 1),
                                          pool_batches=self.data_config.pool_batches)
            self.streams[task] = BatchStream(batches, rank=self.rank, world_size=self.world_size)
        self.sampler = TaskSampler(self.tasks, [len(self._encoded(t, "train").ids) for t in self.tasks],
                                   schedule=self.data_config.schedule, temperature=self.data_config.temperature,
                                   seed=seed)

    def _encoded(self, task: str, split: str) -> EncodedSplit:
        key = (task, split)
        if key not in self.encoded:
            data = self.data_config
            if task == "ner":
                self.encoded[key] = encode_sentences(self.tokenizer, self._ner(split), self.tag_ids, data.max_tokens)
            else:
                reviews = self._read()[split]
                ids = next((e.ids for (t, s), e in self.encoded.items() if s == split and t in IMDB_TASKS), None)
                if ids is None:  # sentiment and rating share one encoding of the reviews
                    ids = encode_reviews(self.tokenizer, reviews, data.max_tokens, data.head_tokens, self.pad_id)
                targets = list(reviews.labels) if task == "sentiment" else review_ratings(reviews)
                self.encoded[key] = EncodedSplit(ids, targets)
        return self.encoded[key]

    def _batch(self, task: str, split: EncodedSplit, indices: list[int], keep: bool = True) -> dict:
        config = self.model_config()
        tokens, key_padding_mask = pad_batch([split.ids[i] for i in indices], self.pad_id,
                                             pad_to_multiple=self.data_config.pad_to_multiple,
                                             extra_positions=1 if config.pooling == "cls" else 0,
                                             max_width=config.max_seq_len)
        if TASK_KINDS[task] == "token_classification":
            labels = torch.full(tokens.shape, IGNORE_INDEX, dtype=torch.long)
            for row, i in enumerate(indices):
                labels[row, :len(split.targets[i])] = torch.tensor(split.targets[i], dtype=torch.long)
        else:
            dtype = torch.float32 if TASK_KINDS[task] == "regression" else torch.long
            labels = torch.tensor([split.targets[i] for i in indices], dtype=dtype)
        return {"task": task, "tokens": tokens, "key_padding_mask": key_padding_mask, "labels": labels,
                "indices": torch.tensor(indices, dtype=torch.long), "keep": torch.tensor(keep)}

    # --- model ------------------------------------------------------------------------------------
    def _model_values(self) -> dict:
        """The data's values; ``heads`` is always given, so each head's label count is filled here
        (and a head that sets its own must match the data)."""
        labels = {"sentiment": 2, "ner": len(getattr(self, "tag_names", ())) or 2}
        heads = dict(self.config.model.heads)
        for name, head in heads.items():
            if name in labels:
                if "num_labels" in given_keys(head) and head.num_labels != labels[name]:
                    raise ConfigError(f"config: model.heads.{name}.num_labels={head.num_labels}, but the data has "
                                      f"{labels[name]} labels")
                heads[name] = dataclasses.replace(head, num_labels=labels[name])
        values = {"vocab_size": round_vocab(self.tokenizer.get_vocab_size()), "max_seq_len": self.data_config.max_tokens}
        return {**not_given(self.config.model, values), "heads": heads}

    def model_config(self) -> MultiTaskConfig:
        return self.builder.config()

    def model_config_dict(self) -> dict:
        return self.builder.config_dict()

    def build_model(self) -> torch.nn.Module:
        return self.builder.build()
    # --- training ---------------------------------------------------------------------------------
    def next_train_batch(self) -> dict:
        task = self.sampler.next()
        return self._batch(task, self._encoded(task, "train"), self.streams[task].next_indices())

    def num_items(self, batch: dict) -> int:
        return int(batch["tokens"].shape[0])

    def loss_sum(self, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        """``B`` times the task's weighted mean loss, and ``B``. ``label_smoothing`` (the
        trainer's) applies to cross-entropy heads that set none of their own."""
        task = batch["task"]
        head = self.model_config().heads[task]
        smoothing = head.label_smoothing or (label_smoothing if head.kind != "regression" else 0.0)
        result = model(batch, task=task, label_smoothing=smoothing)
        count = self.num_items(batch)
        logged = self._logged.setdefault(task, [0.0, 0.0, 0.0, 0.0])
        logged[0] += result["loss"].item() * count
        logged[1] += count
        logged[2] += 1
        logged[3] = result["task_weight"].item()
        return result["weighted_loss"] * count, count

    def train_metrics(self) -> dict[str, float]:
        """Per task since the last call: mean unweighted loss, micro-batches drawn, current weight."""
        metrics = {}
        for task, (loss_sum, count, batches, weight) in self._logged.items():
            metrics.update({f"train/{task}/loss": loss_sum / max(count, 1.0), f"train/{task}/batches": batches,
                            f"train/{task}/weight": weight})
        self._logged = {}
        return metrics

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "streams": {t: s.state_dict() for t, s in self.streams.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        for task, stream in self.streams.items():
            stream.load_state_dict(state["streams"][task])

    # --- evaluation -------------------------------------------------------------------------------
    def eval_splits(self, final: bool) -> list[str]:
        return ["val", "test"] if final and self.data_config.test_at_end else ["val"]

    def eval_batches(self, split: str, final: bool, task: str | None = None):
        """One task's batches of ``split`` (a seeded sample of ``run.eval_batches`` batches
        unless final), dealt round-robin to ranks; a rank that runs short gets filler
        (``keep`` False) so every rank runs as many forward passes."""
        task = task or self.tasks[0]
        encoded = self._encoded(task, split)
        for indices in deal_review_batches(self, [len(ids) for ids in encoded.ids], final):
            yield (self._batch(task, encoded, indices) if indices is not None
                   else self._batch(task, encoded, [0], keep=False))

    @torch.no_grad()
    def evaluate(self, model, final: bool, all_reduce) -> dict[str, float]:
        """Per task and split: ``<split>/<task>/loss`` and accuracy + F1 (sentiment), MAE +
        RMSE + Spearman (rating), entity precision/recall/F1 + token accuracy (ner);
        ``<split>/loss`` is the mean of the tasks' losses."""
        metrics = {}
        for split in self.eval_splits(final):
            for task in self.tasks:
                metrics.update(self._evaluate_task(model, task, split, final, all_reduce))
            metrics[f"{split}/loss"] = sum(metrics[f"{split}/{t}/loss"] for t in self.tasks) / len(self.tasks)
        return metrics

    def _evaluate_task(self, model, task: str, split: str, final: bool, all_reduce) -> dict[str, float]:
        encoded = self._encoded(task, split)
        kind = TASK_KINDS[task]
        width = max(len(ids) for ids in encoded.ids)
        # Each index is scored by one rank; summing over ranks gathers the predictions everywhere.
        predictions = torch.zeros(len(encoded.ids), width if kind == "token_classification" else 1,
                                  dtype=torch.float64)
        seen = torch.zeros(len(encoded.ids), dtype=torch.float64)
        totals = torch.zeros(2, dtype=torch.float64)  # loss * count, count
        for batch in self.eval_batches(split, final, task):
            batch = self.to_device(batch)
            result = model(batch, task=task, label_smoothing=0.0)
            output = result["output"].float()
            if not bool(batch["keep"]):
                continue
            count = float(result["count"])
            totals += torch.tensor([result["loss"].item() * count, count], dtype=torch.float64)
            rows = batch["indices"].cpu()
            seen[rows] = 1.0
            if kind == "token_classification":
                tags = output.argmax(dim=-1).double().cpu()
                predictions[rows, :tags.shape[1]] = tags[:, :width]
            elif kind == "classification":
                predictions[rows, 0] = output.argmax(dim=-1).double().cpu()
            else:
                predictions[rows, 0] = output.double().cpu()
        totals = all_reduce(totals.to(self.device)).cpu()
        predictions, seen = all_reduce(predictions.to(self.device)).cpu(), all_reduce(seen.to(self.device)).cpu()
        rows = seen.nonzero().flatten().tolist()
        prefix = f"{split}/{task}/"
        result = {prefix + "loss": totals[0].item() / max(totals[1].item(), 1.0)}
        if kind == "classification":
            confusion = confusion_matrix(predictions[rows, 0].long(), torch.tensor([encoded.targets[i] for i in rows]),
                                         2)
            scores = classification_metrics(confusion)
            result.update({prefix + "accuracy": scores["accuracy"], prefix + "f1": scores["f1"]})
        elif kind == "regression":
            scores = regression_metrics(predictions[rows, 0], torch.tensor([encoded.targets[i] for i in rows]))
            result.update({prefix + name: value for name, value in scores.items()})
        else:
            pairs = [word_tags(encoded.targets[i], predictions[i].long().tolist(), self.tag_names) for i in rows]
            scores = entity_metrics([t for t, _ in pairs], [p for _, p in pairs])
            result.update({prefix + name: value for name, value in scores.items()})
        return result

    def samples(self, model) -> list[str]:
        return []

    def export_metadata(self) -> dict:
        """The tokenizer, truncation, task kinds and label names (``ner``'s tags)."""
        data = self.data_config
        labels = {"sentiment": ["neg", "pos"]}
        if "ner" in self.tasks:
            labels["ner"] = self.tag_names
        return {"tokenizer": json.loads(self.tokenizer.to_str()), "max_tokens": data.max_tokens,
                "head_tokens": data.head_tokens, "tasks": {t: TASK_KINDS[t] for t in self.tasks},
                "label_names": {t: names for t, names in labels.items() if t in self.tasks}}


TASK = MultiTask
