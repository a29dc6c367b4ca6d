"""Transfer learning from a pretrained trunk: freezing, gradual unfreezing and discriminative
learning rates (Howard and Ruder, 2018, "Universal Language Model Fine-tuning", ULMFiT).

The model's parameters fall into *units*, from the bottom: ``0`` the embeddings (everything
before the first numbered layer), ``1..L`` the numbered layers (``blocks.3.*``,
``encoder.layer.3.*``, ``layers.3.*``; whatever follows the last layer, such as a final norm
or pooler, joins layer ``L``), and the task ``head`` (the top-level module named ``head``).

- Layer-wise LR decay: unit ``u`` learns at ``lr * layer_lr_decay ** (L - u)``; the top layer
  at ``lr``, the embeddings at ``lr * decay**L``. The head at ``head_lr`` (default ``lr``); both
  follow the warmup/cosine schedule.
- Freezing: ``freeze_trunk`` trains the head only. ``unfreeze_every = k`` starts the same way
  and unfreezes one more unit every ``k`` steps, the top layer first (at step ``k``), the
  embeddings last (at step ``(L + 1) * k``).

Frozen parameters stay bitwise unchanged: they keep ``requires_grad=False``, so no gradient is
computed and AdamW skips them, weight decay included (it only touches parameters with a
gradient). Every parameter is in the optimizer from the start, in one group per unit and
decay kind, so the optimizer's state dict has the same layout at every step and ``--resume``
is exact; which units train is a pure function of the step, reapplied before every step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tformer.schema import ConfigError
from tformer.training.parallelize import clean_name

HEAD = "head"
# The index of a numbered layer in a parameter name: tformer's `blocks.3.`, BERT's
# `encoder.layer.3.`, Llama's `layers.3.`, GPT-2's `h.3.`.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:blocks|layers?|h)\.(\d+)\.")


@dataclass
class TransferConfig:
    """The ``transfer`` section of a training config (all off by default)."""

    freeze_trunk: bool = False  # train only the head (for the whole run unless unfreeze_every is set)
    unfreeze_every: int | None = None  # gradual unfreezing: one more unit, top first, every k steps
    layer_lr_decay: float = 1.0  # in (0, 1]: unit u learns at lr * decay**(L - u); 1 = one LR everywhere
    head_lr: float | None = None  # the head's peak LR (None: optimizer.lr); follows the same schedule

    def __post_init__(self):
        if isinstance(self.layer_lr_decay, bool) or not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"config: transfer.layer_lr_decay must be in (0, 1] (lower layers learn more slowly; "
                              f"1 turns it off), got {self.layer_lr_decay!r}")
        if self.unfreeze_every is not None and self.unfreeze_every < 1:
            raise ConfigError(f"config: transfer.unfreeze_every must be >= 1 step or null, got {self.unfreeze_every}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ConfigError(f"config: transfer.head_lr must be > 0 or null, got {self.head_lr}")

    @property
    def active(self) -> bool:
        return (self.freeze_trunk or self.unfreeze_every is not None or self.layer_lr_decay != 1.0
                or self.head_lr is not None)

    @property
    def freezes(self) -> bool:
        return self.freeze_trunk or self.unfreeze_every is not None


def check_transfer(config) -> None:
    """Config-level checks that need the whole training config."""
    if config.transfer.freezes and config.training.strategy == "deepspeed":
        raise ConfigError("config: transfer.freeze_trunk / transfer.unfreeze_every are not supported with "
                          "training.strategy='deepspeed' (ZeRO partitions the parameters once, at the start); use "
                          "strategy 'single' or 'fsdp2'")


def parameter_units(model: torch.nn.Module) -> tuple[dict[str, int | str], int]:
    """``({parameter name: unit}, L)``: unit ``"head"``, or 0 (embeddings) .. L (top layer).

    Raises:
        ConfigError: the model has no numbered layers, or their indices are not ``0..L-1``.
    """
    names = [name for name, _ in model.named_parameters()]
    indices = {}
    for name in names:
        found = _LAYER_INDEX.search(name)
        if found and name.split(".")[0] != HEAD:
            indices[name] = int(found.group(1))
    layers = sorted(set(indices.values()))
    if not layers or layers != list(range(len(layers))):
        raise ConfigError(f"config: the transfer section needs the layer count of {type(model).__name__}, but its "
                          f"parameter names show no numbered layers 0..L-1 (looked for blocks.N., layer.N., "
                          f"layers.N., h.N.; found {layers}); names: {names[:6]}...")
    count, units, seen_layer = len(layers), {}, False
    for name in names:
        if name.split(".")[0] == HEAD:
            units[name] = HEAD
        elif name in indices:
            units[name], seen_layer = indices[name] + 1, True
        else:  # before the first layer: embeddings; after the last: final norm / pooler, with the top layer
            units[name] = count if seen_layer else 0
    if HEAD not in units.values():
        raise ConfigError(f"config: the transfer section needs a task head (a top-level module named {HEAD!r}) in "
                          f"{type(model).__name__}")
    return units, count


class Transfer:
    """Param groups and the unfreezing schedule for one model (see the module docstring)."""

    def __init__(self, config: TransferConfig, model: torch.nn.Module, base_lr: float):
        self.config = config
        self.units, self.num_layers = parameter_units(model)
        self.base_lr = base_lr

    def lr_scale(self, unit: int | str) -> float:
        if unit == HEAD:
            return (self.config.head_lr or self.base_lr) / self.base_lr
        return self.config.layer_lr_decay ** (self.num_layers - unit)

    def parameter_groups(self, model: torch.nn.Module, weight_decay: float, decayed: set[int]) -> list[dict]:
        """One AdamW group per (unit, decayed or not), each with ``lr_scale``; every parameter
        is included, trainable now or not. ``decayed``: ids of the parameters to weight-decay."""
        groups: dict[tuple, dict] = {}
        seen = set()
        for name, parameter in model.named_parameters():
            name = clean_name(name)  # after activation checkpointing: the plain model's name
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            unit, decay = self.units[name], id(parameter) in decayed
            key = (str(unit), decay)
            if key not in groups:
                groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                               "lr_scale": self.lr_scale(unit), "unit": str(unit)}
            groups[key]["params"].append(parameter)
        return list(groups.values())

    def trainable_units(self, step: int) -> set:
        """The units that train at ``step``: everything, or the head plus the top ``step // k``."""
        everything = {HEAD, *range(self.num_layers + 1)}
        if not self.config.freezes:
            return everything
        if self.config.unfreeze_every is None:
            return {HEAD}
        thawed = min(step // self.config.unfreeze_every, self.num_layers + 1)
        return {HEAD, *range(self.num_layers + 1 - thawed, self.num_layers + 1)}

    def apply(self, model: torch.nn.Module, step: int) -> None:
        """Set ``requires_grad`` for ``step`` (before its forward)."""
        trainable = self.trainable_units(step)
        for name, parameter in model.named_parameters():
            wanted = self.units[clean_name(name)] in trainable
            if parameter.requires_grad != wanted:
                parameter.requires_grad_(wanted)

    def summary(self) -> str:
        parts = [f"transfer: {self.num_layers} layers"]
        if self.config.layer_lr_decay != 1.0:
            parts.append(f"layer LR decay {self.config.layer_lr_decay} (embeddings at x"
                         f"{self.lr_scale(0):.3g} of lr)")
        if self.config.head_lr is not None:
            parts.append(f"head lr {self.config.head_lr}")
        if self.config.unfreeze_every is not None:
            parts.append(f"trunk frozen, one more unit every {self.config.unfreeze_every} steps (all by step "
                         f"{(self.num_layers + 1) * self.config.unfreeze_every})")
        elif self.config.freeze_trunk:
            parts.append("trunk frozen (head only)")
        return "; ".join(parts)
