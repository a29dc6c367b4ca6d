"""``tformer checkpoint verify DIR``: re-hash a run's checkpoints and export
(:mod:`tformer.training.checkpoint_verify`).

    tformer checkpoint verify runs/ds      # a run folder, its checkpoints/ or one checkpoint

prints one line per checkpoint and exits 1 when any is damaged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tformer.schema import UsageError
from tformer.training.checkpoint import COMPLETE
from tformer.training.checkpoint_verify import (checkpoint_folders, checkpoint_step, incomplete_checkpoints,
                                                verify_checkpoint)


def build_parser(prog: str = "tformer checkpoint") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="re-hash every file of a run's checkpoints (and its export)")
    verify.add_argument("path", help="run folder, its checkpoints/ folder, or one checkpoint folder")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "tformer checkpoint") -> int:
    from tformer.models.pretrained import verify_export

    args = build_parser(prog).parse_args(argv)
    path = Path(args.path).expanduser()
    if not path.is_dir():
        raise UsageError(f"verify: argument 'path' must be a run or checkpoint folder, got {str(path)!r}")
    folders = checkpoint_folders(path)
    exports = [path / "export"] if (path / "export").is_dir() else []
    incomplete = incomplete_checkpoints(path) if not (path / COMPLETE).is_file() else []
    for folder in incomplete:
        newest = bool(folders) and checkpoint_step(folder) > checkpoint_step(folders[0])
        print(f"{folder}: INCOMPLETE: no {COMPLETE} marker (a save that was killed); --resume skips it"
              + (f" and continues {folders[0].name}" if newest else ""))
    if not folders and not exports:
        raise UsageError(f"verify: {str(path)!r} holds no complete checkpoint (no step_*/{COMPLETE}) and no export/")
    damaged = 0
    for folder in folders:
        problems = verify_checkpoint(folder)
        damaged += bool(problems)
        print(f"{folder}: " + ("ok" if not problems else "DAMAGED: " + "; ".join(problems)))
    for folder in exports:
        problems = verify_export(folder)
        damaged += bool(problems)
        print(f"{folder}: " + ("ok" if not problems else "DAMAGED: " + "; ".join(problems)))
    return 1 if damaged else 0
