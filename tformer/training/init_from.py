"""Start a run from another run's weights (``training.init_from``): fine-tuning a classifier
from masked-LM self-pretraining (tformer.tasks.mlm), or any model from a compatible export.

The source is what tformer/train.py writes: ``<out_dir>/export/`` at the end of a run, or the
``export/`` inside each checkpoint (``<out_dir>/checkpoints/step_N/``), each holding
``model.safetensors`` and ``config.json``. Every parameter and persistent buffer of the new
model outside its task head (the top-level module named ``head``) must be in the file with
the same shape; the head keeps its fresh initialisation. The model configs must agree on
every field that shapes the trunk, and the tokenizers (when both runs record one) must be
identical, since equal shapes with different token ids would load without error and mean
nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tformer.models.pretrained import CONFIG_NAME, WEIGHTS_NAME, find_export, verify_export
from tformer.nn.transformer_block import rename_old_keys
from tformer.optional import require

HEAD = "head"  # the task-specific output module, left freshly initialised
# Model config fields that change what the trunk's weights mean, even where shapes would agree.
TRUNK_FIELDS = ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "positional",
                "norm", "bias", "pooling")
# Export metadata that must be identical between the runs (the same ids for the same text).
VOCABULARY_KEYS = ("tokenizer", "vocab")


def resolve_init_source(path: str | os.PathLike) -> Path:
    """The export folder for ``training.init_from``: the path itself when it holds
    ``model.safetensors``, else its ``export/``, else the ``export/`` of its latest complete
    checkpoint (a pretraining run stopped before its end)."""
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"training.init_from = {str(path)!r} does not exist; expected the out_dir of a "
                                f"finished pretraining run (e.g. python tformer/train.py --config imdb_mlm.json), its "
                                f"export/ folder or one of its checkpoints; set training.init_from=null to train from "
                                f"scratch")
    try:
        return find_export(given, argument="training.init_from", need_config=False)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; did the pretraining run finish (or write a checkpoint)?") from error


def load_trunk(model: torch.nn.Module, source: Path, *, metadata: dict | None = None) -> str:
    """Copy every tensor of ``model`` outside ``head`` from ``source/model.safetensors`` (bit
    for bit); returns a one-line summary of what was loaded and what was left fresh.

    ``metadata``: this run's export metadata, checked against the source's for the vocabulary.
    Raises ``ValueError`` naming the key, both shapes and the file on any mismatch.
    """
    load_file = require("safetensors.torch", "training.init_from").load_file

    weights_file = source / WEIGHTS_NAME
    problems = verify_export(source)  # the SHA-256 recorded at export time, when there is one
    if problems:
        raise ValueError(f"init_from: {source} is damaged: {'; '.join(problems)}")
    _check_source_config(model, source / CONFIG_NAME, metadata or {})
    stored = rename_old_keys(model, load_file(str(weights_file)))  # exports from before a module rename
    state = model.state_dict()
    trunk, head = [], []
    for names in _alias_groups(state):
        if names[0].split(".")[0] == HEAD:
            head.extend(names)
            continue
        present = [name for name in names if name in stored]
        if not present:
            raise ValueError(f"init_from: {weights_file} has no tensor {names[0]!r} {tuple(state[names[0]].shape)}, "
                             f"which this {type(model).__name__} needs (only '{HEAD}.*' may be missing)")
        tensor = stored[present[0]]
        if tuple(tensor.shape) != tuple(state[names[0]].shape):
            raise ValueError(f"init_from: {names[0]!r} has shape {tuple(tensor.shape)} in {weights_file} but "
                             f"{tuple(state[names[0]].shape)} in this {type(model).__name__}")
        trunk.append((names, tensor))
    missing, unexpected = model.load_state_dict({names[0]: tensor for names, tensor in trunk}, strict=False)
    if unexpected or not set(missing) <= set(head) | _aliases(model):
        raise RuntimeError(f"init_from: loading {weights_file} left {sorted(set(missing) - set(head))} unset and "
                           f"{unexpected} unknown")
    used = {name for names, _ in trunk for name in names}
    unused = sorted(name for name in stored if name not in used)
    count = sum(tensor.numel() for _, tensor in trunk)
    return (f"init_from: {len(trunk)} tensors ({count / 1e6:.2f}M values) from {weights_file}; fresh: "
            f"{sorted(head) or 'nothing'}; not used from the file: {unused or 'nothing'}")


def _check_source_config(model: torch.nn.Module, config_file: Path, metadata: dict) -> None:
    if not config_file.is_file():
        return  # weights alone: the per-tensor shape checks still run
    source = json.loads(config_file.read_text())
    # The vocabulary first: with another tokenizer, matching shapes would still be meaningless.
    source_metadata = source.get("metadata", {})
    for key in VOCABULARY_KEYS:
        if key in source_metadata and key in metadata and source_metadata[key] != metadata[key]:
            raise ValueError(f"init_from: the {key} recorded in {config_file} differs from this run's; the token ids "
                             f"would mean different things (use the same data section: path, bpe_*, val_size, "
                             f"split_seed, train_limit, in both configs)")
    theirs, ours = source.get("model", {}), getattr(getattr(model, "config", None), "to_dict", dict)()
    differing = [f"{name}: {theirs[name]!r} there, {ours[name]!r} here" for name in TRUNK_FIELDS
                 if name in theirs and name in ours and theirs[name] != ours[name]]
    if differing:
        raise ValueError(f"init_from: the model in {config_file} differs from this one in {'; '.join(differing)}; "
                         f"use the same model section in both configs")


def _alias_groups(state: dict) -> list[list[str]]:
    """State dict keys grouped by the tensor they name (a tied weight has several names; an
    export stores it once under one of them)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.numel() else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _aliases(model: torch.nn.Module) -> set[str]:
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}
