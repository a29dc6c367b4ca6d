"""Past one machine: two torchrun "nodes" of one rank each, meeting at a localhost c10d
rendezvous (as ``torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`` on two
hosts), train exactly as one node with two ranks: same ranks, same data shards, same gloo
reductions, so the per-step losses are equal, not just close."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(tmp_path: Path, name: str) -> Path:
    config = tiny_config(tmp_path, training={"strategy": "fsdp2", "micro_batch_size": 4},
                         run={"steps": STEPS, "out_dir": str(tmp_path / name)})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _wait(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out[-2000:] + err[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_of_one_rank_match_one_node_of_two(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    train = [str(REPO / "tformer" / "train.py"), "--config"]
    popen = dict(cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    single = _config(tmp_path, "one_node")
    _wait([subprocess.Popen(_torchrun("--nproc_per_node", "2", "--master_port", str(_free_port()),
                                      *train, str(single)), **popen)])

    multi = _config(tmp_path, "two_nodes")
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(_torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                                        "--rdzv-endpoint", endpoint, "--rdzv-id", "tformer-test",
                                        *train, str(multi)), **popen)
             for _ in range(2)]
    _wait(nodes)

    reference = _losses(tmp_path / "one_node")
    assert len(reference) == STEPS
    assert _losses(tmp_path / "two_nodes") == reference
