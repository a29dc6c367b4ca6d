"""Checking checkpoints before they are loaded, and choosing the one ``--resume`` continues.

A checkpoint's ``COMPLETE`` marker lists the SHA-256 and size of every file the save wrote
(model and optimizer shards of any layout: ``dcp/`` for one process and FSDP2, ``deepspeed/``
for DeepSpeed, ``trainer_rank<r>.pt``, ``export/``). :func:`verify_checkpoint` re-hashes them:
a file that is missing, truncated or altered makes the checkpoint damaged. ``--resume``
(:func:`choose_resume_checkpoint`) takes the newest checkpoint that verifies and warns about
each newer damaged one; ``--resume=strict`` refuses instead.

    tformer checkpoint verify runs/ds      # a run folder, its checkpoints/ or one checkpoint

prints one line per checkpoint and exits 1 when any is damaged.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from tformer.schema import UsageError
from tformer.training.checkpoint import COMPLETE, complete_checkpoints, sha256_file


class CheckpointDamaged(UsageError):
    """A checkpoint whose files do not match its COMPLETE marker."""


def verify_checkpoint(folder: str | Path) -> list[str]:
    """The problems found in checkpoint ``folder`` (empty: it verifies). A marker from before
    hashes were recorded holds no ``files``: reported as one problem, since nothing can be checked."""
    folder = Path(folder)
    marker = folder / COMPLETE
    if not marker.is_file():
        return [f"{marker} is missing: the save never finished"]
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return [f"{marker} is unreadable or records no file hashes ({type(error).__name__}: {error})"]
    problems = []
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{path} does not match its recorded SHA-256 (altered after the save)")
    return problems


def choose_resume_checkpoint(checkpoints_dir: str | Path, *, strict: bool = False) -> Path:
    """The newest checkpoint in ``checkpoints_dir`` that verifies. Each newer damaged one is
    skipped with a warning naming the damaged file; with ``strict`` the first damage raises."""
    candidates = complete_checkpoints(checkpoints_dir)
    if not candidates:
        raise UsageError(f"--resume: no complete checkpoint in {checkpoints_dir}")
    for folder in candidates:
        problems = verify_checkpoint(folder)
        if not problems:
            return folder
        if strict:
            raise CheckpointDamaged(f"--resume=strict: checkpoint {folder} is damaged: {'; '.join(problems)}. "
                                    f"Use --resume to fall back to the newest checkpoint that verifies")
        warnings.warn(f"--resume: skipping damaged checkpoint {folder}: {'; '.join(problems)}", stacklevel=2)
    raise CheckpointDamaged(f"--resume: every checkpoint in {checkpoints_dir} is damaged "
                            f"({', '.join(p.name for p in candidates)}); see `tformer checkpoint verify`")


def check_chosen_checkpoint(folder: str | Path) -> Path:
    """A checkpoint folder named explicitly (``--resume PATH``) must verify; there is no fallback."""
    problems = verify_checkpoint(folder)
    if problems:
        raise CheckpointDamaged(f"--resume: checkpoint {folder} is damaged: {'; '.join(problems)}")
    return Path(folder)


def checkpoint_folders(path: Path) -> list[Path]:
    """The checkpoints under a run folder, its ``checkpoints/`` or one checkpoint folder."""
    if (path / COMPLETE).is_file():
        return [path]
    for folder in (path / "checkpoints", path):
        found = complete_checkpoints(folder)
        if found:
            return found
    return []


def checkpoint_step(folder: Path) -> int:
    return int(re.search(r"\d+", folder.name).group(0))


def incomplete_checkpoints(path: Path) -> list[Path]:
    """Step folders under a run folder (or its ``checkpoints/``) without a COMPLETE marker, and
    half-written ``.step_*.tmp`` folders: saves that were killed, which --resume skips."""
    for folder in (path / "checkpoints", path):
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.is_dir() and not (p / COMPLETE).is_file()
                           and (re.match(r"^step_\d+$", p.name) or re.match(r"^\.step_\d+\.tmp$", p.name)))
            if found:
                return found
    return []
