"""``tformer/train.py``'s command line: arguments in, :class:`~tformer.training.trainer.Trainer` out.

    python tformer/train.py                                   # configs/ds.json: Tiny Shakespeare char LM
    deepspeed tformer/train.py --config ds.json               # same job through the DeepSpeed launcher
    deepspeed --num_gpus 2 tformer/train.py --config zero2.json
    torchrun --nproc_per_node 2 tformer/train.py --config fsdp2.json
    python tformer/train.py --config enwik8.json --set run.steps=100 --set data.path=/data/enwik8.zip
    python tformer/train.py --config ds.json --resume         # continue the latest checkpoint in run.out_dir

``--config`` takes a path, or a bare name (``ds.json``, ``zero3``) looked up in the
repository's ``configs/`` (or the copy inside the installed package) when no such file exists.
"""

from __future__ import annotations

import argparse
import os

from tformer.training.config import ConfigError, load_config
from tformer.training.trainer import Trainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ds.json",
                        help="config file (JSON or YAML): a path, or a bare name such as ds.json or zero2 resolved "
                             "against configs/ in the repository or the installed package (default: ds.json)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (JSON-parsed), e.g. --set run.steps=100 "
                             "--set deepspeed.zero_optimization.stage=3; repeatable")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the latest complete checkpoint in run.out_dir (or this checkpoint folder)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    try:  # a task checks what needs its data (e.g. the multitask heads' sources) when it is built
        trainer = Trainer(config, resume=args.resume)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        return trainer.fit()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
