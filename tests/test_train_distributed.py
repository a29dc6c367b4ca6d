"""Two-rank training on CPU ranks: DeepSpeed ZeRO-2 and ZeRO-3 (bf16, ``deepspeed --num_gpus 2``)
and FSDP2 (fp32, ``torchrun --nproc_per_node 2``, gloo). Each rank draws its half of the global
batch a single process draws (tformer.data.sampler), so the per-step losses must match a
single process with twice the micro-batch: within 1e-4 (relative) for FSDP2 in fp32 (only the
reduction order differs), within 0.01 nats for DeepSpeed in bf16 (bf16 weights and activations; measured ~2e-4).

DeepSpeed's CPU shared-memory all-reduce op is not built (tformer/train.py skips it; training
collectives use gloo), so a fresh machine pays no JIT compile here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tformer.training.config import load_config
from tformer.training.trainer import Trainer

from train_helpers import free_port, tiny_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 5


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def _single_process_losses(tmp_path: Path) -> list[float]:
    config = tiny_config(tmp_path / "single", training={"micro_batch_size": 8}, run={"steps": STEPS})
    return [h["train/loss"] for h in Trainer(load_config(config)).fit()]


def _launch(command: list[str], config: dict, tmp_path: Path, name: str, extra: tuple = ()) -> Path:
    run_dir = tmp_path / name
    config["run"]["out_dir"] = str(run_dir)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([*command, str(REPO / "tformer" / "train.py"), "--config", str(path), *extra], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run_dir


def _check_verification_covers_layout(run_dir: Path, shard_folder: str) -> None:
    """Every file of a distributed checkpoint is hashed: a flipped byte in one shard of the
    newest checkpoint is named by verify, and --resume falls back to the older one."""
    from tformer.training import checkpoint_verify

    checkpoints = run_dir / "checkpoints"
    newest, older = checkpoint_verify.complete_checkpoints(checkpoints)[:2]
    assert checkpoint_verify.verify_checkpoint(newest) == [] == checkpoint_verify.verify_checkpoint(older)
    shard = max((p for p in (newest / shard_folder).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert shard.name in " ".join(checkpoint_verify.verify_checkpoint(newest))
    with pytest.warns(UserWarning, match=shard.name):
        assert checkpoint_verify.choose_resume_checkpoint(checkpoints) == older


def _deepspeed_launcher() -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port()]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_ranks_matches_single_process(tmp_path, stage):
    pytest.importorskip("deepspeed")
    reference = _single_process_losses(tmp_path)
    # ZeRO-2 also accumulates: 2 ranks x 2 micro-batches of 2 = the single process's batch of 8.
    micro, accumulation = (2, 2) if stage == 2 else (4, 1)
    config = tiny_config(tmp_path, training={"strategy": "deepspeed", "precision": "bf16", "micro_batch_size": micro,
                                             "grad_accum_steps": accumulation},
                         run={"steps": STEPS, "export": True, "checkpoint_interval": 3},
                         deepspeed={"zero_optimization": {"stage": stage}})
    run_dir = _launch(_deepspeed_launcher(), config, tmp_path, f"zero{stage}")
    losses = _losses(run_dir)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert max(abs(a - b) for a, b in zip(losses, reference)) < 0.01, (losses, reference)
    from tformer.models.pretrained import load_pretrained

    exported, _ = load_pretrained(run_dir / "export")  # the fp32 master weights, gathered from the partitions
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in exported.parameters())
    if stage == 2:  # resume a ZeRO-2 checkpoint (engine state + tformer's data position and RNG)
        checkpoint = run_dir / "checkpoints" / "step_0000003"
        assert (checkpoint / "COMPLETE").is_file()
        resumed = _launch(_deepspeed_launcher(), config, tmp_path, "zero2_resumed", extra=("--resume", str(checkpoint)))
        assert _losses(resumed) == pytest.approx(losses[3:], abs=1e-6)
        _check_verification_covers_layout(run_dir, "deepspeed")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp2_two_ranks_matches_single_process_and_resumes(tmp_path):
    reference = _single_process_losses(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    # 2 ranks x 2 micro-batches of 2 (no gradient sync on the first) = the single process's batch of 8.
    config = tiny_config(tmp_path, training={"strategy": "fsdp2", "micro_batch_size": 2, "grad_accum_steps": 2},
                         run={"steps": STEPS, "checkpoint_interval": 3})
    run_dir = _launch(torchrun, config, tmp_path, "fsdp2")
    losses = _losses(run_dir)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    for got, want in zip(losses, reference):
        assert got == pytest.approx(want, rel=1e-4)
    # Resume the step-3 checkpoint (2 ranks, DCP shards) into a new run: steps 4-5 repeat bitwise.
    checkpoint = run_dir / "checkpoints" / "step_0000003"
    assert (checkpoint / "COMPLETE").is_file()
    resumed_dir = _launch(torchrun, config, tmp_path, "fsdp2_resumed", extra=("--resume", str(checkpoint)))
    assert _losses(resumed_dir) == losses[3:]
    _check_verification_covers_layout(run_dir, "dcp")
