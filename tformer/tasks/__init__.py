"""Training tasks, found by the config's ``task`` key. Each task is a module exposing a
:class:`~tformer.tasks.base.Task` subclass named ``TASK``; modules load on first use so one
task's dependencies never load for another."""

from __future__ import annotations

import difflib
import importlib

from tformer.schema import ConfigError

TASKS = {
    "lm": "tformer.tasks.lm",
    "classify": "tformer.tasks.classify",
    "mlm": "tformer.tasks.mlm",
    "classify_hf": "tformer.tasks.classify_hf",
    "multitask": "tformer.tasks.multitask",
    "asr": "tformer.tasks.asr",
}


def get_task_class(name: str):
    """The Task class registered under ``name``."""
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config: unknown task {name!r}.{hint} Valid tasks: {sorted(TASKS)}")
    try:
        module = importlib.import_module(TASKS[name])
    except ModuleNotFoundError as error:
        if error.name == TASKS[name]:
            raise ConfigError(f"config: task {name!r} is registered but {TASKS[name]} is not installed "
                              f"({type(error).__name__}: {error})") from error
        raise
    return module.TASK
