"""``tformer train`` and ``tformer/train.py``'s command line: arguments in,
:class:`~tformer.training.trainer.Trainer` out.

    python tformer/train.py                                   # configs/ds.json: Tiny Shakespeare char LM
    deepspeed tformer/train.py --config ds.json               # same job through the DeepSpeed launcher
    deepspeed --num_gpus 2 tformer/train.py --config zero2.json
    torchrun --nproc_per_node 2 tformer/train.py --config fsdp2.json
    python tformer/train.py --config enwik8.json --set run.steps=100 --set data.path=/data/enwik8.zip
    python tformer/train.py --config ds.json --resume         # continue the latest checkpoint in run.out_dir
    python tformer/train.py --config ds.json --overwrite      # start afresh, deleting run.out_dir's earlier run

``--config`` takes a path, or a bare name (``ds.json``, ``zero3``) looked up in the
repository's ``configs/`` (or the copy inside the installed package) when no such file exists.
"""

from __future__ import annotations

import argparse
import os

from tformer.training.config import load_config
from tformer.training.trainer import Trainer


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """``prog`` None: the script's own name (``train.py`` under ``deepspeed tformer/train.py``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ds.json",
                        help="config file (JSON or YAML): a path, or a bare name such as ds.json or zero2 resolved "
                             "against configs/ in the repository or the installed package (default: ds.json)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (JSON-parsed), e.g. --set run.steps=100 "
                             "--set deepspeed.zero_optimization.stage=3; repeatable")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT|strict",
                        help="continue from the newest checkpoint in run.out_dir whose files verify (a damaged newer "
                             "one is skipped with a warning); --resume=strict refuses a damaged one instead; or "
                             "continue from this checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run.out_dir that holds another run: delete its checkpoints, "
                             "metrics.jsonl, export and plots first (without this, such a folder is refused)")
    parser.add_argument("--visualize", action="store_true",
                        help="draw training curves and gradient flow into run.out_dir/plots at every evaluation "
                             "(and log them to W&B as images when W&B is on); same as --set logging.visualize=true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None, *, prog: str | None = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def main(argv=None, *, prog: str | None = None) -> list[dict]:
    """Train; user errors raise (``ConfigError``, ``UsageError``, ``OSError``): run it through
    :func:`tformer.cli.errors.run_cli` for one ``error: ...`` line and exit status 2."""
    args = parse_args(argv, prog=prog)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    config = load_config(args.config, args.set + (["logging.visualize=true"] if args.visualize else []))
    draw_plots = None
    if config.logging.visualize:
        from tformer.visualization.run_plots import write_run_plots as draw_plots
    trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite, draw_plots=draw_plots)
    try:
        return trainer.fit()
    finally:
        trainer.close()

