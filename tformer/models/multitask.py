"""``MultiTaskModel``: one shared encoder trunk (the :class:`EncoderClassifier`'s, by
inheritance) and named task heads declared in the config: sentence classification, token
classification (tagging, e.g. NER) and a regression score."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tformer.schema import ConfigError, check_choices, from_dict

from .config import EncoderClassifierConfig, PoolingKind
from .encoder_classifier import EncoderClassifier
from .multitask_loss import MultiTaskLoss

HEAD_KINDS = ("classification", "token_classification", "regression")
REGRESSION_LOSSES = ("mse", "huber")
IGNORE_INDEX = -100  # token labels the loss and the metrics skip: padding, non-first sub-tokens


@dataclass(kw_only=True)
class HeadConfig:
    """One task head and its loss (an entry of ``model.heads``)."""

    kind: Literal[HEAD_KINDS]
    """classification, token_classification or regression (the multitask task fills it from the
    head's task name)."""
    num_labels: int = 2
    """Classes (classification) or tags (token_classification); unused for regression."""
    dropout: float = 0.1
    """Dropout before the head's linear layer."""
    weight: float = 1.0
    """Fixed loss weight w_t."""
    label_smoothing: float = 0.0
    """Cross-entropy heads; training only."""
    loss: Literal[REGRESSION_LOSSES] = "mse"
    """Regression loss: mse or huber."""
    huber_delta: float = 1.0
    """The Huber loss's threshold."""
    bounds: tuple[float, float] | None = None
    """Regression output range: (lo, hi) maps the linear output through
    ``lo + (hi - lo) * sigmoid(x)``; None leaves it unbounded."""

    def __post_init__(self):
        check_choices(self, "HeadConfig")
        if self.kind != "regression" and self.num_labels < 2:
            raise ConfigError(f"config: a {self.kind} head needs num_labels >= 2, got {self.num_labels}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"config: head dropout and label_smoothing must be in [0, 1), got {self.dropout} and "
                              f"{self.label_smoothing}")
        if self.weight < 0 or self.huber_delta <= 0:
            raise ConfigError(f"config: head weight must be >= 0 and huber_delta > 0, got {self.weight} and "
                              f"{self.huber_delta}")
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise ConfigError(f"config: head bounds must be (lo, hi) with lo < hi, got {self.bounds}")


@dataclass(kw_only=True)
class MultiTaskConfig(EncoderClassifierConfig):
    """The ``model`` section of the ``multitask`` task: the encoder's shape (see
    :class:`EncoderClassifierConfig`; ``num_classes`` is unused) plus the heads and the loss
    weighting."""

    pooling: PoolingKind = "mean"
    """As in :class:`EncoderClassifierConfig`, mean pooling by default."""
    heads: dict = field(default_factory=dict)
    """Task name -> :class:`HeadConfig` (or its fields as a dict)."""
    uncertainty_weighting: bool = False
    """Learn per-task weights (Kendall et al. 2018)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.heads:
            raise ConfigError("config: model.heads is empty; declare at least one task head, e.g. "
                              "{\"sentiment\": {\"kind\": \"classification\"}}")
        heads = {}
        for name, head in self.heads.items():
            try:
                heads[name] = head if isinstance(head, HeadConfig) else from_dict(HeadConfig, head,
                                                                                  f"model.heads.{name}.")
            except ConfigError as error:  # name the head: "head weight must be >= 0" alone says not which
                message = str(error).removeprefix("config: ")
                raise ConfigError(f"config: model.heads.{name}: {message}") from error
        self.heads = heads
        if all(head.weight == 0 for head in heads.values()):
            raise ConfigError(f"config: every head in model.heads ({', '.join(heads)}) has weight 0, so the loss is 0 "
                              f"and nothing trains; give at least one head a weight > 0")
        for name in self.heads:
            if not name.isidentifier():
                raise ConfigError(f"config: head name {name!r} must be an identifier (it names modules and metrics)")

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        for head in values["heads"].values():
            if head["bounds"] is not None:
                head["bounds"] = list(head["bounds"])
        return values


class TaskHead(nn.Module):
    """dropout -> linear: ``(..., d_model)`` -> ``(..., num_outputs)``; a bounded regression
    head squashes its output into ``bounds``."""

    def __init__(self, config: HeadConfig, d_model: int):
        super().__init__()
        self.kind = config.kind
        self.bounds = config.bounds
        self.dropout = nn.Dropout(config.dropout)
        self.linear = nn.Linear(d_model, 1 if config.kind == "regression" else config.num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.linear(self.dropout(hidden))
        if self.kind != "regression":
            return out
        out = out.squeeze(-1)
        if self.bounds is not None:
            low, high = self.bounds
            out = low + (high - low) * torch.sigmoid(out)
        return out


class MultiTaskHeads(nn.Module):
    """Everything task-specific, under one name (``head``, what ``training.init_from`` leaves
    fresh when it loads a pretrained trunk): the heads and the loss weighting."""

    def __init__(self, config: MultiTaskConfig):
        super().__init__()
        self.tasks = nn.ModuleDict({name: TaskHead(head, config.d_model) for name, head in config.heads.items()})
        self.weighting = MultiTaskLoss({name: head.kind for name, head in config.heads.items()},
                                       {name: head.weight for name, head in config.heads.items()},
                                       uncertainty=config.uncertainty_weighting)


class MultiTaskModel(EncoderClassifier):
    """A shared :class:`EncoderClassifier` trunk with one head per task.

    ``model(batch, task=name)`` runs the trunk and that task's head on ``batch``, a dict with
    ``tokens`` ``(B, S)`` int64 and optionally ``key_padding_mask`` ``(B, S)`` bool (True =
    padding). It returns ``{"output": ...}``: logits ``(B, num_labels)`` (classification),
    ``(B, S, num_labels)`` (token classification) or scores ``(B,)`` (regression). When the
    batch holds ``labels`` (``(B,)`` int64, ``(B, S)`` int64 with :data:`IGNORE_INDEX` where no
    tag counts, or ``(B,)`` float), it also returns ``loss`` (the task's mean loss, float32),
    ``weighted_loss`` (what :class:`MultiTaskLoss` makes of it), ``task_weight`` (the factor
    on ``loss`` now, detached) and ``count`` (the items the
    mean is over: examples, or labelled tokens). Padding positions never enter a token loss:
    their labels must be :data:`IGNORE_INDEX`, which :meth:`forward` checks when the labels are
    on the CPU (on an accelerator that check would sync the host; the loss skips padding anyway).
    The forward pass never waits for the device.
    """

    config_class = MultiTaskConfig

    def __init__(self, config: MultiTaskConfig):
        if not isinstance(config, MultiTaskConfig):
            raise TypeError(f"MultiTaskModel: argument 'config' must be a MultiTaskConfig, got {type(config).__name__}")
        super().__init__(config)
        self.head = MultiTaskHeads(config)  # replaces the classifier's single linear head

    @property
    def task_names(self) -> list[str]:
        return list(self.config.heads)

    def forward(self, batch: dict, task: str, label_smoothing: float | None = None) -> dict:
        """See the class docstring. ``label_smoothing`` None takes the head's config value
        (pass 0.0 for evaluation losses)."""
        if task not in self.config.heads:
            raise ValueError(f"MultiTaskModel: argument 'task' must be one of {self.task_names}, got {task!r}")
        head_config = self.config.heads[task]
        key_padding_mask = batch.get("key_padding_mask")
        hidden, mask = self.encode(batch["tokens"], key_padding_mask)
        if head_config.kind == "token_classification":
            if self.uses_cls:
                hidden = hidden[:, 1:]  # the CLS position is not a token
            output = self.head.tasks[task](hidden)
        else:
            output = self.head.tasks[task](self.pool(hidden, None if mask is None else ~mask))
        result = {"output": output}
        if "labels" in batch:
            smoothing = head_config.label_smoothing if label_smoothing is None else label_smoothing
            loss, count = task_loss(head_config, output, batch["labels"], key_padding_mask, smoothing)
            result.update(loss=loss, count=count, weighted_loss=self.head.weighting(task, loss),
                          task_weight=self.head.weighting.effective_weight(task))
        return result

    @torch.no_grad()
    def predict(self, batch: dict, task: str) -> dict:
        """Classification: ``probs`` ``(B, C)`` and ``labels`` ``(B,)``; token classification:
        ``probs`` ``(B, S, C)`` and ``tags`` ``(B, S)`` (:data:`IGNORE_INDEX` at padding);
        regression: ``scores`` ``(B,)``."""
        output = self.forward({k: v for k, v in batch.items() if k != "labels"}, task)["output"].float()
        kind = self.config.heads[task].kind
        if kind == "regression":
            return {"scores": output}
        probs = output.softmax(dim=-1)
        if kind == "classification":
            return {"probs": probs, "labels": probs.argmax(dim=-1)}
        tags = probs.argmax(dim=-1)
        if batch.get("key_padding_mask") is not None:
            tags = tags.masked_fill(batch["key_padding_mask"], IGNORE_INDEX)
        return {"probs": probs, "tags": tags}


def task_loss(head: HeadConfig, output: torch.Tensor, labels: torch.Tensor, key_padding_mask: torch.Tensor | None,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss of one head (float32) and the number of items it averages, as a tensor."""
    output = output.float()
    if head.kind == "regression":
        labels = labels.to(output.dtype)
        if head.loss == "huber":
            loss = F.huber_loss(output, labels, delta=head.huber_delta)
        else:
            loss = F.mse_loss(output, labels)
        # A fill on the device, not torch.tensor(...): copying a host scalar up would sync.
        return loss, torch.full((), labels.numel(), dtype=torch.long, device=output.device)
    if head.kind == "token_classification":
        if tuple(labels.shape) != tuple(output.shape[:2]):
            raise ValueError(f"MultiTaskModel: token labels must have shape (B, S) = {tuple(output.shape[:2])}, got "
                             f"{tuple(labels.shape)}")
        if key_padding_mask is not None:
            # Reading the labels on the host is free for CPU tensors only; on a device the check
            # would sync, so there padding labels are ignored without it.
            if labels.device.type == "cpu" and bool((labels[key_padding_mask] != IGNORE_INDEX).any()):
                raise ValueError(f"MultiTaskModel: token labels at padding positions must be {IGNORE_INDEX}")
            labels = labels.masked_fill(key_padding_mask, IGNORE_INDEX)
        labels = labels.reshape(-1)
        output = output.reshape(-1, output.shape[-1])
    count = (labels != IGNORE_INDEX).sum()
    losses = F.cross_entropy(output, labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                             reduction="sum")
    return losses / count.clamp(min=1), count
