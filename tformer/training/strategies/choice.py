"""Which strategy and precision a run uses, and the DeepSpeed config filled in from tformer's
own sections: what the strategy objects of this package are built from."""

from __future__ import annotations

import copy
import os

import torch

from tformer.training.config import ConfigError, TrainConfig


def strategy_name(config: TrainConfig) -> str:
    """``training.strategy``; ``auto`` means DeepSpeed when the config has a ``deepspeed``
    section, FSDP2 when launched with several ranks by torchrun, else one process."""
    strategy = config.training.strategy
    if strategy != "auto":
        return strategy
    if config.deepspeed is not None:
        return "deepspeed"
    return "fsdp2" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def resolve_precision(config: TrainConfig, device: torch.device) -> str:
    precision = config.training.precision
    ds = config.deepspeed or {}
    ds_choice = [name for name in ("bf16", "fp16") if isinstance(ds.get(name), dict) and ds[name].get("enabled")]
    if precision == "auto":
        if ds_choice:
            precision = ds_choice[0]
        elif device.type == "cuda" and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "fp32"  # on the CPU fp32 is the fast, exact choice for small models
    if ds_choice and ds_choice != [precision]:
        raise ConfigError(f"config: training.precision={precision!r} but the deepspeed section enables {ds_choice}")
    return precision


def deepspeed_config(config: TrainConfig, precision: str, world_size: int) -> dict:
    """The deepspeed section with batch sizes, clipping and precision filled in from tformer's
    sections (one source of truth: a value given in both places must agree)."""
    ds = copy.deepcopy(config.deepspeed or {})
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"config: deepspeed.{key} is not used: tformer builds AdamW and its schedule from the "
                              f"'optimizer' section (weight decay groups, warmup + cosine); remove deepspeed.{key}")
    training = config.training
    wanted = {"train_micro_batch_size_per_gpu": training.micro_batch_size,
              "gradient_accumulation_steps": training.grad_accum_steps,
              "train_batch_size": training.micro_batch_size * training.grad_accum_steps * world_size,
              "gradient_clipping": float(config.optimizer.grad_clip)}
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"config: deepspeed.{key}={ds[key]} disagrees with tformer's sections, which give "
                              f"{value}; set it once (in training/optimizer) and leave it out of deepspeed")
        ds[key] = value
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        section["enabled"] = precision == name
    ds.setdefault("steps_per_print", 1 << 30)  # tformer logs; keep DeepSpeed's own step log quiet
    return ds
