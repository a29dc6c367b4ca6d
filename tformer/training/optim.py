"""AdamW with weight-decay groups, and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch

from tformer.training.config import TrainConfig


def learning_rate(step: int, config, total_steps: int | None = None) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``decay_steps`` (default: ``total_steps``, the run's length, else ``run.steps``) (Loshchilov and
    Hutter, 2017), then ``min_lr``. The schedule is a pure function of the step, so resuming the
    step resumes the schedule."""
    opt = config.optimizer
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return opt.lr
    decay_steps = opt.decay_steps if opt.decay_steps is not None else (total_steps or config.run.steps)
    if step >= decay_steps:
        return opt.min_lr
    progress = (step - opt.warmup_steps) / max(1, decay_steps - opt.warmup_steps)
    return opt.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (opt.lr - opt.min_lr)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matmul weights (``nn.Linear.weight``, including an LM head tied to the token
    embedding); never norms, biases or untied embedding tables (nanoGPT / GPT-2 practice)."""
    decayed = decayed_parameter_ids(model)
    decay, no_decay, seen = [], [], set()
    for parameter in model.parameters():
        if id(parameter) in seen or not parameter.requires_grad:
            continue
        seen.add(id(parameter))
        (decay if id(parameter) in decayed else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decayed_parameter_ids(model: torch.nn.Module) -> set[int]:
    """ids of the parameters weight decay applies to: ``nn.Linear`` weights."""
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dim() >= 2}


def set_learning_rates(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's ``lr`` on every group, times the group's ``lr_scale`` (layer-wise decay, a
    head LR: tformer.training.transfer) where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device,
                    groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (default: :func:`parameter_groups`)."""
    opt = config.optimizer
    # torch's fused AdamW is one kernel per parameter instead of about ten (its default on the
    # CPU is the per-tensor loop): a measured share of a small model's step. It exists for CUDA
    # and, since torch 2.4, for CPU float tensors.
    fused = opt.fused if opt.fused is not None else device.type in FUSED_ADAMW_DEVICES
    kwargs = {"fused": True} if fused else {}
    groups = groups if groups is not None else parameter_groups(model, opt.weight_decay)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, **kwargs)
