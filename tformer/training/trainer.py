"""The trainer: one loop for a single process, DeepSpeed (ZeRO 1-3) or FSDP2 under torchrun.

The task (:mod:`tformer.tasks`) owns the model, the data and the loss; the trainer owns the
rest: devices, precision, wrapping and sharding, gradient accumulation, the optimizer and its
schedule, evaluation, checkpoints and logging. The strategy is ``training.strategy``; ``auto``
means DeepSpeed when the config has a ``deepspeed`` section, FSDP2 when launched with several
ranks by torchrun, else one process.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_verify, run_folder
from tformer.training.config import ConfigError, TrainConfig
from tformer.training.init_from import load_trunk, resolve_init_source
from tformer.training.metrics_logger import MetricsLogger
from tformer.training.optim import build_optimizer, decayed_parameter_ids, learning_rate, set_learning_rates
from tformer.training.parallelize import apply_activation_checkpointing, apply_fsdp2
from tformer.training.run_length import planned_steps
from tformer.training.run_lock import RunLock
from tformer.training.strategy import deepspeed_config, resolve_precision, resolve_strategy
from tformer.training.transfer import Transfer
from tformer.optional import require
from tformer.tasks import get_task_class
from tformer.visualization.gradients import gradient_warnings
from tformer.visualization.run_plots import write_run_plots

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- pure pieces

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
        parts = name.split(".")
        key = f"block_{parts[1]}" if parts[0] == "blocks" and len(parts) > 1 else parts[0]
        groups.setdefault(key, []).append((name, parameter))
    return groups


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool | str = False, overwrite: bool = False):
        """``resume``: True continues the newest checkpoint in run.out_dir that verifies (older
        ones after damage, with a warning); "strict" refuses a damaged one; a path, that folder.
        Without it, an out_dir holding another run's outputs is refused unless ``overwrite``
        (which deletes them; :mod:`tformer.training.run_folder`)."""
        self.lock = None
        try:
            self._setup(config, resume, overwrite)
        except BaseException:
            self.release_lock()  # a run that never started must not leave its out_dir locked
            raise

    def _setup(self, config: TrainConfig, resume: bool | str, overwrite: bool = False) -> None:
        self.config = config
        self.strategy = resolve_strategy(config)
        self._init_distributed()
        self.precision = resolve_precision(config, self.device)
        if self.device.type == "cuda" and getattr(config.model, "backend", None) in (None, "auto"):
            # backend="auto" on a GPU: this device's kernel self-check now (cached after the first
            # run; LOCAL_RANK 0 runs it, the other ranks wait), not inside the first traced step.
            from tformer.ops import overrides

            if overrides.selftest():
                from tformer.ops.selftest import verdict_for

                verdict_for(self.device)
        if self.strategy == "deepspeed" and self.device.type == "cpu" and self.precision == "fp16":
            raise ConfigError("config: fp16 under DeepSpeed needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                              "use bf16 or fp32 on the CPU")
        if self.device.type == "cpu":
            threads = config.training.threads
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", self.world_size)))
            if threads is None and local_ranks > 1:
                # Several CPU ranks on one machine: share the cores. Oversubscribed OpenMP threads
                # spin against each other and run many times slower, not just proportionally.
                threads = max(1, (os.cpu_count() or 1) // local_ranks)
            if threads:
                torch.set_num_threads(threads)
        self.out_dir = Path(config.run.out_dir)
        self.checkpoints_dir = self.out_dir / "checkpoints"
        # One run per out_dir (rank 0 holds the lock for all ranks); taken before anything is written.
        run_folder.check_is_folder(self.out_dir)
        self.lock = RunLock(self.out_dir).acquire() if self.rank == 0 else None
        self._claim_out_dir(resume, overwrite)

        # A mistyped init_from fails here, before any data is read; --resume takes the checkpoint's weights.
        init_source, self.init_from_summary = None, None
        if config.training.init_from and not resume:
            init_source = resolve_init_source(config.training.init_from)
        task_class = get_task_class(config.task)
        self.task = task_class(config, rank=self.rank, world_size=self.world_size, device=self.device)
        if self.rank == 0:
            self.task.prepare_data()
        self.barrier()
        self.task.load_data()
        self.total_steps = planned_steps(config.run, self.task)  # run.steps, or run.epochs in steps
        self.task.check_ready()  # what the final evaluation and samples need, checked before step 1
        self.task.compute_dtype = DTYPES[self.precision]

        # Same seed on every rank: identical initial weights without a broadcast.
        torch.manual_seed(config.training.seed)
        model = self.task.build_model()
        if init_source is not None:
            self.init_from_summary = load_trunk(model, init_source, metadata=self.task.export_metadata())
        self.raw_model = model
        # Freezing / layer-wise LRs (transfer section): param groups now, requires_grad per step.
        self.transfer = Transfer(config.transfer, model, config.optimizer.lr) if config.transfer.active else None
        if self.transfer is not None:
            self.init_from_summary = "\n".join(filter(None, [self.init_from_summary, self.transfer.summary()]))
        if config.training.activation_checkpointing:
            apply_activation_checkpointing(model, config.training.checkpoint_every)
        self._wrap(model)
        # From here each rank draws its own dropout noise.
        torch.manual_seed(config.training.seed + 1 + self.rank)
        self.step = 0
        if resume:
            self._resume(resume)

    # --- setup --------------------------------------------------------------------------------
    def _claim_out_dir(self, resume, overwrite: bool) -> None:
        """Rank 0 refuses (or, with ``overwrite``, clears) an out_dir holding another run; every
        rank learns the answer, so all stop together instead of waiting for rank 0."""
        refusal = None
        if self.rank == 0:
            try:
                run_folder.claim(self.out_dir, resume=resume, overwrite=overwrite)
            except run_folder.OutDirHoldsARun as error:
                refusal = error
        if self.all_reduce(torch.tensor(float(refusal is not None), dtype=torch.float64)).item() > 0:
            raise refusal or run_folder.OutDirHoldsARun(f"run.out_dir {self.out_dir} holds another run (rank 0 "
                                                     f"refused it; see its error)")

    def _init_distributed(self) -> None:
        if self.strategy == "deepspeed":
            deepspeed = require("deepspeed", "training.strategy 'deepspeed'")
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                os.environ.setdefault(key, value)
            if "MASTER_PORT" not in os.environ:
                os.environ["MASTER_PORT"] = str(_free_port())
            if not torch.cuda.is_available():
                # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce on first use
                # (~1.5-2 min on 2 cores). Only its inference all-reduce uses it; training
                # collectives go through torch.distributed (gloo), so skip the build.
                compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
                if isinstance(compatible, dict):
                    compatible["deepspeed_shm_comm"] = False
            deepspeed.init_distributed()
        elif self.strategy == "fsdp2":
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        wanted = self.config.training.device
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{local_rank}" if wanted == "cuda" else wanted)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # TF32 matmuls: ~8x the fp32 tensor-core rate, precision enough for training.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _wrap(self, model: torch.nn.Module) -> None:
        config = self.config
        self.scaler = None
        self.engine = None
        if self.strategy == "deepspeed":
            deepspeed = require("deepspeed", "training.strategy 'deepspeed'")
            optimizer = build_optimizer(model, config, torch.device("cpu") if self.device.type == "cpu" else self.device,
                                        groups=self._transfer_groups(model))
            self.ds_config = deepspeed_config(config, self.precision, self.world_size)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model.to(self.device), optimizer=optimizer,
                                                                     config=self.ds_config)
            self.model = self.engine.module
            self.autocast = contextlib.nullcontext  # DeepSpeed holds the weights in bf16/fp16 itself
            return
        dtype = DTYPES[self.precision]
        model.to(self.device)
        if self.strategy == "fsdp2":
            apply_fsdp2(model, param_dtype=None if dtype == torch.float32 else dtype,
                        reshard_after_forward=config.fsdp.reshard_after_forward)
            self.autocast = contextlib.nullcontext  # the MixedPrecisionPolicy casts
        elif dtype == torch.float32:
            self.autocast = contextlib.nullcontext
        else:
            self.autocast = lambda: torch.autocast(self.device.type, dtype=dtype)
        if self.precision == "fp16":
            # Dynamic loss scaling (Micikevicius et al., 2018): fp16 gradients underflow otherwise.
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.model = model
        self.optimizer = build_optimizer(model, config, self.device, groups=self._transfer_groups(model))
        self.train_callable = torch.compile(model) if config.training.compile else model

    def _transfer_groups(self, model):
        if self.transfer is None:
            return None
        return self.transfer.parameter_groups(model, self.config.optimizer.weight_decay, decayed_parameter_ids(model))

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized() or self.world_size == 1:
            return tensor
        # gloo and nccl both reduce on the collective's device; float64 is fine on both.
        reduced = tensor.to(self.device if self.device.type == "cuda" else "cpu").clone()
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    # --- one step -----------------------------------------------------------------------------
    def train_step(self, want_layer_norms: bool) -> dict:
        config = self.config
        lr = learning_rate(self.step, config, self.total_steps)
        set_learning_rates(self.optimizer, lr)
        if self.transfer is not None:
            self.transfer.apply(self.raw_model, self.step)
        batches = [self.task.next_train_batch() for _ in range(config.training.grad_accum_steps)]
        local_count = sum(self.task.num_items(b) for b in batches)
        global_count = int(self.all_reduce(torch.tensor(float(local_count), dtype=torch.float64)).item())
        layer_norms = {}
        if self.engine is not None:
            engine = self.engine
            def backward(loss):
                engine.backward(loss, scale_wrt_gas=False)

            def before(index, is_last):
                if index > 0:
                    engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary

            loss_sum = accumulated_backward(engine, self.task, batches, global_count=global_count,
                                            world_size=self.world_size, label_smoothing=config.training.label_smoothing,
                                            backward=backward, before_micro_batch=before)
            if want_layer_norms:
                layer_norms = self._deepspeed_layer_norms()
            # Without ZeRO, DeepSpeed does not record the norm: the gradients are still plain .grad.
            plain_norm = _grad_norm(self.model) if engine.zero_optimization_stage() == 0 else None
            engine.step()
            grad_norm = engine.get_global_grad_norm()
            grad_norm = grad_norm if grad_norm is not None else plain_norm
        else:
            def before(index, is_last):
                if self.strategy == "fsdp2":
                    self.model.set_requires_gradient_sync(is_last)

            backward = (lambda loss: self.scaler.scale(loss).backward()) if self.scaler else None
            loss_sum = accumulated_backward(self.train_callable, self.task, batches, global_count=global_count,
                                            world_size=self.world_size, label_smoothing=config.training.label_smoothing,
                                            backward=backward, before_micro_batch=before, context=self.autocast)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if want_layer_norms:
                layer_norms = self._local_layer_norms()
            max_norm = config.optimizer.grad_clip if config.optimizer.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # Loss and grad norm stay device tensors: fit() reads them on log steps only, all at once.
        loss = self.all_reduce(loss_sum) / global_count
        self.step += 1
        return {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/items": global_count,
                **layer_norms}

    def _local_layer_norms(self) -> dict:
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
        if self.strategy == "fsdp2":
            squares = self.all_reduce(squares)
        return {f"grad_norm/{name}": math.sqrt(value) for name, value in zip(groups, squares.tolist())}

    def _deepspeed_layer_norms(self) -> dict:
        safe_get_full_grad = require("deepspeed.utils", "training.strategy 'deepspeed'").safe_get_full_grad

        result = {}
        for name, members in layer_groups(self.model).items():
            total = 0.0
            for _, parameter in members:
                grad = safe_get_full_grad(parameter)  # every rank must call it under ZeRO-3
                if grad is not None:
                    total += grad.detach().double().pow(2).sum().item()
            result[f"grad_norm/{name}"] = math.sqrt(total)
        return result

    # --- evaluation and samples ---------------------------------------------------------------
    def evaluate(self, final: bool) -> dict:
        self.model.eval()
        with self.autocast():
            metrics = self.task.evaluate(self.model, final, self.all_reduce)
            samples = self.task.samples(self.model) if self.config.sample.num_samples else []
        self.model.train()
        return metrics, samples

    # --- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        writer = ckpt.CheckpointWriter(self.checkpoints_dir, self.step, rank=self.rank, barrier=self.barrier)
        try:
            return self._write_checkpoint(writer)
        except OSError as error:  # a full disk, a quota: the previous checkpoints are untouched
            writer.abandon()
            previous = ckpt.latest_checkpoint(self.checkpoints_dir)
            raise OSError(error.errno, f"checkpoint: writing step {self.step} into {writer.tmp} failed "
                                       f"({error.strerror or error}); the half-written folder was removed and "
                                       f"{previous or 'no earlier checkpoint'} is intact; free space and "
                                       f"--resume") from error

    def _write_checkpoint(self, writer) -> Path:
        if self.engine is not None:
            self.engine.save_checkpoint(str(writer.tmp / "deepspeed"), tag="state")
        else:
            ckpt.save_model_and_optimizer(writer.tmp, self.model, self.optimizer)
        trainer_state = {"step": self.step, "task": self.task.state_dict(), "rng": ckpt.rng_state(),
                         "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        ckpt.save_trainer_state(writer.tmp, self.rank, trainer_state)
        self.export(writer.tmp / "export")
        return writer.commit({"step": self.step, "strategy": self.strategy, "world_size": self.world_size},
                             keep=self.config.run.keep_checkpoints)

    def export(self, folder: Path) -> None:
        """model.safetensors + config.json (float32 weights), written by rank 0."""
        from tformer.models.pretrained import save_pretrained

        if self.engine is not None:
            state = self._deepspeed_fp32_state_dict()
        elif self.strategy == "fsdp2":
            state = ckpt.full_model_state_dict(self.model)
        else:
            state = self.model.state_dict()
        if self.rank == 0:
            # Building the model draws initial weights: under a forked RNG, so exporting never
            # moves the training RNG (dropout) and a run with checkpoints equals one without.
            with torch.random.fork_rng(devices=[]):
                fresh = self.task.build_model()
            missing, unexpected = fresh.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=False)
            # A tied weight appears under one name only (named_parameters drops duplicates).
            aliases = _tied_names(fresh)
            if unexpected or set(missing) - aliases:
                raise RuntimeError(f"export: state dict mismatch, missing {missing}, unexpected {unexpected}")
            save_pretrained(fresh, folder, task=self.config.task, metadata=self.task.export_metadata())
        self.barrier()

    def _deepspeed_fp32_state_dict(self) -> dict:
        """The fp32 master weights (not the bf16/fp16 copies the engine computes with), gathered
        from the ZeRO partitions; every rank must call it (ZeRO-3 all-gathers)."""
        safe_get_full_fp32_param = require("deepspeed.utils", "training.strategy 'deepspeed'").safe_get_full_fp32_param

        state = {}
        for name, parameter in self.model.named_parameters():
            full = safe_get_full_fp32_param(parameter)  # None when DeepSpeed keeps no separate fp32 copy
            state[name] = (full if full is not None else parameter.detach()).float().cpu()
        return state

    def _resume(self, resume) -> None:
        # Files are re-hashed against the COMPLETE marker before anything is loaded; a damaged
        # newest checkpoint falls back to an older one (with a warning) unless resume == "strict".
        if isinstance(resume, str) and resume != "strict":
            folder = checkpoint_verify.check_chosen_checkpoint(resume)
        else:
            folder = checkpoint_verify.choose_resume_checkpoint(self.checkpoints_dir, strict=resume == "strict")
        state = ckpt.load_trainer_state(folder, self.rank)
        if self.transfer is not None and state["step"] > 0:
            # The units trained before the checkpoint, so the optimizer state expected matches the saved one.
            self.transfer.apply(self.raw_model, state["step"] - 1)
        if self.engine is not None:
            self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        else:
            ckpt.load_model_and_optimizer(folder, self.model, self.optimizer)
        self.step = state["step"]
        self.task.load_state_dict(state["task"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.resumed_from = folder

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        config, run = self.config, self.config.run
        logger = MetricsLogger(config.logging, self.out_dir, enabled=self.rank == 0, total_steps=self.total_steps,
                               start_step=self.step, full_config=config.to_dict(), resume=self.step > 0)
        logger.write(f"tformer: task={config.task} strategy={self.strategy} precision={self.precision} "
                     f"device={self.device} world_size={self.world_size} "
                     f"params={parameter_count(self.raw_model) / 1e6:.2f}M "
                     f"start_step={self.step}")
        if self.init_from_summary:
            logger.write(self.init_from_summary)
        history = []
        unread = 0  # history[unread:] may hold device tensors not yet read (see _read_metrics)
        run_start = tokens_timer = time.time()
        tokens_seen = 0
        out_of_time = False
        shown_loss = "-"
        while self.step < self.total_steps and not out_of_time:
            log_now = (self.step + 1) % run.log_interval == 0 or self.step + 1 == self.total_steps
            step_start = time.time()
            metrics = self.train_step(want_layer_norms=log_now and config.logging.layer_grad_norms)
            history.append(metrics)
            if self.step == 1 and config.training.compile:
                # The first step traces and compiles the model: reported apart from the step times.
                first_step_s = time.time() - step_start
                logger.write(f"torch.compile: first step took {first_step_s:.1f} s (compilation included)")
                history[-1]["time/compile_first_step_s"] = first_step_s
            tokens_seen += metrics["train/items"]
            elapsed = max(time.time() - tokens_timer, 1e-9)
            if log_now:  # the only host-device sync of a step: every step's loss since the last log, at once
                unread = _read_metrics(history, unread)
                shown_loss = f"{metrics['train/loss']:.4f}"
            logger.progress(1, {"loss": shown_loss, "tok/s": f"{tokens_seen / elapsed:,.0f}"})
            if log_now:
                logger.log(self.step, {**metrics, **self.task.train_metrics(),
                                       "train/items_per_s": tokens_seen / elapsed})
                for warning in gradient_warnings(metrics, config.logging.grad_vanish_below,
                                                 config.logging.grad_explode_above):
                    logger.warn(f"step {self.step}: {warning}")
            out_of_time = self._out_of_time(run_start)
            is_last = self.step == self.total_steps or out_of_time
            # Checkpoint and export before evaluating, so a failure there loses nothing.
            if (run.checkpoint_interval and self.step % run.checkpoint_interval == 0) or is_last:
                path = self.save_checkpoint()
                logger.write(f"checkpoint: {path}")
            if is_last and run.export:
                self.export(self.out_dir / "export")
                logger.write(f"export: {self.out_dir / 'export'}")
            if (run.eval_interval and self.step % run.eval_interval == 0) or is_last:
                unread = _read_metrics(history, unread)
                eval_metrics, samples = self.evaluate(final=is_last)
                # Wall time since the loop began (compiles and evaluations included): the
                # "val loss X within N minutes" targets read it.
                eval_metrics["time/elapsed_s"] = time.time() - run_start
                logger.log(self.step, eval_metrics)
                logger.write(f"step {self.step}: " + " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
                if samples:
                    logger.text(self.step, "samples", samples)
                history[-1] = {**history[-1], **eval_metrics}
                if config.logging.visualize and self.rank == 0:
                    logger.images(self.step, write_run_plots(self.out_dir))
        _read_metrics(history, unread)
        if run.export and not history and self.step == self.total_steps:  # resumed at the end: export again
            self.export(self.out_dir / "export")
            logger.write(f"export: {self.out_dir / 'export'}")
        logger.close()
        self.release_lock()
        return history

    def _out_of_time(self, run_start: float) -> bool:
        """Whether run.time_limit_s has passed; every rank takes rank 0's answer, so all stop at
        the same step (clocks differ, and a rank that stopped alone would hang the others)."""
        limit = self.config.run.time_limit_s
        if limit is None:
            return False
        flag = torch.tensor(float(self.rank == 0 and time.time() - run_start >= limit), dtype=torch.float64)
        return bool(self.all_reduce(flag).item() > 0)

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def close(self) -> None:
        self.release_lock()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def parameter_count(model: torch.nn.Module) -> int:
    """The model's parameters, counted whole: ZeRO-3 leaves each rank an empty placeholder
    (``numel() == 0``) and records the full size as ``ds_numel``."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    squares = sum(p.grad.detach().double().pow(2).sum() for p in model.parameters() if p.grad is not None)
    return torch.as_tensor(squares, dtype=torch.float64).sqrt()


def _read_metrics(history: list[dict], start: int) -> int:
    """Turn the device tensors in ``history[start:]`` into floats with one transfer (a single
    host-device sync for all the steps since the last read); returns the new ``start``."""
    slots = [(entry, key) for entry in history[start:] for key, value in entry.items()
             if isinstance(value, torch.Tensor)]
    by_device: dict[torch.device, list[tuple[dict, str]]] = {}
    for entry, key in slots:
        by_device.setdefault(entry[key].device, []).append((entry, key))
    for group in by_device.values():  # one stack and one copy per device (the GPU and perhaps the CPU)
        values = torch.stack([entry[key].detach().double().reshape(()) for entry, key in group]).cpu().tolist()
        for (entry, key), value in zip(group, values):
            entry[key] = value
    return len(history)


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another name (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
