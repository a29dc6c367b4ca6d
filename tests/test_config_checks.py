"""Config values are range-checked, NaN/inf rejected, the deepspeed section validated by
DeepSpeed's own model, YAML errors name file and line, and a key that is set but has no effect
under the other settings is an error that says why and what to set (tformer.training.config_checks)."""

import pytest

from tformer.training.config import ConfigError, load_config


@pytest.mark.parametrize("overrides, message", [
    (["run.checkpoint_interval=-1"], r"run.checkpoint_interval must be >= 0, got -1"),
    (["run.eval_interval=-1"], r"run.eval_interval must be >= 0, got -1"),
    (["run.keep_checkpoints=-1"], r"run.keep_checkpoints must be >= 0"),
    (["run.final_eval_batches=0"], r"run.final_eval_batches must be >= 1"),
    (["optimizer.warmup_steps=-10"], r"optimizer.warmup_steps must be >= 0, got -10"),
    (["optimizer.weight_decay=-1"], r"optimizer.weight_decay must be >= 0"),
    (["optimizer.grad_clip=-1"], r"optimizer.grad_clip must be >= 0"),
    (["optimizer.decay_steps=0"], r"optimizer.decay_steps must be >= 1"),
    (["optimizer.eps=0"], r"optimizer.eps must be > 0"),
    (["optimizer.lr=NaN"], r"optimizer.lr must be a finite number, got nan"),
    (["optimizer.min_lr=Infinity"], r"optimizer.min_lr must be a finite number"),
    (["training.label_smoothing=NaN"], r"training.label_smoothing must be a finite number"),
    (["optimizer.betas=[1.5, 0.99]"], r"optimizer.betas\[0\] must be in \[0, 1\), got 1.5"),
    (["optimizer.betas=[0.9, -0.1]"], r"optimizer.betas\[1\] must be in \[0, 1\)"),
    (["training.threads=0"], r"training.threads must be >= 1"),
    (["training.seed=-1"], r"training.seed must be >= 0"),
    (["training.device=tpu"], r"training.device must be one of \('auto', 'cpu', 'cuda'\), got 'tpu'"),
    (["sample.temperature=-0.5"], r"sample.temperature must be >= 0"),
    (["sample.temperature=NaN"], r"sample.temperature must be a finite number"),
    (["sample.top_k=0"], r"sample.top_k must be >= 1"),
    (["sample.max_new_tokens=-1"], r"sample.max_new_tokens must be >= 0"),
    (["data.val_fraction=1.5"], r"data.val_fraction must be in \(0, 1\)"),
    (["model.dropout=NaN"], r"model.dropout must be a finite number"),
])
def test_values_out_of_range_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("ds.json", overrides)


@pytest.mark.parametrize("overrides, message", [
    (["data.path=my_corpus.txt"], r"data.path='my_corpus.txt' has no effect with data.source='tinyshakespeare'.*"
                                  r"set data.source='text'"),
    (["data.data_dir=/tmp/x"], r"data.data_dir only applies to data.source='enwik8'"),
    (["data.expected_sha1=abc"], r"data.expected_sha1 only applies to data.source='enwik8'"),
    (["data.source=enwik8", "data.val_fraction=0.2"], r"data.val_fraction has no effect with data.source='enwik8'"),
    (["training.strategy=single"], r"deepspeed section has no effect with training.strategy='single'"),
    (["fsdp.reshard_after_forward=false"], r"fsdp section has no effect with training.strategy='deepspeed'"),
    (["training.checkpoint_every=2"], r"checkpoint_every has no effect without training.activation_checkpointing"),
    (["training.compile=true"], r"training.compile has no effect under DeepSpeed"),
    (["training.device=cuda", "training.threads=2"], r"training.threads only applies on the CPU"),
    (["optimizer.schedule=constant"], r"optimizer.min_lr has no effect with optimizer.schedule='constant'"),
    (["sample.temperature=0", "sample.top_k=10"], r"sample.top_k has no effect with sample.temperature=0 \(greedy"),
])
def test_keys_without_effect_are_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("ds.json", overrides)


def test_keys_without_effect_other_task():
    with pytest.raises(ConfigError, match=r"sample.temperature has no effect for task 'classify'"):
        load_config("imdb_tiny.json", ["sample.temperature=0.5"])
    load_config("imdb_tiny.json", ["sample.num_samples=1"])  # num_samples switches the classifier's samples


def test_effective_settings_load():
    config = load_config("ds.json", ["data.source=text", "data.path=my_corpus.txt", "sample.temperature=0",
                                    "sample.top_k=null"])
    assert config.data.path == "my_corpus.txt" and config.sample.temperature == 0
    load_config("ds.json", ["training.activation_checkpointing=true", "training.checkpoint_every=2"])


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.zero_optimisation={\"stage\": 2}"], r"unknown key deepspeed.'zero_optimisation'.*"
                                                     r"Did you mean 'zero_optimization'"),
    (["deepspeed.zero_optimization.stage=9"], r"deepspeed section is invalid.*stage.*got 9"),
    (["deepspeed.zero_optimization.stgae=2"], r"deepspeed section is invalid.*stgae.*Extra inputs"),
])
def test_deepspeed_section_is_validated_by_deepspeed(overrides, message):
    pytest.importorskip("deepspeed")
    with pytest.raises(ConfigError, match=message):
        load_config("ds.json", overrides)


def test_yaml_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: lm\nrun:\n  steps: 10\n  out_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+:\d+: not valid YAML"):
        load_config(str(path))
    path.write_text("run:\n  steps: 10\n   bad_indent: 1\n")
    with pytest.raises(ConfigError, match=rf"{path}:3:\d+: not valid YAML"):
        load_config(str(path))


def test_switching_a_feature_off_is_not_an_ineffective_key():
    # ds.json sets logging.wandb_mode; turning W&B off from the command line must still load.
    assert load_config("ds.json", ["logging.wandb=false"]).logging.wandb is False
    # deepspeed=null drops the section, so a DeepSpeed config runs as a plain single-process job.
    config = load_config("ds.json", ["deepspeed=null", "training.strategy=single"])
    assert config.deepspeed is None and config.training.strategy == "single"
    with pytest.raises(ConfigError, match=r"deepspeed=null"):
        load_config("ds.json", ["training.strategy=single"])
    with pytest.raises(ConfigError, match=r"task=NAME, deepspeed=null"):
        load_config("ds.json", ["model=null"])
