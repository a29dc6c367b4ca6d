"""The model part of a task: which config class and module class it builds, and the values the
data fixes (vocabulary size, sequence length, number of labels). The task's ``model`` section
overrides those values; the resolved config is built once and cached."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tformer.schema import ConfigError

VOCAB_MULTIPLE = 64


def round_vocab(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``size`` rounded up to a multiple of 64: matmul-friendly; the extra rows are never used."""
    return -(-size // multiple) * multiple


class ModelBuilder:
    """Builds a task's model from ``config_class`` (a model config with ``from_dict`` /
    ``to_dict``) and ``model_class``.

    ``values()`` returns the full ``model`` section: the data's values updated with the user's
    keys (called once, after the task loaded its data). ``check(config)`` raises
    :class:`ConfigError` when the resolved config does not fit the data.
    """

    def __init__(self, config_class, model_class: Callable[..., torch.nn.Module], values: Callable[[], dict],
                 check: Callable[[object], None] | None = None):
        self.config_class, self.model_class = config_class, model_class
        self._values, self._check, self._config = values, check, None

    def config(self):
        """The resolved model config (built and checked on first use, then cached)."""
        if self._config is None:
            config = self.config_class.from_dict(self._values())
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
