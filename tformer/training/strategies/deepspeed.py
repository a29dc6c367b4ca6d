"""DeepSpeed ZeRO 0-3: ``deepspeed.initialize`` around the model and tformer's AdamW; the engine
holds the bf16/fp16 weights, the fp32 master copy, the loss scaler and the accumulation boundary."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch

from tformer.optional import require
from tformer.training.config import ConfigError
from tformer.training.optim import build_optimizer
from tformer.training.parallelize import clean_name
from tformer.training.strategies.common import (StepResult, accumulated_backward, clip_plain_grads, layer_groups,
                                                place_model, plain_grad_norm)
from tformer.training.strategies.choice import deepspeed_config

WHAT = "training.strategy 'deepspeed'"


class DeepSpeed:
    name = "deepspeed"
    scaler = None  # the engine scales fp16 losses itself

    def __init__(self, config):
        self.config = config

    def init_distributed(self) -> None:
        deepspeed = require("deepspeed", WHAT)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        if not torch.cuda.is_available():
            # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce on first use
            # (~1.5-2 min on 2 cores). Only its inference all-reduce uses it; training
            # collectives go through torch.distributed (gloo). DeepSpeed has no public switch
            # for it, so its op table says the op is unavailable (here, and nowhere else).
            compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
            if isinstance(compatible, dict):
                compatible["deepspeed_shm_comm"] = False
        deepspeed.init_distributed()

    def validate(self, device: torch.device, precision: str) -> None:
        if device.type == "cpu" and precision == "fp16":
            raise ConfigError("config: fp16 under DeepSpeed needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                              "use bf16 or fp32 on the CPU")

    def wrap(self, model: torch.nn.Module, *, device: torch.device, precision: str, world_size: int,
             parameter_groups) -> None:
        deepspeed = require("deepspeed", WHAT)
        place_model(model, device, self.config.training)
        optimizer = build_optimizer(model, self.config, torch.device("cpu") if device.type == "cpu" else device,
                                    groups=parameter_groups(model))
        self.ds_config = deepspeed_config(self.config, precision, world_size)
        # fp32 without ZeRO: the engine would clip with its own loop (a float64 norm, parameter by
        # parameter, every step); tformer clips the plain .grad with torch's foreach clip instead,
        # which also gives the norm it logs. Mixed precision and ZeRO keep the engine's clipping:
        # there the gradients live in the engine's own buffers.
        stage = (self.ds_config.get("zero_optimization") or {}).get("stage", 0)
        self.clip = float(self.config.optimizer.grad_clip) if precision == "fp32" and stage == 0 else None
        if self.clip is not None:
            self.ds_config["gradient_clipping"] = 0.0
        # Without ZeRO the gradients stay plain .grad, and DeepSpeed records no norm of them.
        self.plain_grads = stage == 0
        # One process without ZeRO has nothing to all-reduce, but the engine still flattens,
        # "reduces" and copies back every gradient after each backward (about 1.4 ms a step of
        # the README's CPU job). engine.no_sync() is DeepSpeed's public switch for skipping that
        # reduction; it is refused with ZeRO 2/3, and ZeRO-1's optimizer needs its reduce, so it
        # is taken only here.
        self.alone = world_size == 1 and stage == 0
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.model = self.engine.module
        self.autocast = contextlib.nullcontext  # DeepSpeed holds the weights in bf16/fp16 itself

    def train_step(self, task, batches, *, global_count: int, world_size: int, label_smoothing: float,
                   want_layer_norms: bool) -> StepResult:
        engine = self.engine

        def backward(loss):
            with engine.no_sync() if self.alone else contextlib.nullcontext():
                engine.backward(loss, scale_wrt_gas=False)

        def before(index, is_last):
            if index > 0:
                engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary

        loss_sum = accumulated_backward(engine, task, batches, global_count=global_count, world_size=world_size,
                                        label_smoothing=label_smoothing, backward=backward, before_micro_batch=before)
        layer_norms = self._layer_norms() if want_layer_norms else {}
        if self.clip is not None:
            grad_norm = clip_plain_grads(self.model, self.clip)
            engine.step()
        else:
            plain_norm = plain_grad_norm(self.model) if self.plain_grads else None  # before step() zeroes them
            engine.step()  # clips to gradient_clipping (deepspeed_config fills it in)
            grad_norm = engine.get_global_grad_norm()
            grad_norm = grad_norm if grad_norm is not None else plain_norm
        return StepResult(loss_sum, grad_norm, layer_norms)

    def _layer_norms(self) -> dict:
        safe_get_full_grad = require("deepspeed.utils", WHAT).safe_get_full_grad
        result = {}
        for name, members in layer_groups(self.model).items():
            total = 0.0
            for _, parameter in members:
                grad = safe_get_full_grad(parameter)  # every rank must call it under ZeRO-3
                if grad is not None:
                    total += grad.detach().double().pow(2).sum().item()
            result[f"grad_norm/{name}"] = math.sqrt(total)
        return result

    def full_state_dict(self) -> dict:
        """The fp32 master weights (not the bf16/fp16 copies the engine computes with), gathered
        from the ZeRO partitions, plus the buffers; every rank must call it (ZeRO-3 all-gathers)."""
        safe_get_full_fp32_param = require("deepspeed.utils", WHAT).safe_get_full_fp32_param
        gathered: dict[int, torch.Tensor] = {}
        state = {}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            if id(parameter) not in gathered:
                full = safe_get_full_fp32_param(parameter)  # None when DeepSpeed keeps no separate fp32 copy
                gathered[id(parameter)] = (full if full is not None else parameter.detach()).float().cpu()
            state[clean_name(name)] = gathered[id(parameter)]
        for name, value in self.model.state_dict().items():  # persistent buffers (keys already clean)
            if name not in state:
                state[name] = (value.float() if value.is_floating_point() else value).detach().cpu()
        return state

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=False)

    def scaler_state(self):
        return None  # inside the engine's checkpoint

    def load_scaler_state(self, state) -> None:
        """The engine's checkpoint restores its loss scaler."""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
