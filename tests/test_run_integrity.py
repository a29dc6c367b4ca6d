"""A run is never changed by checkpointing, never lost to a late error, and logs each step once:
checkpoints and exports leave the training RNG alone (dropout on), resume continues the run
that wrote the checkpoint, the final checkpoint and export come before the final evaluation,
everything the end of a run needs is checked before step 1, and metrics.jsonl after a resume
holds each step once (truncated to the resumed step)."""

import json

import pytest
import torch

from tformer.training import checkpoint as ckpt
from tformer.training.config import ConfigError, load_config
from tformer.training.trainer import Trainer

from train_helpers import tiny_config

DROPOUT = dict(model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1, "backend": "reference"},
               optimizer={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": 8})


def _losses(history):
    return [h["train/loss"] for h in history]


def test_checkpoints_and_exports_do_not_change_training(tmp_path):
    without = Trainer(load_config(tiny_config(tmp_path / "a", run={"steps": 8}, **DROPOUT))).fit()
    with_checkpoints = tiny_config(tmp_path / "b", run={"steps": 8, "checkpoint_interval": 2, "keep_checkpoints": 4,
                                                        "export": True}, **DROPOUT)
    written = Trainer(load_config(with_checkpoints)).fit()
    assert _losses(written) == _losses(without)
    # Resuming from a middle checkpoint continues the run that wrote it.
    middle = tmp_path / "b" / "run" / "checkpoints" / ckpt.step_dir_name(4)
    resumed = Trainer(load_config(with_checkpoints), resume=str(middle))
    assert resumed.step == 4
    assert _losses(resumed.fit()) == _losses(written)[4:]


def test_final_checkpoint_and_export_precede_final_evaluation(tmp_path, monkeypatch):
    trainer = Trainer(load_config(tiny_config(tmp_path, run={"steps": 3, "export": True})))

    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer.task, "evaluate", failing_evaluate)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.fit()
    run = tmp_path / "run"
    assert (run / "export" / "model.safetensors").is_file()
    assert ckpt.latest_checkpoint(run / "checkpoints").name == ckpt.step_dir_name(3)


@pytest.mark.parametrize("sections, message", [
    (dict(sample={"prompt": "Zebra \u00e9"}), r"sample.prompt='Zebra \u00e9' cannot be encoded.*tiny.txt"),
    (dict(data={"seq_len": 64, "val_fraction": 0.005}), r"the val split of .*tiny.txt has \d+ tokens.*seq_len=64"),
])
def test_what_the_end_needs_is_checked_before_step_one(tmp_path, sections, message, monkeypatch):
    config = load_config(tiny_config(tmp_path, **sections))
    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("must fail before training"))
    with pytest.raises(ConfigError, match=message):
        Trainer(config)


def test_default_prompt_needs_a_newline_in_the_text(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("to be or not to be that is the question " * 40)
    config = tiny_config(tmp_path, data={"path": str(path)})
    with pytest.raises(ConfigError, match=r"sample.prompt='\\n' cannot be encoded.*one_line.txt"):
        Trainer(load_config(config))
    config["sample"]["num_samples"] = 1
    config["sample"]["prompt"] = "to be"
    Trainer(load_config(config))  # a prompt from the text is fine


def test_temperature_zero_is_greedy(tmp_path):
    history = Trainer(load_config(tiny_config(tmp_path, run={"steps": 2}, sample={"temperature": 0}))).fit()
    assert len(history) == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("samples" in r for r in records)


def test_metrics_hold_each_step_once_after_resume(tmp_path):
    config = tiny_config(tmp_path, run={"steps": 6, "checkpoint_interval": 3, "keep_checkpoints": 2})
    Trainer(load_config(config)).fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    ckpt.remove_checkpoint(checkpoints / ckpt.step_dir_name(6))  # as if killed after step 6 was logged
    with open(tmp_path / "run" / "metrics.jsonl", "a") as file:
        file.write('{"step": 6, "train/lo')  # a line cut short by the kill
    trainer = Trainer(load_config(config), resume=True)
    assert trainer.step == 3
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_export_under_fork_leaves_global_rng(tmp_path):
    trainer = Trainer(load_config(tiny_config(tmp_path, run={"steps": 1})))
    before = torch.get_rng_state()
    trainer.export(tmp_path / "export")
    assert torch.equal(before, torch.get_rng_state())
