"""Character / byte / word language modelling: Tiny Shakespeare (default), any text file, enwik8,
WikiText-2."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from tformer.schema import ConfigError, check_choices, not_given
from tformer.data.dealing import deal_batches, split_into_batches
from tformer.data.enwik8 import EXPECTED_SHA1 as ENWIK8_SHA1
from tformer.data.sampler import RandomWindowSampler, evaluation_windows
from tformer.models import DecoderLM, ModelConfig
from tformer.tasks.base import Task
from tformer.tasks.losses import CrossEntropySum
from tformer.tasks.model_builder import ModelBuilder, check_at_least

SOURCES = ("tinyshakespeare", "text", "enwik8", "wikitext2")


@dataclass(kw_only=True)
class LMDataConfig:
    """The ``data`` section of the ``lm`` task."""

    source: Literal[SOURCES] = "tinyshakespeare"
    """tinyshakespeare (shipped), text (the file data.path), enwik8 or wikitext2 (data.path: the
    folder)."""
    path: str | None = None
    """text: the file; enwik8: a URL, the zip or the unzipped file (None: download)."""
    data_dir: str = "~/.cache/tformer/enwik8"
    """enwik8: where the prepared splits live."""
    seq_len: int = 256
    """Tokens per training window (the model's max_seq_len unless model.max_seq_len is set)."""
    val_fraction: float = 0.1
    """text files: the last 10% is validation."""
    expected_size: int = 100_000_000
    """enwik8's size; smaller only for tests on a small archive."""
    expected_sha1: str | None = ENWIK8_SHA1
    """of the unzipped file; null: size only."""
    level: Literal["word", "char"] = "char"
    """wikitext2: "word" (perplexity per word) or "char" (bits per character)."""
    min_count: int = 1
    """wikitext2 words: rarer training words become <unk>."""

    def __post_init__(self):
        check_choices(self, "LMDataConfig")
        if self.source == "wikitext2" and not self.path:
            raise ConfigError("config: data.source='wikitext2' needs data.path, the folder holding wiki.train.raw, "
                              "wiki.valid.raw and wiki.test.raw (wikitext-2-raw-v1)")
        if self.source == "text" and not self.path:
            raise ConfigError("config: data.source='text' needs data.path, the text file")
        if self.seq_len < 1:
            raise ConfigError(f"config: data.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"config: data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.expected_size < 1:
            raise ConfigError(f"config: data.expected_size must be >= 1, got {self.expected_size}")


class LanguageModelTask(Task):
    """Next-token prediction on random windows of ``data.seq_len`` tokens."""

    name = "lm"
    model_config_class = ModelConfig
    data_config_class = LMDataConfig

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.builder = ModelBuilder(config.model, DecoderLM, self._model_values, self._check_model)
        self.loss = CrossEntropySum()

    def prepare_data(self) -> None:
        if self.data_config.source == "enwik8":
            from tformer.data.enwik8 import prepare_enwik8

            prepare_enwik8(self.data_config.data_dir, self.data_config.path, expected_size=self.data_config.expected_size,
                           expected_sha1=self.data_config.expected_sha1)

    def load_data(self) -> None:
        data = self.data_config
        if data.source == "enwik8":
            from tformer.data.enwik8 import load_enwik8
            from tformer.data.text import ByteVocab

            self.splits, self.vocab = load_enwik8(data.data_dir), ByteVocab()
        elif data.source == "wikitext2":
            from tformer.data.wikitext import load_wikitext

            self.splits, self.vocab = load_wikitext(data.path, data.level, min_count=data.min_count)
        else:
            from tformer.data.text import load_text_splits

            path = data.path if data.source == "text" else None
            self.splits, self.vocab = load_text_splits(path, data.val_fraction)
        self._check_windows()
        self.sampler = RandomWindowSampler(self.splits["train"], data.seq_len, self.config.training.micro_batch_size,
                                           seed=self.config.training.seed, rank=self.rank, world_size=self.world_size)

    def steps_per_epoch(self) -> int:
        # Windows are drawn at random, so an epoch is as many windows as tile the training tokens once.
        windows = len(self.splits["train"]) / self.data_config.seq_len
        return max(1, math.ceil(windows / self.sequences_per_step()))

    def check_ready(self) -> None:
        """Every split holds at least one window, and the sample prompt encodes (the default
        prompt is a newline, which a file without one cannot encode)."""
        self._check_windows()
        if self.config.sample.num_samples:
            try:
                self.vocab.encode(self.config.sample.prompt)
            except ValueError as error:
                raise ConfigError(f"config: sample.prompt={self.config.sample.prompt!r} cannot be encoded with the "
                                  f"vocabulary of {self._data_name()}: {error}; set sample.prompt to text from the "
                                  f"data") from None

    def _check_windows(self) -> None:
        seq_len = self.data_config.seq_len
        for split, tokens in self.splits.items():
            # Training draws starts in [0, len - seq_len - 1): one more token than a window.
            needed = seq_len + (2 if split == "train" else 1)
            if len(tokens) < needed:
                raise ConfigError(f"config: the {split} split of {self._data_name()} has {len(tokens)} tokens, fewer "
                                  f"than the {needed} one window of data.seq_len={seq_len} needs; lower data.seq_len"
                                  + (" or raise data.val_fraction" if split == "val" else "") + " or use more text")

    def _data_name(self) -> str:
        data = self.data_config
        return data.path if data.source == "text" else data.source

    def _model_values(self) -> dict:
        return not_given(self.config.model, {"vocab_size": self.vocab.size, "max_seq_len": self.data_config.seq_len})

    def _check_model(self, config) -> None:
        check_at_least("vocab_size", config.vocab_size, self.vocab.size, "is smaller than the data's vocabulary")
        if config.max_seq_len < self.data_config.seq_len:
            raise ConfigError(f"config: model.max_seq_len={config.max_seq_len} < data.seq_len={self.data_config.seq_len}")

    def model_config_dict(self) -> dict:
        return self.builder.config_dict()

    def build_model(self) -> torch.nn.Module:
        return self.builder.build()

    def next_train_batch(self) -> dict:
        inputs, targets = self.sampler.next_batch()
        return {"inputs": inputs, "targets": targets}

    def num_items(self, batch: dict) -> int:
        if "weights" in batch:
            return int(batch["weights"].sum().item())
        return batch["targets"].numel()

    def loss_sum(self, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        logits = model(batch["inputs"])
        weights = batch.get("weights")
        loss = self.loss(logits, batch["targets"], weights=weights, label_smoothing=label_smoothing)
        return loss, self.num_items(batch)

    def evaluate(self, model, final: bool, all_reduce) -> dict[str, float]:
        metrics = super().evaluate(model, final, all_reduce)
        if getattr(self.vocab, "kind", None) == "word":
            # Per-word loss: perplexity is the figure; "bits per character" would mislabel it.
            metrics = {k: v for k, v in metrics.items() if not k.endswith("/bpc")}
        return metrics

    def eval_splits(self, final: bool) -> list[str]:
        # enwik8 and WikiText report the test split at the end, as the literature does.
        return ["val", "test"] if final and "test" in self.splits else ["val"]

    def eval_batches(self, split: str, final: bool):
        """Windows covering the split once (final, when run.final_eval_batches is None) or an
        evenly spaced fixed subset, dealt round-robin to ranks; ranks with fewer windows get
        zero-weight padding so every rank runs the same number of forward passes."""
        run, seq_len = self.config.run, self.data_config.seq_len
        batch_size = self.config.training.micro_batch_size
        max_batches = run.final_eval_batches if final else run.eval_batches
        max_windows = None if max_batches is None else max_batches * batch_size * self.world_size
        tokens = self.splits[split]
        windows = evaluation_windows(len(tokens), seq_len, max_windows)
        dealt = deal_batches(split_into_batches(windows, batch_size), world_size=self.world_size, rank=self.rank)
        for chunk in dealt:
            filler = chunk is None  # a rank that ran out of windows: one window, weight 0
            chunk = chunk or [(0, seq_len)]
            rows, weights = [], torch.zeros(len(chunk), seq_len)
            for row, (start, first_counted) in enumerate(chunk):
                rows.append(torch.from_numpy(tokens[start:start + seq_len + 1].astype("int64")))
                if not filler:
                    weights[row, first_counted:] = 1.0
            windows_tensor = torch.stack(rows)
            yield {"inputs": windows_tensor[:, :-1], "targets": windows_tensor[:, 1:], "weights": weights}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def samples(self, model) -> list[str]:
        from tformer.generation.sampling import generate

        sample = self.config.sample
        prompt = self.vocab.encode(sample.prompt) or [0]
        prompt_ids = torch.tensor([prompt] * sample.num_samples, dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(sample.seed)
        greedy = sample.temperature == 0  # sample.temperature=0 means greedy, as in tformer sample
        out = generate(model, prompt_ids, sample.max_new_tokens, temperature=sample.temperature or 1.0,
                       top_k=sample.top_k, greedy=greedy, generator=generator, cache_dtype=self.compute_dtype)
        return [self.vocab.decode(row.tolist()) for row in out]

    def export_metadata(self) -> dict:
        return {"vocab": self.vocab.to_dict()}


TASK = LanguageModelTask
