"""Small configs and a text file shared by the training tests."""

from __future__ import annotations

from pathlib import Path

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40


def write_text(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT)
    return path


def tiny_config(tmp_path: Path, **sections) -> dict:
    """A tiny LM job on a small text file: 2 layers, d 32, T 16, fp32, no W&B, no progress bar."""
    config = {
        "task": "lm",
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "backend": "reference"},
        "data": {"source": "text", "path": str(write_text(tmp_path)), "seq_len": 16},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "training": {"micro_batch_size": 4, "precision": "fp32", "strategy": "single", "threads": 1},
        "run": {"steps": 6, "eval_interval": 0, "eval_batches": 2, "final_eval_batches": 2, "log_interval": 1,
                "out_dir": str(tmp_path / "run"), "export": False},
        "sample": {"num_samples": 1, "max_new_tokens": 8},
        "logging": {"progress_bar": False, "wandb": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


def free_port() -> str:
    """A TCP port nobody listens on now, for a two-rank launcher's rendezvous: a fixed port would
    collide when test workers (pytest -n) launch two runs at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
