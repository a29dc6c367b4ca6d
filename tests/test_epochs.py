"""``run.epochs`` as the alternative to ``run.steps``: exactly one is set, tasks convert epochs
to steps, and the loop, progress bar and schedule follow the converted count."""

import math
import types

import pytest

from tformer.schema import ConfigError
from tformer.tasks.base import Task
from tformer.tasks.classify import ClassificationTask
from tformer.training.config import DEFAULT_STEPS, load_config
from tformer.training.optim import learning_rate
from tformer.training.run_length import planned_steps
from tformer.training import trainer as trainer_module
from tformer.training.trainer import Trainer

from train_helpers import tiny_config


def test_steps_and_epochs_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match=r"exactly one of run.steps and run.epochs, got steps=6 and epochs=2"):
        load_config(tiny_config(tmp_path, run={"epochs": 2}))
    with pytest.raises(ConfigError, match=r"run.epochs must be > 0, got 0"):
        load_config(tiny_config(tmp_path, run={"steps": None, "epochs": 0}))
    assert load_config({}).run.steps == DEFAULT_STEPS
    config = load_config(tiny_config(tmp_path), ["run.steps=null", "run.epochs=1.5"])
    assert (config.run.steps, config.run.epochs) == (None, 1.5)


def test_lm_epochs_become_steps_and_the_run_and_schedule_follow(tmp_path, monkeypatch):
    config = load_config(tiny_config(tmp_path, run={"steps": None, "epochs": 0.1}))
    bar_totals = []
    real_logger = trainer_module.MetricsLogger

    def recording_logger(*args, **kwargs):
        bar_totals.append(kwargs["total_steps"])
        return real_logger(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "MetricsLogger", recording_logger)
    trainer = Trainer(config)
    windows = len(trainer.task.splits["train"]) / config.data.seq_len
    per_epoch = math.ceil(windows / config.training.micro_batch_size)
    assert trainer.task.steps_per_epoch() == per_epoch
    assert trainer.total_steps == math.ceil(0.1 * per_epoch)
    history = trainer.fit()
    assert len(history) == trainer.total_steps and bar_totals == [trainer.total_steps]  # the progress bar's total
    # The cosine reaches min_lr exactly at the converted end of the run.
    assert learning_rate(trainer.total_steps, config, trainer.total_steps) == config.optimizer.min_lr
    assert learning_rate(trainer.total_steps - 1, config, trainer.total_steps) > config.optimizer.min_lr


def test_classify_counts_its_batches_per_rank_and_accumulation():
    task = ClassificationTask.__new__(ClassificationTask)
    task.train_batches = types.SimpleNamespace(batches=lambda epoch: list(range(101)))
    task.world_size = 2
    task.config = types.SimpleNamespace(training=types.SimpleNamespace(grad_accum_steps=3))
    assert task.steps_per_epoch() == math.ceil(50 / 3)  # 100 usable batches, 50 per rank, 3 per step


def test_a_task_that_cannot_count_epochs_says_so():
    task = Task.__new__(Task)
    task.name = "stream"
    with pytest.raises(ConfigError, match=r"run.epochs: task 'stream' cannot count .* set run.steps instead"):
        planned_steps(types.SimpleNamespace(epochs=1.0, steps=None), task)
