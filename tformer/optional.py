"""Optional dependencies, imported where they are used.

``pip install tformer`` brings torch and NumPy only; the rest comes with an extra
(``pip install 'tformer[speech]'``). When one is missing, :func:`require` raises an ImportError
that says what needed it and which extra installs it, instead of a bare ModuleNotFoundError from
deep inside a training run.
"""

from __future__ import annotations

import importlib
import sys
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
    "seqscore": ("seqscore", "multitask"),
    "scipy": ("scipy", "multitask"),
    "transformers": ("transformers", "transformers"),
}


def import_failure(error: ImportError) -> str:
    """What failed, in one line, for a message that wraps ``error``: its type and text, and where
    the module it names was loaded from when that module did load. A package of the same name
    shadowing the installed one (a folder on sys.path, an old copy) then reads as what it is:
    ``ImportError: cannot import name 'X' from 'kernels' (/repo/kernels/__init__.py)``."""
    what = f"{type(error).__name__}: {error}"
    module = sys.modules.get(error.name or "")
    location = getattr(module, "__file__", None) or list(getattr(module, "__path__", []) or [])
    if location and str(location) not in what:
        what += f" ({error.name!r} was imported from {location}: another package of that name may hide the installed one)"
    return what


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
                                f"pip install 'tformer[{extra}]' (or pip install {distribution}) "
                                f"[{import_failure(error)}]") from error
