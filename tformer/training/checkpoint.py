"""Training checkpoints, written atomically, resumed exactly.

Layout of ``<out_dir>/checkpoints/step_<N>/``::

    dcp/                  model + optimizer, torch.distributed.checkpoint (single process, FSDP2)
    deepspeed/            engine.save_checkpoint (model, ZeRO optimizer partitions, loss scaler)
    trainer_rank<r>.pt    step, data position, loss scaler (non-DeepSpeed fp16), every RNG state
    export/               model.safetensors + config.json (what tformer sample reads)
    COMPLETE              written last: JSON with the step and the SHA-256 and size of every
                          other file (``files``), checked by :mod:`tformer.training.checkpoint_verify`

Atomicity: every rank writes into ``.step_<N>.tmp``; after a barrier rank 0 writes
``COMPLETE`` and renames the folder into place (``os.replace``). A killed run leaves at most a
``.tmp`` folder, which :func:`latest_checkpoint` ignores and the next save removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE).is_file()]
    return max(found)[1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriter:
    """Begins a checkpoint folder, hands out paths, commits it atomically."""

    def __init__(self, checkpoints_dir: str | os.PathLike, step: int, *, rank: int, barrier):
        self.final = Path(checkpoints_dir) / step_dir_name(step)
        self.tmp = self.final.parent / f".{self.final.name}.tmp"
        self.rank = rank
        self.barrier = barrier
        if rank == 0:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        barrier()

    def commit(self, info: dict, keep: int) -> Path:
        self.barrier()
        if self.rank == 0:
            # Every rank's files are in place (barrier above): hash them all, so a file damaged
            # after the commit is caught before it is loaded.
            (self.tmp / COMPLETE).write_text(json.dumps({**info, "files": file_digests(self.tmp)}))
            if self.final.exists():
                remove_checkpoint(self.final)
            os.replace(self.tmp, self.final)
            prune(self.final.parent, keep, written=self.final)
        self.barrier()
        return self.final


    def abandon(self) -> None:
        """Remove the half-written folder of a failed save (rank 0); the previous checkpoints stay."""
        if self.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: Path) -> dict[str, dict]:
    """``{relative path: {"sha256", "bytes"}}`` for every file under ``folder`` except COMPLETE."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != COMPLETE}


def complete_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Folders with a COMPLETE marker, newest (highest step) first."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE).is_file()]
    return [path for _, path in sorted(found, reverse=True)]


def prune(checkpoints_dir: Path, keep: int, written: Path | None = None) -> None:
    """Keep the ``keep`` newest complete checkpoints; remove leftovers of killed saves.

    ``written``, the checkpoint just committed, is always kept, and counts as the newest: a run
    resumed from an older checkpoint (``--resume <folder>``) writes lower steps than the
    abandoned ones after it, which it never removes (they are not older than its own)."""
    complete = sorted((int(m.group(1)), p) for p in checkpoints_dir.iterdir()
                      if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE).is_file())
    if written is not None:
        newest = int(_STEP_DIR.match(written.name).group(1))
        complete = [(step, path) for step, path in complete if step <= newest]
    for _, path in complete[:-keep] if keep > 0 else []:
        if path != written:
            remove_checkpoint(path)
    # Runs on rank 0 right after a commit, when no other save is in flight: a .tmp folder is a
    # killed save, a step folder without its marker a killed removal.
    for leftover in checkpoints_dir.iterdir():
        is_step = _STEP_DIR.match(leftover.name) and not (leftover / COMPLETE).is_file()
        if is_step or (leftover.name.startswith(".step_") and leftover.name.endswith(".tmp")):
            shutil.rmtree(leftover, ignore_errors=True)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, its COMPLETE marker first: a removal killed half-way must not
    leave a folder that still looks complete but has lost its shards."""
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def save_trainer_state(folder: Path, rank: int, state: dict) -> None:
    torch.save(state, folder / f"trainer_rank{rank}.pt")


def load_trainer_state(folder: Path, rank: int) -> dict:
    path = Path(folder) / f"trainer_rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"resume: {path} is missing; was the checkpoint written with the same number of ranks?")
    return torch.load(path, weights_only=False)


def save_model_and_optimizer(folder: Path, model, optimizer) -> None:
    """Model + optimizer with torch.distributed.checkpoint (each rank writes its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _single_process_is_intended():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / "dcp"))


def load_model_and_optimizer(folder: Path, model, optimizer) -> None:
    """Load what :func:`save_model_and_optimizer` wrote into ``model`` and ``optimizer``.

    DCP reads each tensor by its stored name, so a module's load-time key renaming (an
    encoder-decoder checkpoint from before its layers became ``TransformerBlock`` s) never runs.
    The names the checkpoint holds are read from its metadata, and each parameter whose name is
    missing there but whose former name is present is loaded under that former name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = Path(folder) / "dcp"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    former = _former_names(checkpoint, model_state)  # {today's name: stored name}
    state = {"model": _renamed(model_state, former), "optimizer": _renamed_optimizer(optimizer_state, former)}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(checkpoint))
    today = {stored: name for name, stored in former.items()}
    set_state_dict(model, optimizer, model_state_dict=_renamed(state["model"], today),
                   optim_state_dict=_renamed_optimizer(state["optimizer"], today))


def _former_names(checkpoint: Path, model_state: dict) -> dict[str, str]:
    """``{name: stored name}`` for the parameters that ``checkpoint`` (a DCP folder) holds only
    under a former name (:func:`tformer.nn.transformer_block.old_spellings`)."""
    from torch.distributed.checkpoint import FileSystemReader

    from tformer.nn.transformer_block import old_spellings

    stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    former = {}
    for name in model_state:
        if f"model.{name}" not in stored:
            match = next((old for old in old_spellings(name) if f"model.{old}" in stored), None)
            if match is not None:
                former[name] = match
    return former


def _renamed(state: dict, names: dict[str, str]) -> dict:
    return {names.get(key, key): value for key, value in state.items()} if names else state


def _renamed_optimizer(state: dict, names: dict[str, str]) -> dict:
    """An optimizer state dict of :func:`get_state_dict` (keyed by parameter name) with ``names``
    applied to its per-parameter states and to each param group's ``params``."""
    if not names:
        return state
    groups = [{**group, "params": [names.get(p, p) for p in group["params"]]} for group in state["param_groups"]]
    return {**state, "state": _renamed(state["state"], names), "param_groups": groups}


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns when no process group exists; for a single-process run that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def full_model_state_dict(model) -> dict:
    """The unsharded model state dict on the CPU (every rank must call it under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
