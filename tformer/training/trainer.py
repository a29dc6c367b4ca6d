"""The trainer: one loop for a single process, DeepSpeed (ZeRO 0-3) or FSDP2 under torchrun.

The task (:mod:`tformer.tasks`) owns the model, the data and the loss; the strategy
(:mod:`tformer.training.strategies`, chosen once from ``training.strategy``) owns wrapping and
sharding, backward with gradient accumulation, clipping, the optimizer step, grad norms and its
part of a checkpoint; the trainer owns the rest: devices, precision, the learning-rate schedule,
evaluation, checkpoints, exports and logging. It never asks which strategy it holds.
"""

from __future__ import annotations

import os
from typing import Callable
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_verify, run_folder
from tformer.training.config import ConfigError, TrainConfig
from tformer.training.init_from import load_trunk, resolve_init_source
from tformer.training.metrics_logger import MetricsLogger
from tformer.training.optim import decayed_parameter_ids, learning_rate, set_learning_rates
from tformer.training.run_length import planned_steps
from tformer.training.run_lock import RunLock
from tformer.training.strategies import resolve_strategy
from tformer.training.strategies.common import DTYPES
from tformer.training.strategies.choice import resolve_precision
from tformer.training.transfer import Transfer
from tformer.models.pretrained import save_state_dict, tied_groups
from tformer.tasks import get_task_class
from tformer.visualization.gradient_health import gradient_warnings


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool | str = False, overwrite: bool = False,
                 draw_plots: Callable[[Path], list] | None = None):
        """``resume``: True continues the newest checkpoint in run.out_dir that verifies (older
        ones after damage, with a warning); "strict" refuses a damaged one; a path, that folder.
        Without it, an out_dir holding another run's outputs is refused unless ``overwrite``
        (which deletes them; :mod:`tformer.training.run_folder`). ``draw_plots(out_dir)``
        draws the run's plots at each evaluation and returns their paths (``logging.visualize``;
        the training command passes :func:`tformer.visualization.run_plots.write_run_plots`: the
        trainer itself draws nothing)."""
        self.lock = None
        self.draw_plots = draw_plots
        if config.logging.visualize and draw_plots is None:
            raise ConfigError("config: logging.visualize=true needs a plot writer: run `tformer train --visualize`, "
                              "or pass Trainer(..., draw_plots=tformer.visualization.run_plots.write_run_plots)")
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
        self.strategy.validate(self.device, self.precision)
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
        # What an export needs besides the weights, read while the model is still plain (FSDP2
        # swaps its class for an FSDP subclass; checkpoint wrappers rename its parameters).
        self.export_spec = {"model_class": type(model).__name__, "model_config": model.config.to_dict(),
                            "tied": tied_groups(model)}
        self.export_keys = set(model.state_dict())
        # Freezing / layer-wise LRs (transfer section): param groups now, requires_grad per step.
        self.transfer = Transfer(config.transfer, model, config.optimizer.lr) if config.transfer.active else None
        if self.transfer is not None:
            self.init_from_summary = "\n".join(filter(None, [self.init_from_summary, self.transfer.summary()]))
        self.strategy.wrap(model, device=self.device, precision=self.precision, world_size=self.world_size,
                           parameter_groups=self._transfer_groups)
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
        self.strategy.init_distributed()
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

    @property
    def model(self) -> torch.nn.Module:
        """The model as the strategy wrapped it (what evaluation calls)."""
        return self.strategy.model

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
        set_learning_rates(self.strategy.optimizer, lr)
        if self.transfer is not None:
            self.transfer.apply(self.raw_model, self.step)
        batches = [self.task.next_train_batch() for _ in range(config.training.grad_accum_steps)]
        local_count = sum(self.task.num_items(b) for b in batches)
        global_count = int(self.all_reduce(torch.tensor(float(local_count), dtype=torch.float64)).item())
        loss_sum, grad_norm, layer_norms = self.strategy.train_step(
            self.task, batches, global_count=global_count, world_size=self.world_size,
            label_smoothing=config.training.label_smoothing, want_layer_norms=want_layer_norms)
        # Loss and grad norm stay device tensors: fit() reads them on log steps only, all at once.
        loss = self.all_reduce(loss_sum) / global_count
        self.step += 1
        return {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/items": global_count,
                **layer_norms}

    # --- evaluation and samples ---------------------------------------------------------------
    def evaluate(self, final: bool) -> dict:
        model = self.strategy.model
        model.eval()
        with self.strategy.autocast():
            metrics = self.task.evaluate(model, final, self.all_reduce)
            samples = self.task.samples(model) if self.config.sample.num_samples else []
        model.train()
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
        self.strategy.save(writer.tmp)
        trainer_state = {"step": self.step, "task": self.task.state_dict(), "rng": ckpt.rng_state(),
                         "scaler": self.strategy.scaler_state()}
        ckpt.save_trainer_state(writer.tmp, self.rank, trainer_state)
        self.export(writer.tmp / "export")
        return writer.commit({"step": self.step, "strategy": self.strategy.name, "world_size": self.world_size},
                             keep=self.config.run.keep_checkpoints)

    def export(self, folder: Path) -> None:
        """model.safetensors + config.json (the float32 master weights), written by rank 0 from
        the trained model's state dict and config: no model is built for it."""
        state = self.strategy.full_state_dict()  # every rank: shards and partitions are gathered
        if self.rank == 0:
            expected = self.export_keys
            if set(state) != expected:
                raise RuntimeError(f"export: state dict mismatch, missing {sorted(expected - set(state))}, "
                                   f"unexpected {sorted(set(state) - expected)}")
            save_state_dict(state, folder, **self.export_spec, task=self.config.task,
                            metadata=self.task.export_metadata())
        self.barrier()

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
        self.strategy.load(folder)
        self.step = state["step"]
        self.task.load_state_dict(state["task"])
        self.strategy.load_scaler_state(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.resumed_from = folder

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        config, run = self.config, self.config.run
        logger = MetricsLogger(config.logging, self.out_dir, enabled=self.rank == 0, total_steps=self.total_steps,
                               start_step=self.step, full_config=config.to_dict(), resume=self.step > 0)
        logger.write(f"tformer: task={config.task} strategy={self.strategy.name} precision={self.precision} "
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
                if self.draw_plots is not None and config.logging.visualize and self.rank == 0:
                    logger.images(self.step, self.draw_plots(self.out_dir))
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
