"""One run's outputs per ``run.out_dir``: a new run never writes over another run's.

A run started without ``--resume`` into a folder that already holds a run's checkpoints,
metrics or export would truncate that run's ``metrics.jsonl``, overwrite its export and mix its
own checkpoints with the old ones (and a later ``--resume`` would continue the wrong run). It is
refused instead, with the two ways forward: ``--resume`` to continue that run, or a new
``run.out_dir`` (or ``--overwrite``, which deletes the earlier outputs first).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tformer.schema import UsageError

# What a run writes into its out_dir (plots are redrawn from metrics.jsonl, so they go too).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "export", "plots")


class OutDirHoldsARun(UsageError):
    """run.out_dir holds another run's outputs and neither --resume nor --overwrite was given."""


def check_is_folder(out_dir: Path) -> None:
    """A path that exists but is not a folder (a file, a broken link) cannot be a run folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"run.out_dir {out_dir} is a file, not a folder; set run.out_dir to a folder "
                         f"(--set run.out_dir=...)")


def previous_outputs(out_dir: Path) -> list[str]:
    """The earlier run's outputs in ``out_dir`` (names from :data:`RUN_OUTPUTS`); [] when none."""
    found = []
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_file() and path.stat().st_size > 0:
            found.append(name)
        elif path.is_dir() and any(path.iterdir()):
            found.append(f"{name}/")
    return found


def claim(out_dir: Path, *, resume, overwrite: bool) -> None:
    """Refuse (:class:`OutDirHoldsARun`) or, with ``overwrite``, delete an earlier run's outputs
    in ``out_dir``; a resumed run keeps them. Called by rank 0 while it holds the run lock."""
    if resume:
        return
    found = previous_outputs(out_dir)
    if not found:
        return
    if overwrite:
        for name in RUN_OUTPUTS:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return
    raise OutDirHoldsARun(f"run.out_dir {out_dir} holds another run ({', '.join(found)}); continue it with --resume, "
                          f"or start afresh in a new run.out_dir or with --overwrite (deletes those outputs)")
