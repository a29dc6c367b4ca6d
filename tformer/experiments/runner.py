"""Running the grid: each (distinct config, seed) trained in this process by the
:class:`~tformer.training.Trainer`, one after another; a run whose ``result.json`` exists is
skipped, so an interrupted grid resumes where it stopped."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from tformer.training.config import load_config
from tformer.training.trainer import Trainer, parameter_count
from tformer.visualization.curves import read_metrics

from .grid import Grid, Variant

RESULT_NAME = "result.json"


def run_folder(grid: Grid, variant: Variant, seed: int, config_key: str) -> Path:
    return grid.out_dir / "runs" / config_key / f"seed{seed}"


def missing_requirement(variant: Variant) -> str | None:
    """Why the variant cannot run here, or None."""
    if variant.requires == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU (the Triton interpreter on the CPU is far too slow to train)"
    return None


def read_result(folder: Path) -> dict | None:
    path = folder / RESULT_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(folder: Path, result: dict) -> None:
    """Atomically: a run counts as finished only once its whole result is on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / f".{RESULT_NAME}.tmp"
    scratch.write_text(json.dumps(result, indent=2))
    os.replace(scratch, folder / RESULT_NAME)


def train_one(grid: Grid, variant: Variant, seed: int, folder: Path) -> dict:
    """Train one run and return its result: final validation metrics, throughput, size, time."""
    overrides = [*grid.run_overrides(variant, seed), f"run.out_dir={json.dumps(str(folder))}",
                 "logging.progress_bar=false"]
    config = load_config(grid.base, overrides)
    started = time.time()
    # A folder without a result is an attempt that never finished: it is trained again from scratch.
    trainer = Trainer(config, overwrite=True)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    final = history[-1]
    logged = [r for r in read_metrics(folder) if "train/items_per_s" in r]  # the trainer logs throughput there
    result = {
        "variant": variant.name, "seed": seed, "overrides": overrides, "steps": trainer.step,
        "params": parameter_count(trainer.raw_model),
        "tokens_per_s": logged[-1]["train/items_per_s"] if logged else None,
        "wall_s": time.time() - started,
        **{key: value for key, value in final.items() if key.startswith(("val/", "test/"))},
        "final_train_loss": final["train/loss"],
    }
    return result


def run_grid(grid: Grid, *, log=print) -> list[dict]:
    """Every variant x seed, skipping finished runs and variants that cannot run here.
    Returns one record per (variant, seed): the run's result, with ``status`` ``"done"``,
    ``"shared"`` (trained this time for an equal variant), ``"reused"`` (finished by an earlier
    invocation), ``"skipped"`` (with ``reason``)."""
    records, trained_now = [], set()
    for variant in grid.variants:
        reason = missing_requirement(variant)
        key = None if reason else grid.config_key(variant)
        for seed in grid.seeds:
            base_record = {"variant": variant.name, "axis": variant.axis, "label": variant.label, "seed": seed}
            if reason:
                records.append({**base_record, "status": "skipped", "reason": reason})
                log(f"ablate: {variant.name} seed {seed}: skipped, {reason}")
                continue
            folder = run_folder(grid, variant, seed, key)
            result = read_result(folder)
            if result is not None:
                status = "shared" if folder in trained_now else "reused"
                log(f"ablate: {variant.name} seed {seed}: finished before ({folder}), not retrained")
            else:
                log(f"ablate: {variant.name} seed {seed}: training in {folder}")
                result = train_one(grid, variant, seed, folder)
                write_result(folder, result)
                trained_now.add(folder)
                status = "done"
            records.append({**result, **base_record, "status": status, "run_dir": str(folder), "config_key": key})
    return records
