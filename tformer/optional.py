"""Optional dependencies, imported where they are used.

``pip install tformer`` brings torch and NumPy only; the rest comes with an extra
(``pip install 'tformer[speech]'``). When one is missing, :func:`require` raises an ImportError
that says what needed it and which extra installs it, instead of a bare ModuleNotFoundError from
deep inside a training run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Import name -> (the distribution on PyPI, the tformer extra that installs it): setup.py's extras.
OPTIONAL: dict[str, tuple[str, str]] = {
    "deepspeed": ("deepspeed", "train"),
    "yaml": ("PyYAML", "train"),
    "tqdm": ("tqdm", "train"),
    "safetensors": ("safetensors", "train"),
    "tokenizers": ("tokenizers", "train"),
    "wandb": ("wandb", "train"),
    "matplotlib": ("matplotlib", "viz"),
    "sklearn": ("scikit-learn", "viz"),
    "librosa": ("librosa", "speech"),
    "soundfile": ("soundfile", "speech"),
    "jiwer": ("jiwer", "speech"),
    "seqeval": ("seqeval", "multitask"),
    "scipy": ("scipy", "multitask"),
    "transformers": ("transformers", "transformers"),
}


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, needed_by: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingDependency` naming ``needed_by``
    (what the user asked for) and the pip extra that installs the package."""
    top = module.split(".")[0]
    if top not in OPTIONAL:
        raise ValueError(f"require: {top!r} is not one of tformer's optional dependencies ({sorted(OPTIONAL)})")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        # Only the package itself missing is ours to explain; a broken install of it (one of *its*
        # imports failing) keeps its own error.
        if error.name is not None and error.name.split(".")[0] != top:
            raise
        distribution, extra = OPTIONAL[top]
        raise MissingDependency(f"{needed_by} needs {distribution}, which is not installed: "
                                f"pip install 'tformer[{extra}]' (or pip install {distribution})") from error
