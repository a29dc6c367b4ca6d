"""Config loading: every shipped config loads; unknown keys name the nearest valid one;
--set overrides; bare names resolve against configs/."""

import json

import pytest

from tformer.schema import from_dict
from tformer.training.config import ConfigError, TrainConfig, configs_dir, load_config, resolve_config_path
from tformer.tasks import TASKS
from tformer.training.optim import learning_rate
from tformer.training.strategies.choice import deepspeed_config
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


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_round_trips_through_to_dict(name):
    """A saved run config (TrainConfig.to_dict, stored with checkpoints) loads back to the same
    config; model and data keep only the keys the file set, so the data still fills the rest."""
    config = load_config(name)
    saved = json.loads(json.dumps(config.to_dict()))
    assert from_dict(TrainConfig, saved) == config
    assert json.loads(json.dumps(from_dict(TrainConfig, saved).to_dict())) == saved
    assert load_config(saved) == config  # every check passes on it too (a key at its default is no setting)


def test_model_and_data_sections_are_the_tasks_dataclasses():
    from tformer.models import EncoderDecoderConfig, ModelConfig
    from tformer.tasks.asr import AsrDataConfig
    from tformer.tasks.lm import LMDataConfig

    config = load_config({"model": {"d_model": 64, "n_heads": 2}}, ["data.seq_len=128"])
    assert isinstance(config.model, ModelConfig) and isinstance(config.data, LMDataConfig)
    assert config.model.d_model == 64 and config.data.seq_len == 128
    assert config.to_dict()["model"] == {"d_model": 64, "n_heads": 2} and config.to_dict()["data"] == {"seq_len": 128}
    asr = load_config({"task": "asr", "data": {"ctc_weight": 0.3}, "model": {"ctc": True}})
    assert isinstance(asr.model, EncoderDecoderConfig) and isinstance(asr.data, AsrDataConfig)
    with pytest.raises(ConfigError, match=r"unknown key data.'seq_lenn'. Did you mean 'seq_len'"):
        load_config({}, ["data.seq_lenn=128"])
    with pytest.raises(ConfigError, match=r"unknown key model.'n_layer'. Did you mean 'n_layers'"):
        load_config({"task": "asr", "model": {"n_layer": 2}})
    with pytest.raises(ConfigError, match=r"model.d_model must be int, got '64'"):
        load_config({"model": {"d_model": "64"}})
    # Built in code: dicts are parsed the same way; a dataclass is kept, its changed fields saved.
    assert TrainConfig(model={"d_model": 64, "n_heads": 2}, data={"seq_len": 128}) == config
    built = TrainConfig(task="lm", model=ModelConfig(d_model=64, n_heads=2), data=LMDataConfig(seq_len=128))
    assert built.to_dict()["data"] == {"seq_len": 128} and built.to_dict()["model"]["d_model"] == 64
    with pytest.raises(ConfigError, match=r"unknown key model.'d_modle'"):
        TrainConfig(model={"d_modle": 64})


def test_model_keys_the_file_sets_win_over_the_data():
    """vocab_size and max_seq_len come from the data unless the model section sets them, even to
    the dataclass's default value."""
    from tformer.tasks import get_task_class

    def resolved(model):
        config = load_config({"model": {"d_model": 32, "n_heads": 2, "n_layers": 1, **model}, "data": {"seq_len": 64}})
        task = get_task_class("lm")(config)
        task.load_data()
        return task.builder.config()

    data_filled = resolved({})
    assert data_filled.max_seq_len == 64 and data_filled.vocab_size == 65  # tinyshakespeare's characters
    assert resolved({"max_seq_len": 256, "vocab_size": 128}).max_seq_len == 256
    assert resolved({"max_seq_len": 256, "vocab_size": 128}).vocab_size == 128
