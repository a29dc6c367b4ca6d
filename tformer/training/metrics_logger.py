"""Where metrics go: a tqdm bar on rank 0, a JSONL file in the run folder, Weights & Biases
(offline unless configured online)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from tformer.optional import require
from tformer.training.config import LoggingConfig


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps ``<= last_step`` (the checkpoint a run resumes from).

    The steps a killed run logged after its last checkpoint are run again on resume; they
    are dropped here, so ``metrics.jsonl`` holds each step once, from the run that continued.
    A line cut short by the kill is dropped too. Rewritten atomically (temporary file, rename).
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line + "\n")
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text("".join(kept))
    os.replace(scratch, path)


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger that does nothing."""

    def __init__(self, config: LoggingConfig, out_dir: str | os.PathLike, *, enabled: bool, total_steps: int,
                 start_step: int = 0, full_config: dict | None = None, resume: bool = False):
        self.enabled = enabled
        self.config = config
        self.bar = None
        self.jsonl = None
        self.wandb_run = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if config.jsonl:
            if resume:
                truncate_metrics(out_dir / "metrics.jsonl", start_step)
            # Appended, never truncated: a fresh run starts in a folder without one (the trainer
            # refuses another run's folder), a resumed one cut it back to its checkpoint above.
            self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if config.progress_bar:
            tqdm = require("tqdm", "logging.progress_bar").tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if config.wandb:
            os.environ.setdefault("WANDB_MODE", config.wandb_mode)
            wandb = require("wandb", "logging.wandb")
            self.wandb_run = wandb.init(project=config.wandb_project, name=config.wandb_run_name, dir=str(out_dir),
                                        config=full_config, resume="allow" if resume else None)
        self.started = time.time()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self.started, 3),
                  **{k: _jsonable(v) for k, v in metrics.items()}}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def progress(self, steps_done: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.update(steps_done)
            self.bar.set_postfix(postfix, refresh=False)

    def text(self, step: int, key: str, texts: list[str]) -> None:
        """Samples: printed, in the JSONL file and in W&B (as a table)."""
        if not self.enabled:
            return
        self.write(f"--- {key} at step {step} ---\n" + "\n---\n".join(texts))
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, key: texts}) + "\n")
            self.jsonl.flush()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=["step", "text"], data=[[step, t] for t in texts])}, step=step)

    def images(self, step: int, paths: dict) -> None:
        """PNG files already written (``{name: path}``), logged to W&B as images."""
        if self.enabled and self.wandb_run is not None and paths:
            import wandb

            self.wandb_run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in paths.items()}, step=step)

    def warn(self, message: str) -> None:
        """A warning: printed like :meth:`write` and sent to the ``tformer`` logger."""
        if not self.enabled:
            return
        logging.getLogger("tformer").warning(message)
        self.write(f"warning: {message}")

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
