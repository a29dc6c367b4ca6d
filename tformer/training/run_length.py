"""How many optimizer steps a run takes: ``run.steps``, or ``run.epochs`` passes over the
training data converted with the task's :meth:`~tformer.tasks.base.Task.steps_per_epoch`."""

from __future__ import annotations

import math

from tformer.training.config import RunConfig


def planned_steps(run: RunConfig, task) -> int:
    """The run's length in optimizer steps (at least 1)."""
    if run.epochs is None:
        return run.steps
    return max(1, math.ceil(run.epochs * task.steps_per_epoch()))
