"""Speech recognition: an :class:`~tformer.models.EncoderDecoderTransformer` from 16 kHz
waveforms to characters, on the synthetic espeak-ng corpus (:mod:`tformer.data.speech_corpus`).

Teacher forcing with label smoothing on the decoder; optionally a CTC loss on the encoder
(Kim et al., 2017, "Joint CTC-attention") weighted by ``data.ctc_weight``. Evaluation reports
the loss and, by greedy (or beam) decoding, the character and word error rates (jiwer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tformer.data.dealing import BatchStream, ShuffledBatches, batches_per_rank, deal_batches, split_into_batches
from tformer.data.speech import BOS_ID, EOS_ID, PAD_ID, SAMPLE_RATE, AsrVocab, load_split
from tformer.models import EncoderDecoderConfig, EncoderDecoderTransformer
from tformer.schema import ConfigError, not_given
from tformer.tasks.base import Task, every_rank_done, loss_metrics
from tformer.tasks.losses import CrossEntropySum, CtcSum
from tformer.tasks.model_builder import ModelBuilder, check_at_least
from tformer.tasks.speech_metrics import error_counts


@dataclass(kw_only=True)
class AsrDataConfig:
    """The ``data`` section of the ``asr`` task: the synthetic speech corpus, the losses and the
    decoding that scores CER/WER."""

    corpus_dir: str = "~/.cache/tformer/speech_espeak"
    """built by prepare_data when missing."""
    train_per_voice: int = 200
    """corpus size (see tformer.data.speech_corpus.CorpusSpec)."""
    max_text_len: int = 40
    """decoder positions = max_text_len + 2 (BOS, EOS)."""
    ctc_weight: float = 0.0
    """0: no CTC head; else loss = CE + ctc_weight * CTC."""
    eval_utterances: int | None = 60
    """per split for CER/WER (decoding is the slow part); null: all."""
    eval_beams: int = 1
    """1: greedy decoding for CER/WER; >1: beam search."""
    length_penalty: float = 1.0
    """Beam search: hypotheses are ranked by log-probability / length ** length_penalty."""
    limit_train: int | None = None
    """use only the first N training utterances (tests)."""

    def __post_init__(self):
        if not 0.0 <= self.ctc_weight:
            raise ConfigError(f"config: data.ctc_weight must be >= 0, got {self.ctc_weight}")
        if self.eval_utterances is not None and self.eval_utterances < 1:
            raise ConfigError(f"config: data.eval_utterances must be >= 1 or null (all), got {self.eval_utterances}")
        for name in ("train_per_voice", "max_text_len", "eval_beams"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config: data.{name} must be >= 1, got {getattr(self, name)}")


class AsrTask(Task):
    """Composed of the speech corpus, a :class:`ModelBuilder` for the encoder-decoder and the
    losses: cross-entropy on the decoder, plus CTC on the encoder (Joint CTC-attention)."""

    name = "asr"
    model_config_class = EncoderDecoderConfig
    data_config_class = AsrDataConfig

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.builder = ModelBuilder(config.model, EncoderDecoderTransformer, self._model_values,
                                    self._check_model)
        self.cross_entropy, self.ctc = CrossEntropySum(), CtcSum(blank=PAD_ID)

    def prepare_data(self) -> None:
        from tformer.data.speech_corpus import CorpusSpec, build_corpus

        build_corpus(self.data_config.corpus_dir, CorpusSpec(train_per_voice=self.data_config.train_per_voice),
                     progress=self.rank == 0)

    def load_data(self) -> None:
        from pathlib import Path

        data = self.data_config
        corpus = Path(data.corpus_dir).expanduser()
        self.vocab = AsrVocab()
        self.splits = {}
        for split in ("train", "val", "test"):
            waves, texts = load_split(corpus, split, limit=data.limit_train if split == "train" else None)
            keep = [i for i, text in enumerate(texts) if len(text) <= data.max_text_len]
            self.splits[split] = ([waves[i] for i in keep], [texts[i] for i in keep])
        if not self.splits["train"][0]:
            raise ConfigError(f"config: no training utterance of at most data.max_text_len={data.max_text_len} "
                              f"characters in {corpus}")
        # A fresh random order each epoch, cut into micro-batches that the one stream deals to ranks.
        self.train_batches = ShuffledBatches(len(self.splits["train"][0]), self.config.training.micro_batch_size,
                                             seed=self.config.training.seed, seed_stride=7919)
        self.train_stream = BatchStream(self.train_batches, rank=self.rank, world_size=self.world_size)

    # --- batches ------------------------------------------------------------------------------
    def collate(self, waves: list[np.ndarray], texts: list[str]) -> dict:
        """Pad waveforms with zeros and targets with PAD: ``waveform (B, N)``, ``num_samples (B,)``,
        ``tokens_in (B, T)`` = BOS + text, ``targets (B, T)`` = text + EOS, ``weights (B, T)``."""
        longest_wave = max(len(w) for w in waves)
        longest_text = max(len(t) for t in texts) + 1
        waveform = torch.zeros(len(waves), longest_wave)
        tokens_in = torch.full((len(texts), longest_text), PAD_ID, dtype=torch.long)
        targets = torch.full((len(texts), longest_text), PAD_ID, dtype=torch.long)
        for row, (wave, text) in enumerate(zip(waves, texts)):
            waveform[row, :len(wave)] = torch.from_numpy(wave)
            ids = self.vocab.encode(text)
            tokens_in[row, :len(ids) + 1] = torch.tensor([BOS_ID, *ids])
            targets[row, :len(ids) + 1] = torch.tensor([*ids, EOS_ID])
        return {"waveform": waveform, "num_samples": torch.tensor([len(w) for w in waves]), "tokens_in": tokens_in,
                "targets": targets, "weights": (targets != PAD_ID).float()}

    def next_train_batch(self) -> dict:
        chosen = self.train_stream.next_indices()
        waves, texts = self.splits["train"]
        return self.collate([waves[i] for i in chosen], [texts[i] for i in chosen])

    def steps_per_epoch(self) -> int:
        """Each rank takes every world_size-th micro-batch of the epoch's order, so one pass takes
        this many optimizer steps."""
        per_rank = batches_per_rank(self.train_batches, self.world_size)
        return max(1, -(-per_rank // self.config.training.grad_accum_steps))

    def state_dict(self) -> dict:
        return {"stream": self.train_stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "stream" not in state:
            # A checkpoint from before the one stream counted utterances read on this rank, not
            # batches: continue at the first batch not yet read.
            size = self.config.training.micro_batch_size
            state = {"stream": {"epoch": state["epoch"], "position": -(-int(state["position"]) // size)}}
        self.train_stream.load_state_dict(state["stream"])

    # --- model and loss -----------------------------------------------------------------------
    def _model_values(self) -> dict:
        return not_given(self.config.model, {
            "vocab_size": self.vocab.size, "max_seq_len": self.data_config.max_text_len + 2, "encoder_input": "speech",
            "sample_rate": SAMPLE_RATE, "ctc": self.data_config.ctc_weight > 0})

    def _check_model(self, config) -> None:
        check_at_least("vocab_size", config.vocab_size, self.vocab.size, "is smaller than the character vocabulary")
        if self.data_config.ctc_weight > 0 and not config.ctc:
            raise ConfigError("config: data.ctc_weight > 0 needs model.ctc=true")

    def model_config_dict(self) -> dict:
        return self.builder.config_dict()

    def build_model(self) -> torch.nn.Module:
        return self.builder.build()

    def num_items(self, batch: dict) -> int:
        return int(batch["weights"].sum().item())

    def loss_sum(self, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        ctc_weight = self.data_config.ctc_weight
        outputs = model(batch["waveform"], batch["num_samples"], batch["tokens_in"], return_ctc=ctc_weight > 0)
        logits = outputs[0] if ctc_weight > 0 else outputs
        loss = self.cross_entropy(logits, batch["targets"], weights=batch["weights"], label_smoothing=label_smoothing)
        if ctc_weight > 0:
            _, ctc_logits, padding_mask = outputs
            # CTC targets: the characters without EOS; PAD (id 0) is the blank.
            target_lengths = batch["weights"].sum(dim=1).long() - 1
            targets = batch["targets"].masked_fill(batch["targets"] == EOS_ID, PAD_ID)
            loss = loss + ctc_weight * self.ctc(ctc_logits, padding_mask, targets, target_lengths)
        return loss, self.num_items(batch)

    # --- evaluation ---------------------------------------------------------------------------
    def eval_splits(self, final: bool) -> list[str]:
        return ["val", "test"] if final else ["val"]

    def _eval_rows(self, split: str) -> list[int]:
        total = len(self.splits[split][0])
        limit = self.data_config.eval_utterances
        return list(range(total if limit is None else min(limit, total)))

    def _batches(self, split: str):
        """This rank's ``(batch, references)`` of ``split``, dealt by :func:`deal_batches`; a
        rank that runs short gets filler (references None: results dropped)."""
        waves, texts = self.splits[split]
        batches = split_into_batches(self._eval_rows(split), self.config.training.micro_batch_size)
        for chunk in deal_batches(batches, world_size=self.world_size, rank=self.rank):
            rows = chunk if chunk is not None else [0]
            batch = self.collate([waves[i] for i in rows], [texts[i] for i in rows])
            yield batch, ([texts[i] for i in rows] if chunk is not None else None)

    def transcribe(self, model, batch: dict, all_done=None) -> list[str]:
        from tformer.generation.seq2seq import beam_search, decode

        data = self.data_config
        options = dict(bos_id=BOS_ID, eos_id=EOS_ID, max_len=data.max_text_len + 1, all_done=all_done)
        if data.eval_beams > 1:
            ids = beam_search(model, batch["waveform"], batch["num_samples"], num_beams=data.eval_beams,
                              length_penalty=data.length_penalty, **options)
        else:
            ids = decode(model, batch["waveform"], batch["num_samples"], **options)
        return [self.vocab.decode(row) for row in ids]

    @torch.no_grad()
    def evaluate(self, model, final: bool, all_reduce) -> dict[str, float]:
        metrics = {}
        all_done = every_rank_done(all_reduce)
        for split in self.eval_splits(final):
            totals = torch.zeros(6, dtype=torch.float64)
            for batch, references in self._batches(split):
                batch = self.to_device(batch)
                loss, count = self.loss_sum(model, batch)
                hypotheses = self.transcribe(model, batch, all_done)
                if references is None:  # filler: it ran only to keep the ranks in step
                    continue
                counts = error_counts(references, hypotheses)
                totals += torch.tensor([loss.item(), count, counts["char_errors"], counts["chars"],
                                        counts["word_errors"], counts["words"]], dtype=torch.float64)
            totals = all_reduce(totals)
            metrics.update(loss_metrics(split, totals[0].item(), totals[1].item()))
            metrics[f"{split}/cer"] = totals[2].item() / max(totals[3].item(), 1.0)
            metrics[f"{split}/wer"] = totals[4].item() / max(totals[5].item(), 1.0)
        return metrics

    def samples(self, model) -> list[str]:
        waves, texts = self.splits["val"]
        count = min(self.config.sample.num_samples, len(texts))
        if count == 0:
            return []
        batch = self.to_device(self.collate(waves[:count], texts[:count]))
        return [f"ref: {ref}\nhyp: {hyp}" for ref, hyp in zip(texts[:count], self.transcribe(model, batch))]

    def export_metadata(self) -> dict:
        return {"vocab": self.vocab.to_dict(), "sample_rate": SAMPLE_RATE, "bos_id": BOS_ID, "eos_id": EOS_ID,
                "max_text_len": self.data_config.max_text_len}


TASK = AsrTask
