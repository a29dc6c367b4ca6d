"""Runs several training configs one after another in one set of ranks (started by torchrun or
the DeepSpeed launcher), so a test pays the launch and import cost once for many tasks.

    python -m torch.distributed.run --nproc_per_node 2 two_rank_driver.py plan.json

``plan.json`` is a list of configs; each runs to its end (training, checkpoints, export and the
evaluations) under ``tformer.training.trainer.Trainer``.
"""

import json
import sys
import time
from pathlib import Path

# The repository goes last on the path: its top-level ``kernels/`` folder must not shadow the
# installed Hugging Face ``kernels`` package that transformers imports.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from tformer.training.config import load_config  # noqa: E402
from tformer.training.trainer import Trainer  # noqa: E402


def main(plan_path: str) -> None:
    trainer = None
    for config in json.loads(Path(plan_path).read_text()):
        started = time.time()
        trainer = Trainer(load_config(config))
        trainer.fit()
        print(f"two_rank_driver: finished {config['task']} in {time.time() - started:.1f} s", flush=True)
    if trainer is not None:
        trainer.close()


if __name__ == "__main__":
    # The DeepSpeed launcher adds --local_rank=N; the plan is the one other argument.
    main(next(arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")))
