"""Training strategies as objects: :class:`Single` (one process), :class:`DeepSpeed` (ZeRO 0-3)
and :class:`FSDP2` (``fully_shard`` under torchrun). Each owns what differs between them:
joining the process group, wrapping the model (activation checkpointing, per-block compile,
sharding or ``deepspeed.initialize``), backward with gradient accumulation, clipping, the
optimizer step, the grad norms and its part of a checkpoint. The trainer holds one and never
asks which (torchtitan's parallelize/strategy split)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Protocol

import torch

from tformer.training.config import TrainConfig
from tformer.training.strategies.common import StepResult, accumulated_backward, layer_groups
from tformer.training.strategies.deepspeed import DeepSpeed
from tformer.training.strategies.fsdp2 import FSDP2
from tformer.training.strategies.single import Single
from tformer.training.strategies.choice import strategy_name


class Strategy(Protocol):
    """What the trainer asks of a strategy. After :meth:`wrap`, ``model`` is the model as wrapped
    (what evaluation calls), ``optimizer`` the optimizer whose groups get the learning rate."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], contextlib.AbstractContextManager]

    def init_distributed(self) -> None:
        """Join the process group (before ranks and devices are known)."""

    def validate(self, device: torch.device, precision: str) -> None:
        """Raise ConfigError for a device and precision this strategy cannot train with."""

    def wrap(self, model: torch.nn.Module, *, device: torch.device, precision: str, world_size: int,
             parameter_groups: Callable[[torch.nn.Module], list[dict] | None]) -> None:
        """Move, checkpoint-wrap, compile and shard ``model`` in place; build the optimizer over
        ``parameter_groups(model)`` (None: the default weight-decay groups)."""

    def train_step(self, task, batches: list[dict], *, global_count: int, world_size: int, label_smoothing: float,
                   want_layer_norms: bool) -> StepResult:
        """Backward over the micro-batches, clip, step the optimizer, zero the gradients."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's float32 weights on the CPU, under the plain model's names; every
        rank must call it."""

    def save(self, folder: Path) -> None:
        """Write model and optimizer state into the checkpoint folder (every rank)."""

    def load(self, folder: Path) -> None:
        """Read what :meth:`save` wrote."""

    def scaler_state(self) -> dict | None:
        """A loss scaler's state the trainer keeps with its own (None: none, or the engine's)."""

    def load_scaler_state(self, state: dict | None) -> None:
        ...


STRATEGIES: dict[str, type] = {"single": Single, "deepspeed": DeepSpeed, "fsdp2": FSDP2}


def resolve_strategy(config: TrainConfig) -> Strategy:
    """The strategy object for ``training.strategy`` (``auto``: see :func:`strategy_name`)."""
    return STRATEGIES[strategy_name(config)](config)


__all__ = ["DeepSpeed", "FSDP2", "STRATEGIES", "Single", "StepResult", "Strategy", "accumulated_backward",
           "layer_groups", "resolve_strategy"]
