"""The interface between the trainer (:mod:`tformer.training`) and what is being learned.

The trainer owns the loop: devices, precision, DeepSpeed / FSDP2, accumulation, optimizer,
schedule, checkpoints, logging. A task owns the rest: the model, the data and the loss. To add
one, subclass :class:`Task` in ``tformer/tasks/<name>.py``, expose it as ``TASK = MyTask``,
and register the module in ``tformer/tasks/__init__.py``'s ``TASKS``.

Contract (``B`` = ``config.training.micro_batch_size``):

* ``model_config_class``, ``data_config_class``: dataclasses for the config's ``model`` and
  ``data`` sections; :class:`~tformer.training.config.TrainConfig` builds them once
  (``parse_model_section``), so a task reads ``config.model`` and ``config.data`` as attributes.
* ``prepare_data()`` runs on rank 0 (downloads), then ``load_data()`` on every rank.
* ``build_model()`` returns a plain ``nn.Module`` (fp32, on the CPU); the trainer moves it,
  wraps it and shards it. A model with a ``blocks`` ``nn.ModuleList`` gets per-block
  activation checkpointing and FSDP2 sharding.
* ``next_train_batch()`` returns this rank's next micro-batch, a dict of CPU tensors. Batches
  must not depend on anything but the task's own state (``state_dict`` must capture it all,
  so a resumed run sees the same batches).
* ``loss_sum(model, batch, label_smoothing)`` returns ``(loss_sum, count)``: the *sum* of
  per-item losses as a float32 scalar tensor, and the number of items (tokens, examples) as
  an int. The trainer divides by the count over the whole accumulated global batch, so the
  gradient of k micro-batches equals the gradient of one batch k times larger.
* ``num_items(batch)`` is that count without a forward pass (the trainer needs it first).
* ``evaluate(model, final, all_reduce)`` returns ``{"<split>/<metric>": float}``. It runs on
  every rank (sharded models need every rank in each forward); ``all_reduce(tensor)`` sums a
  tensor over ranks. The default evaluates ``loss_sum`` over ``eval_batches(split, final)``.
  Every rank must run the same number of forward passes: batches are dealt to ranks by
  :func:`tformer.data.dealing.deal_batches` (filler for a rank that runs short, its results
  dropped), and step-by-step decoding stops only when every rank is done
  (:func:`every_rank_done`).
* ``check_ready()`` runs after ``load_data()``, before the first step: it raises on anything the
  run will need later (sample settings against the vocabulary, a split shorter than one window),
  so no run is lost to an error found only at its end.
* ``train_metrics()`` returns extra ``{"train/...": float}`` gathered since its last call,
  logged at each log step (may be {}).
* ``samples(model)`` returns text samples to print and log at each evaluation (may be []).
* ``steps_per_epoch()`` (optional) is how many optimizer steps one pass over the training
  data takes at this global batch (``run.epochs`` needs it); the default refuses.
* ``export_metadata()`` returns what a reader of an exported model needs (e.g. the vocabulary);
  it is stored in ``config.json`` next to ``model.safetensors``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from tformer.schema import ConfigError, from_dict
from tformer.tasks.losses import cross_entropy_sum  # noqa: F401  (tasks import it from here)

if TYPE_CHECKING:  # tasks sit below training: the config type is for readers only
    from tformer.training.config import TrainConfig


class Task:
    name = "task"
    # The dtype the model computes in (autocast / mixed precision), set by the trainer.
    compute_dtype: torch.dtype | None = None
    model_config_class = None
    data_config_class = None

    def __init__(self, config: TrainConfig, *, rank: int = 0, world_size: int = 1, device=torch.device("cpu")):
        self.config = config
        self.data_config = config.data
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    @classmethod
    def parse_model_section(cls, model: dict):
        """The config's ``model`` section as a ``model_config_class`` (unknown keys, wrong types and
        bad values raise, naming ``model.<key>``)."""
        return from_dict(cls.model_config_class, model, "model.")

    # --- to implement -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download / unpack / cache data; called on rank 0 only, before :meth:`load_data`."""

    def load_data(self) -> None:
        """Open the prepared data; called on every rank after :meth:`prepare_data`."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def next_train_batch(self) -> dict:
        raise NotImplementedError

    def num_items(self, batch: dict) -> int:
        raise NotImplementedError

    def loss_sum(self, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def eval_splits(self, final: bool) -> list[str]:
        return ["val"]

    def eval_batches(self, split: str, final: bool):
        """This rank's evaluation batches for ``split``; every rank must yield as many."""
        raise NotImplementedError

    # --- optional hooks -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def check_ready(self) -> None:
        """Raise (``ConfigError``/``ValueError`` naming the setting) on what would fail later."""

    def samples(self, model) -> list[str]:
        return []

    def train_metrics(self) -> dict[str, float]:
        """Extra training metrics gathered since the last call (e.g. per-task losses); the
        trainer logs them with its own at every log step."""
        return {}

    def export_metadata(self) -> dict:
        return {}

    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the training data, for ``run.epochs``; called after
        :meth:`load_data`. Tasks whose training data has no size (a stream) keep this refusal."""
        raise ConfigError(f"config: run.epochs: task {self.name!r} cannot count the steps in an epoch of its data; "
                          f"set run.steps instead")

    def sequences_per_step(self) -> int:
        """The global batch: ``micro_batch_size * grad_accum_steps * world_size`` items."""
        training = self.config.training
        return training.micro_batch_size * training.grad_accum_steps * self.world_size

    def model_config_dict(self) -> dict:
        """The full model configuration as built (stored with checkpoints and exports)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, final: bool, all_reduce) -> dict[str, float]:
        metrics = {}
        for split in self.eval_splits(final):
            totals = torch.zeros(2, dtype=torch.float64)
            for batch in self.eval_batches(split, final):
                loss, count = self.loss_sum(model, self.to_device(batch))
                totals += torch.tensor([loss.item(), float(count)], dtype=torch.float64)
            totals = all_reduce(totals)
            metrics.update(loss_metrics(split, totals[0].item(), totals[1].item()))
        return metrics

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def every_rank_done(all_reduce):
    """``all_done(local_done) -> bool`` for step-by-step decoding under data parallelism: True
    once no rank has rows left. ``all_reduce`` sums a tensor over ranks (identity on one)."""
    def all_done(local_done: bool) -> bool:
        return all_reduce(torch.tensor(0.0 if local_done else 1.0, dtype=torch.float64)).item() == 0.0
    return all_done


def loss_metrics(split: str, loss_sum: float, count: float) -> dict[str, float]:
    """Mean loss (nats per item), bits per item and perplexity."""
    loss = loss_sum / max(count, 1.0)
    return {f"{split}/loss": loss, f"{split}/bpc": loss / math.log(2), f"{split}/ppl": math.exp(min(loss, 50.0))}


class TaskVariant:
    """A registered task made of another task class with different parts: composition, so no
    task subclasses another. Looks like a task class to the trainer and the config checks:
    ``name``, ``model_config_class``, ``data_config_class``, ``parse_model_section`` and a call
    that builds the task (``parts`` go to the task class's constructor)."""

    def __init__(self, task_class: type[Task], *, name: str, model_config_class, **parts):
        self.task_class, self.name, self.model_config_class, self.parts = task_class, name, model_config_class, parts
        self.data_config_class = task_class.data_config_class

    def parse_model_section(self, model: dict):
        return from_dict(self.model_config_class, model, "model.")

    def __call__(self, config: TrainConfig, **kwargs) -> Task:
        task = self.task_class(config, **self.parts, **kwargs)
        task.name, task.model_config_class = self.name, self.model_config_class
        return task
