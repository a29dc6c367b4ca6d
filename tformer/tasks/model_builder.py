"""The model part of a task: the config's ``model`` section (the model's config dataclass), the
module class it builds, and the values the data fixes (vocabulary size, sequence length, number
of labels). Keys the ``model`` section sets override those values; the resolved config is built
once and cached."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from tformer.schema import ConfigError

VOCAB_MULTIPLE = 64


def round_vocab(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``size`` rounded up to a multiple of 64: matmul-friendly; the extra rows are never used."""
    return -(-size // multiple) * multiple


class ModelBuilder:
    """Builds a task's model of ``model_class`` from ``section``, the config's ``model`` section
    (already the model's config dataclass).

    ``data_values()`` returns the values to replace in ``section``, called once after the task
    loaded its data: the data's values for the keys the file left unset (:func:`not_given`: the
    user's keys win).
    ``check(config)`` raises :class:`ConfigError` when the resolved config does not fit the data.
    """

    def __init__(self, section, model_class: Callable[..., torch.nn.Module], data_values: Callable[[], dict],
                 check: Callable[[object], None] | None = None):
        self.section, self.model_class = section, model_class
        self._data_values, self._check, self._config = data_values, check, None

    def config(self):
        """The resolved model config (built and checked on first use, then cached)."""
        if self._config is None:
            config = dataclasses.replace(self.section, **self._data_values())
            if self._check is not None:
                self._check(config)
            self._config = config
        return self._config

    def config_dict(self) -> dict:
        return self.config().to_dict()

    def build(self) -> torch.nn.Module:
        return self.model_class(self.config())


def check_at_least(name: str, got: int, needed: int, what: str) -> None:
    """Raise :class:`ConfigError` when ``model.<name>`` = ``got`` is below ``needed`` (``what`` says why)."""
    if got < needed:
        raise ConfigError(f"config: model.{name}={got} {what} ({needed})")
