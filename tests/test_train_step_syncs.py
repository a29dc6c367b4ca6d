"""The training loop reads nothing back from the device between log steps: the loss, the grad
norm and the layer norms stay tensors until a log step reads them all at once."""

import torch

from tformer.training.config import load_config
from tformer.training.trainer import Trainer, _read_metrics

from conftest import requires_cuda
from train_helpers import tiny_config


def test_steps_between_logs_keep_metrics_on_the_device(tmp_path):
    trainer = Trainer(load_config(tiny_config(tmp_path, run={"steps": 4, "log_interval": 4})))
    metrics = trainer.train_step(want_layer_norms=False)
    assert isinstance(metrics["train/loss"], torch.Tensor) and isinstance(metrics["train/grad_norm"], torch.Tensor)
    assert not any(key.startswith("grad_norm/") for key in metrics)  # per-layer norms: log steps only
    assert "grad_norm/block_0" in trainer.train_step(want_layer_norms=True)
    trainer.release_lock()


def test_fit_reads_every_step_at_the_log_steps(tmp_path, monkeypatch):
    reads = []
    original = _read_metrics

    def counting(history, start):
        reads.append(len(history) - start)
        return original(history, start)

    monkeypatch.setattr("tformer.training.trainer._read_metrics", counting)
    config = load_config(tiny_config(tmp_path, run={"steps": 9, "log_interval": 4},
                                     logging={"layer_grad_norms": True}))
    history = Trainer(config).fit()
    assert reads[:3] == [4, 4, 1]  # steps 1-4 read at step 4, 5-8 at step 8, 9 at the last step
    assert all(isinstance(h["train/loss"], float) and isinstance(h["train/grad_norm"], float) for h in history)
    assert "grad_norm/block_0" in history[3] and "grad_norm/block_0" not in history[2]


def test_read_metrics_converts_with_one_transfer_per_device():
    history = [{"a": torch.tensor(1.5), "b": 2}, {"a": torch.tensor([2.5]), "c": "x"}]
    assert _read_metrics(history, 0) == 2
    assert history == [{"a": 1.5, "b": 2}, {"a": 2.5, "c": "x"}]


def test_compile_option_trains_on_the_cpu_and_reports_compile_time(tmp_path, monkeypatch, capsys):
    # Inductor works on the CPU too (its C++ build of this model takes ~2 minutes on 2 busy
    # cores); aot_eager traces the same graph in seconds.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, **{"backend": "aot_eager", **kw}))
    config = load_config(tiny_config(tmp_path, run={"steps": 2}, training={"compile": True}))
    history = Trainer(config).fit()
    assert history[0]["time/compile_first_step_s"] > 0 and "time/compile_first_step_s" not in history[1]
    assert "torch.compile: first step took" in capsys.readouterr().out


@requires_cuda
def test_no_host_device_sync_between_log_steps(tmp_path):
    config = load_config(tiny_config(tmp_path, training={"device": "cuda"}, run={"steps": 4, "log_interval": 4}))
    trainer = Trainer(config)
    trainer.train_step(want_layer_norms=False)  # warm-up: allocations, first launches
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(want_layer_norms=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    trainer.release_lock()
