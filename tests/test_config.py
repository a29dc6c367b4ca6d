"""Config loading: every shipped config loads; unknown keys name the nearest valid one;
--set overrides; bare names resolve against configs/."""

import json

import pytest

from tformer.training.config import ConfigError, configs_dir, load_config, resolve_config_path
from tformer.tasks import TASKS
from tformer.training.optim import learning_rate
from tformer.training.strategy import deepspeed_config
from tformer.cli.train import parse_args

# ablate_*.json are ablation grids (tformer ablate), not training configs; tests/test_ablate.py loads them.
SHIPPED = sorted(p.name for p in configs_dir().glob("*.json") if not p.name.startswith("ablate_"))


def test_configs_ship():
    assert {"ds.json", "enwik8.json", "shakespeare_gpu.json", "zero1.json", "zero2.json", "zero3.json", "fsdp2.json",
            "fp16.json"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads(name):
    config = load_config(name)
    assert config.task in TASKS


def test_bare_name_resolves_with_and_without_suffix():
    assert resolve_config_path("ds.json") == configs_dir() / "ds.json"
    assert resolve_config_path("zero2") == configs_dir() / "zero2.json"
    with pytest.raises(ConfigError, match="available"):
        resolve_config_path("nope.json")


@pytest.mark.parametrize("raw, message", [
    ({"optimizer": {"lr": 1e-3, "weight_decy": 0.1}}, "'weight_decy'.*Did you mean 'weight_decay'"),
    ({"trainig": {}}, "'trainig'.*Did you mean 'training'"),
    ({"model": {"d_modle": 64}}, "'d_modle'.*Did you mean 'd_model'"),
    ({"data": {"seq_length": 64}}, "'seq_length'.*Did you mean 'seq_len'"),
    ({"run": {"steps": "ten"}}, "run.steps must be int"),
    ({"training": {"precision": "bf61"}}, "Did you mean 'bf16'"),
    ({"task": "langmodel"}, "unknown task"),
    ({"data": {"source": "enwik9"}}, "Did you mean 'enwik8'"),
    ({"training": {"init_form": "runs/x"}}, "Did you mean 'init_from'"),
    ({"training": {"init_from": 3}}, "training.init_from must be"),
    ({"task": "mlm", "data": {"mask_probability": 1.5}}, "data.mask_probability must be in"),
])
def test_errors_name_the_key_and_suggest(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_set_overrides_including_nested_deepspeed(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run": {"steps": 5}, "deepspeed": {"zero_optimization": {"stage": 2}}}))
    config = load_config(str(path), ["run.steps=7", "optimizer.betas=[0.9, 0.95]", "deepspeed.zero_optimization.stage=3",
                                     "sample.prompt=ROMEO:"])
    assert config.run.steps == 7 and config.optimizer.betas == (0.9, 0.95)
    assert config.deepspeed["zero_optimization"]["stage"] == 3 and config.sample.prompt == "ROMEO:"
    with pytest.raises(ConfigError, match="Did you mean 'steps'"):
        load_config(str(path), ["run.stepz=3"])


def test_deepspeed_section_is_filled_and_checked():
    config = load_config({"training": {"micro_batch_size": 4, "grad_accum_steps": 2}, "deepspeed": {}})
    ds = deepspeed_config(config, "bf16", world_size=2)
    assert ds["train_batch_size"] == 16 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    clash = load_config({"training": {"micro_batch_size": 4}, "deepspeed": {"train_micro_batch_size_per_gpu": 8}})
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(clash, "fp32", world_size=1)
    with pytest.raises(ConfigError, match="deepspeed.optimizer"):
        deepspeed_config(load_config({"deepspeed": {"optimizer": {"type": "Adam"}}}), "fp32", 1)


def test_schedule_warmup_then_cosine_to_min():
    config = load_config({"optimizer": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}, "run": {"steps": 110}})
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(60, config) == pytest.approx(0.55)
    assert learning_rate(110, config) == pytest.approx(0.1)


def test_help_says_bare_names_resolve(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "configs/" in capsys.readouterr().out


def test_yaml_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  steps: 3\ntraining:\n  micro_batch_size: 2\n")
    config = load_config(str(path))
    assert config.run.steps == 3 and config.training.micro_batch_size == 2
