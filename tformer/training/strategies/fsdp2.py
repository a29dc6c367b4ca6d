"""FSDP2 under torchrun: each block sharded with ``fully_shard`` (after activation checkpointing
and compilation, see :mod:`tformer.training.parallelize`), the MixedPrecisionPolicy casting to
bf16/fp16 while the sharded float32 master weights are what AdamW steps."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from tformer.training import checkpoint as ckpt
from tformer.training.optim import build_optimizer
from tformer.training.parallelize import apply_fsdp2
from tformer.training.strategies.common import DTYPES, LocalStep, StepResult, float32_cpu, place_model


class FSDP2:
    name = "fsdp2"

    def __init__(self, config):
        self.config = config

    def init_distributed(self) -> None:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")

    def validate(self, device: torch.device, precision: str) -> None:
        """FSDP2 takes every precision on every device."""

    def wrap(self, model: torch.nn.Module, *, device: torch.device, precision: str, world_size: int,
             parameter_groups) -> None:
        dtype = DTYPES[precision]
        place_model(model, device, self.config.training)
        apply_fsdp2(model, param_dtype=None if dtype == torch.float32 else dtype,
                    reshard_after_forward=self.config.fsdp.reshard_after_forward)
        self.model = model
        # Built after sharding: AdamW steps the float32 DTensor shards fully_shard put in place.
        self.optimizer = build_optimizer(model, self.config, device, groups=parameter_groups(model))
        self.autocast = contextlib.nullcontext  # the MixedPrecisionPolicy casts
        self.local = LocalStep(model, self.optimizer, device=device, precision=precision,
                               grad_clip=self.config.optimizer.grad_clip, autocast=self.autocast,
                               before_micro_batch=self._sync_on_last, reduce_squares=_all_reduce_cpu)

    def _sync_on_last(self, index: int, is_last: bool) -> None:
        # Accumulating micro-batches keep their unsharded gradients; only the last reduce-scatters.
        self.model.set_requires_gradient_sync(is_last)

    @property
    def scaler(self):
        return self.local.scaler

    def train_step(self, task, batches, **step) -> StepResult:
        return self.local.run(task, batches, **step)

    def full_state_dict(self) -> dict:
        """Every rank must call it (the shards are all-gathered)."""
        return float32_cpu(ckpt.full_model_state_dict(self.model))

    def save(self, folder: Path) -> None:
        ckpt.save_model_and_optimizer(folder, self.model, self.optimizer)

    def load(self, folder: Path) -> None:
        ckpt.load_model_and_optimizer(folder, self.model, self.optimizer)

    def scaler_state(self):
        return self.local.scaler_state()

    def load_scaler_state(self, state) -> None:
        self.local.load_scaler_state(state)


def _all_reduce_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; nccl reduces on the GPU, gloo on the CPU."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    reduced = tensor.to(f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu").clone()
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)
