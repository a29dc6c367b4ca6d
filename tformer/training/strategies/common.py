"""What the strategies share: the accumulated backward, per-layer gradient groups, and the step
of a process that holds its parameters itself (whole, or as FSDP2 shards)."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import torch

from tformer.training.parallelize import clean_name, prepare_blocks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def place_model(model: torch.nn.Module, device: torch.device, training) -> None:
    """Move ``model`` to ``device`` and wrap its blocks as ``training`` (the config's training
    section) asks: activation checkpointing, then ``torch.compile`` per block. Every strategy
    starts its ``wrap`` here, before any sharding or engine sees the model."""
    model.to(device)
    prepare_blocks(model, activation_checkpointing=training.activation_checkpointing,
                   checkpoint_every=training.checkpoint_every, compile=training.compile)


class StepResult(NamedTuple):
    """One optimizer step: this rank's summed loss, the global grad norm (before clipping) and,
    on log steps, ``{"grad_norm/<layer>": float}``. The tensors stay on the device."""

    loss_sum: torch.Tensor
    grad_norm: torch.Tensor
    layer_norms: dict


def accumulated_backward(model, task, batches: list[dict], *, global_count: int, world_size: int,
                         label_smoothing: float = 0.0, backward=None, before_micro_batch=None,
                         context=contextlib.nullcontext) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; returns their summed loss (detached).

    Each micro-batch's loss *sum* is divided by ``global_count``, the number of items in the
    whole accumulated batch over all ranks, and multiplied by ``world_size`` because data-parallel
    gradient reduction averages over ranks. The gradient is then exactly that of the mean loss
    over the global batch, whatever the split into micro-batches and ranks (not the mean of
    per-micro-batch means, which weights items unevenly when counts differ).

    The sum stays on the loss's device: reading it would wait for the GPU at every micro-batch.
    """
    backward = backward or (lambda loss: loss.backward())
    total = None
    for index, batch in enumerate(batches):
        if before_micro_batch is not None:
            before_micro_batch(index, index == len(batches) - 1)
        with context():
            loss_sum, _ = task.loss_sum(model, task.to_device(batch), label_smoothing)
        backward(loss_sum * (world_size / global_count))
        detached = loss_sum.detach().double()
        total = detached if total is None else total + detached
    return total if total is not None else torch.zeros((), dtype=torch.float64)


def layer_groups(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Parameters grouped per block (``blocks.3.*`` -> ``block_3``) and per top-level module."""
    groups: dict[str, list] = {}
    for name, parameter in model.named_parameters():
        name = clean_name(name)
        parts = name.split(".")
        key = f"block_{parts[1]}" if parts[0] == "blocks" and len(parts) > 1 else parts[0]
        groups.setdefault(key, []).append((name, parameter))
    return groups


def _with_grads(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.grad is not None]


def _total_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    if not parameters:
        return torch.zeros((), dtype=torch.float32)
    return torch.nn.utils.get_total_norm([p.grad.detach() for p in parameters], norm_type=2.0)


def plain_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the (unsharded) gradients, as torch's clip_grad_norm_ computes it:
    one foreach norm over all of them, not a few small ops per parameter every step."""
    return _total_norm(_with_grads(model))


def clip_plain_grads(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the plain .grad of ``model`` to the global L2 norm ``max_norm`` (0: no clipping) and
    return the norm before clipping. The model's parameters are walked once a step."""
    parameters = _with_grads(model)
    norm = _total_norm(parameters)
    if max_norm > 0:
        # It takes the parameters (not their .grad) and scales each .grad in place.
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    dtype = DTYPES[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


class LocalStep:
    """Backward, clipping and the optimizer step where this process holds its parameters and
    their gradients (``Single``; ``FSDP2``, whose gradients are DTensor shards).

    Args:
        before_micro_batch: ``(index, is_last)`` before each micro-batch (FSDP2: gradient sync
            on the last only).
        reduce_squares: sums per-layer squared norms over ranks (FSDP2: each holds a shard).
    """

    def __init__(self, model, optimizer, *, device: torch.device, precision: str, grad_clip: float,
                 autocast, before_micro_batch=None, reduce_squares=None):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.autocast = autocast
        self.before_micro_batch = before_micro_batch
        self.reduce_squares = reduce_squares
        # Dynamic loss scaling (Micikevicius et al., 2018): fp16 gradients underflow otherwise.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def run(self, task, batches, *, global_count: int, world_size: int, label_smoothing: float,
            want_layer_norms: bool) -> StepResult:
        scaler = self.scaler
        backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else None
        loss_sum = accumulated_backward(self.model, task, batches, global_count=global_count, world_size=world_size,
                                        label_smoothing=label_smoothing, backward=backward,
                                        before_micro_batch=self.before_micro_batch, context=self.autocast)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        layer_norms = self.layer_norms() if want_layer_norms else {}
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum, grad_norm, layer_norms)

    def layer_norms(self) -> dict:
        groups = layer_groups(self.model)
        squares = torch.zeros(len(groups), dtype=torch.float64, device=self.device)
        for index, members in enumerate(groups.values()):
            for _, parameter in members:
                grad = parameter.grad
                if grad is None:
                    continue
                grad = grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP2: this rank's shard
                squares[index] += grad.detach().double().pow(2).sum()
        squares = squares.cpu()  # one transfer for every group (log steps only)
        if self.reduce_squares is not None:
            squares = self.reduce_squares(squares)
        return {f"grad_norm/{name}": math.sqrt(value) for name, value in zip(groups, squares.tolist())}

    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)


def float32_cpu(state: dict) -> dict:
    """Floating tensors as float32 on the CPU; integer buffers as they are (on the CPU)."""
    return {clean_name(k): (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
            for k, v in state.items()}
