"""One process: the plain model, autocast for bf16/fp16 (with a loss scaler for fp16), AdamW."""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.training import checkpoint as ckpt
from tformer.training.optim import build_optimizer
from tformer.training.strategies.common import LocalStep, StepResult, autocast_for, float32_cpu, place_model


class Single:
    name = "single"

    def __init__(self, config):
        self.config = config

    def init_distributed(self) -> None:
        """Nothing to join: one process."""

    def validate(self, device: torch.device, precision: str) -> None:
        """Every device and precision works in one process."""

    def wrap(self, model: torch.nn.Module, *, device: torch.device, precision: str, world_size: int,
             parameter_groups) -> None:
        place_model(model, device, self.config.training)
        self.model = model
        self.optimizer = build_optimizer(model, self.config, device, groups=parameter_groups(model))
        self.autocast = autocast_for(device, precision)
        self.local = LocalStep(model, self.optimizer, device=device, precision=precision,
                               grad_clip=self.config.optimizer.grad_clip, autocast=self.autocast)

    @property
    def scaler(self):
        return self.local.scaler

    def train_step(self, task, batches, **step) -> StepResult:
        return self.local.run(task, batches, **step)

    def full_state_dict(self) -> dict:
        return float32_cpu(self.model.state_dict())

    def save(self, folder: Path) -> None:
        ckpt.save_model_and_optimizer(folder, self.model, self.optimizer)

    def load(self, folder: Path) -> None:
        ckpt.load_model_and_optimizer(folder, self.model, self.optimizer)

    def scaler_state(self):
        return self.local.scaler_state()

    def load_scaler_state(self, state) -> None:
        self.local.load_scaler_state(state)
