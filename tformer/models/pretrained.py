"""Export a model as ``model.safetensors`` + ``config.json``, and load it back.

``config.json`` holds ``{"task", "model_class", "model": <model config>, "metadata": {...}}``;
``metadata`` is the task's (for the LM: the vocabulary); ``weights_sha256`` is the SHA-256 of
``model.safetensors``, checked on load, so a weights file altered after the export is an error
instead of a silently wrong model (exports without it load unchecked). Written atomically: a temporary
folder renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tformer.optional import require

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# model class name -> class; filled by PretrainedMixin subclasses as they are defined, so this
# module never imports the models (they import it).
MODEL_CLASSES: dict[str, type] = {}


def save_pretrained(model: torch.nn.Module, out_dir: str | os.PathLike, *, task: str = "lm",
                    metadata: dict | None = None) -> Path:
    """Write ``model`` (tied weights stored once) and its config to ``out_dir``."""
    return save_state_dict(model.state_dict(), out_dir, model_class=type(model).__name__,
                           model_config=model.config.to_dict(), tied=tied_groups(model), task=task, metadata=metadata)


def save_state_dict(state: dict[str, torch.Tensor], out_dir: str | os.PathLike, *, model_class: str,
                    model_config: dict, tied: list[list[str]] = (), task: str = "lm",
                    metadata: dict | None = None) -> Path:
    """Write an export from a state dict and the model's config, without a model.

    Training exports this way: it has the trained weights (gathered from shards or ZeRO
    partitions) and the config, and building a model again only to hold them would cost a fresh
    initialization (for a Hugging Face trunk, reading its weights from disk again).

    Args:
        state: the model's state dict under its plain names, every tensor on the CPU.
        model_class: the model class's name (:data:`MODEL_CLASSES`), read back by :func:`load_pretrained`.
        model_config: ``model.config.to_dict()``.
        tied: groups of names that share one tensor (:func:`tied_groups`); each is stored once, under
            its first name in sorted order, with the others recorded in the file's metadata, as
            safetensors' ``save_model`` does, so ``load_model`` restores the ties.
    """
    save_file = require("safetensors.torch", "save_pretrained").save_file
    state = dict(state)
    aliases = {}
    for group in tied:
        present = sorted(name for name in group if name in state)
        for name in present[1:]:
            aliases[name] = present[0]
            del state[name]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(scratch / WEIGHTS_NAME),
                  metadata=aliases or None)
        config = {"task": task, "model_class": model_class, "model": model_config,
                  "metadata": metadata or {}, "weights_sha256": _sha256(scratch / WEIGHTS_NAME)}
        (scratch / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(scratch, out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return out_dir


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied weights), one list per shared tensor."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [sorted(group) for group in names.values() if len(group) > 1]


# Training writes this file into a checkpoint folder last (tformer.training.checkpoint.COMPLETE):
# an export inside a checkpoint without it may be half-written.
CHECKPOINT_COMPLETE = "COMPLETE"


def find_export(path: str | os.PathLike, *, argument: str = "--checkpoint", need_config: bool = True) -> Path:
    """The export folder behind what a user may pass: the export itself, a run or checkpoint
    folder holding ``export/``, or a run folder whose newest complete checkpoint holds one.

    Every command and ``training.init_from`` find exports here, so they accept the same folders.

    Args:
        path: the folder the user named.
        argument: how the user named it (``--checkpoint``, ``training.init_from``), for the error.
        need_config: also require ``config.json`` (``init_from`` accepts bare weights).

    Raises:
        FileNotFoundError: naming ``argument``, the value and every folder looked in.
    """
    folder = Path(path).expanduser()
    checkpoints = folder / "checkpoints"
    complete = [c for c in checkpoints.glob("step_*") if (c / CHECKPOINT_COMPLETE).is_file()] \
        if checkpoints.is_dir() else []
    newest_first = sorted(complete, key=lambda c: int(c.name.split("_", 1)[1]) if c.name[5:].isdigit() else -1,
                          reverse=True)
    candidates = [folder, folder / "export"] + [c / "export" for c in newest_first]
    needed = (CONFIG_NAME, WEIGHTS_NAME) if need_config else (WEIGHTS_NAME,)
    for candidate in candidates:
        if all((candidate / name).is_file() for name in needed):
            return candidate
    raise FileNotFoundError(f"argument {argument!r} = {str(folder)!r} holds no {' + '.join(needed)} (looked in "
                            f"{[str(c) for c in candidates]}); expected an export folder, or a run or checkpoint "
                            f"folder holding export/")


def load_pretrained(path: str | os.PathLike, *, device="cpu"):
    """``(model, metadata)`` from an export folder; the model is in eval mode."""
    load_model = require("safetensors.torch", "load_pretrained").load_model
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"load_pretrained: argument 'path' must hold {CONFIG_NAME} and {WEIGHTS_NAME}, "
                                f"got {str(path)!r}")
    problems = verify_export(path)
    if problems:
        raise ValueError(f"load_pretrained: export {str(path)!r} is damaged: {'; '.join(problems)}")
    config = json.loads((path / CONFIG_NAME).read_text())
    classes = MODEL_CLASSES
    if config.get("model_class") not in classes:
        raise ValueError(f"load_pretrained: {path / CONFIG_NAME} names model_class {config.get('model_class')!r}, "
                         f"expected one of {sorted(classes)}")
    model_class = classes[config["model_class"]]
    model = model_class(model_class.config_class.from_dict(config["model"]))
    load_model(model, str(path / WEIGHTS_NAME), device=str(device))
    return model.to(device).eval(), config.get("metadata", {})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_export(path: str | os.PathLike) -> list[str]:
    """Problems with an export folder (empty: fine): an unreadable config.json, or weights that
    do not match the SHA-256 recorded in it (none recorded, or no config.json beside bare
    weights as init_from accepts: not checked)."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        return []
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        return [f"{path / CONFIG_NAME} is unreadable ({type(error).__name__}: {error})"]
    expected = config.get("weights_sha256") if isinstance(config, dict) else None
    if expected is None:
        return []
    if not (path / WEIGHTS_NAME).is_file():
        return [f"{path / WEIGHTS_NAME} is missing"]
    if _sha256(path / WEIGHTS_NAME) != expected:
        return [f"{path / WEIGHTS_NAME} does not match the SHA-256 recorded in {CONFIG_NAME} (altered or truncated)"]
    return []


class PretrainedMixin:
    """Adds ``Model.from_pretrained(dir)`` to a model class and registers it for
    :func:`load_pretrained`; the class names its config dataclass as ``config_class``."""

    config_class = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MODEL_CLASSES[cls.__name__] = cls

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device="cpu"):
        model, _ = load_pretrained(path, device=device)
        if not isinstance(model, cls):
            raise ValueError(f"{cls.__name__}.from_pretrained: {path} holds a {type(model).__name__}")
        return model
