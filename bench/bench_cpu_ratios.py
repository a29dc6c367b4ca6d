"""tformer against plain PyTorch on the CPU, as ratios measured in one run (pytest-benchmark):

- the model step at the README main job's size (DecoderLM d 96, 3 layers, 4 heads, batch 32 x 64)
  with each backend (``auto`` included) against bench/plain_gpt.py, steps interleaved in one
  process (on a shared machine the load changes minute to minute: pairs, then medians);
- the main job itself, ``tformer train --config ds.json``, against bench/plain_main_job.py at the
  same steps, as alternating whole-process runs (start-up included), with both final losses.

    pytest bench/bench_cpu_ratios.py --benchmark-json RESULTS-cpu.json

``extra_info`` holds the ratios (tformer time / plain time: below 1.0 is tformer faster) and the
losses; bench/RESULTS.md records them with the machine and date.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.plain_gpt import PlainGPT, PlainGPTConfig

ROOT = Path(__file__).resolve().parents[1]
DIMS = dict(d_model=96, n_layers=3, n_heads=4)  # configs/ds.json
VOCAB, SEQ_LEN, BATCH = 65, 64, 32
STEP_PAIRS = int(os.environ.get("TFORMER_BENCH_STEP_PAIRS", "100"))
JOB_STEPS = int(os.environ.get("TFORMER_BENCH_JOB_STEPS", "600"))
JOB_PAIRS = int(os.environ.get("TFORMER_BENCH_JOB_PAIRS", "3"))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU section: run without a GPU")


def _trainer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_model_step_against_plain_pytorch(benchmark, backend):
    from tformer.models import DecoderLM, ModelConfig

    torch.manual_seed(0)
    ours = _trainer(DecoderLM(ModelConfig(vocab_size=VOCAB, max_seq_len=SEQ_LEN, dropout=0.0, backend=backend, **DIMS)))
    torch.manual_seed(0)
    plain = _trainer(PlainGPT(PlainGPTConfig(vocab_size=VOCAB, max_seq_len=SEQ_LEN, **DIMS)))
    for _ in range(3):  # warm-up
        ours(), plain()
    ours_s, plain_s = [], []
    for pair in range(STEP_PAIRS):  # interleaved: both see the same load
        # Which one goes first alternates: the second step of a pair finds the caches and the
        # allocator as the first left them.
        if pair % 2:
            plain_s.append(_timed(plain))
            ours_s.append(_timed(ours))
        else:
            ours_s.append(_timed(ours))
            plain_s.append(_timed(plain))
    # Each pair ran back to back, under the same load: the median of the pairs' ratios follows
    # the machine's load less than a ratio of two medians does.
    ratio = statistics.median(o / p for o, p in zip(ours_s, plain_s))
    benchmark.extra_info.update({"backend": backend, "tformer_median_s": statistics.median(ours_s),
                                 "plain_median_s": statistics.median(plain_s), "time_ratio": ratio,
                                 "ratio_of_medians": statistics.median(ours_s) / statistics.median(plain_s),
                                 "speed_vs_plain": 1.0 / ratio, "pairs": STEP_PAIRS,
                                 "shape": f"d96 L3 H4, batch {BATCH} x {SEQ_LEN}", "threads": torch.get_num_threads()})
    benchmark.pedantic(ours, rounds=5, iterations=1)


def _run(command: list[str], out_dir: Path | None) -> tuple[float, dict]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    if out_dir is None:  # the plain loop prints its own losses
        return seconds, json.loads(result.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in records if "train/loss" in r]
    val = [r["val/loss"] for r in records if "val/loss" in r]
    return seconds, {"final_train_loss": train[-1], "final_val_loss": val[-1]}


def test_main_job_against_a_plain_pytorch_loop(benchmark, tmp_path):
    tformer_command = [sys.executable, "-c", "import sys; from tformer.cli import main; sys.exit(main(sys.argv[1:]))",
                       "train", "--config", "ds.json", "--set", f"run.steps={JOB_STEPS}", "--set", "logging.wandb=false",
                       "--set", "logging.progress_bar=false"]
    plain_command = [sys.executable, "-m", "bench.plain_main_job", "--steps", str(JOB_STEPS)]
    ours, plain = [], []
    for pair in range(JOB_PAIRS):  # alternating whole-process runs, start-up included
        out_dir = tmp_path / f"run{pair}"
        ours.append(_run([*tformer_command, "--set", f"run.out_dir={out_dir}"], out_dir))
        plain.append(_run(plain_command, None))
    ours_s, plain_s = statistics.median(s for s, _ in ours), statistics.median(s for s, _ in plain)
    benchmark.extra_info.update({
        "steps": JOB_STEPS, "pairs": JOB_PAIRS, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "tformer_median_s": ours_s, "plain_median_s": plain_s,
        "time_ratio": ours_s / plain_s, "tformer_runs_s": [s for s, _ in ours], "plain_runs_s": [s for s, _ in plain],
        "tformer_final_val_loss": [m["final_val_loss"] for _, m in ours],
        "plain_final_val_loss": [m["final_val_loss"] for _, m in plain],
        "tformer_final_train_loss": [m["final_train_loss"] for _, m in ours],
        "plain_final_train_loss": [m["final_train_loss"] for _, m in plain]})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timings are the pairs above
