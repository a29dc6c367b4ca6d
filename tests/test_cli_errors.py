"""Every command's user errors: one ``error: ...`` line on stderr, exit status 2, no traceback
(``--debug`` or ``TFORMER_DEBUG=1`` shows it): tformer train, sample, classify and checkpoint,
through tformer.cli.errors.run_cli. Ops reject eps=inf and a float dim."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tformer.cli.errors import run_cli
from tformer.data.text import CharVocab
from tformer.models import DecoderLM, ModelConfig
from tformer.models.pretrained import save_pretrained

REPO = Path(__file__).resolve().parents[1]


def _fails(main, argv, capsys, match: str):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: " in last and match in last, err
    return last


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "export"
    torch.manual_seed(0)
    vocab = CharVocab.from_text("\nabcdefgh ")
    model = DecoderLM(ModelConfig(vocab_size=vocab.size, max_seq_len=16, d_model=16, n_layers=1, n_heads=2,
                                  backend="reference"))
    save_pretrained(model, folder, metadata={"vocab": vocab.to_dict()})
    return folder


@pytest.mark.parametrize("flags, match", [
    (["--top-p", "0"], "--top-p: must be in (0, 1], got 0.0"),
    (["--top-p", "-0.5"], "--top-p: must be in (0, 1], got -0.5"),
    (["--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
    (["--temperature", "nan"], "--temperature: must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature: must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    (["--beams", "-2"], "--beams: must be >= 1, got -2"),
    (["--top-k", "-3"], "--top-k: must be >= 1, got -3"),
    (["--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0"),
    (["--beams", "2", "--top-k", "3"], "--beams: beam search is deterministic"),
    (["--greedy", "--top-p", "0.9"], "--greedy: greedy decoding takes the argmax; --top-p"),
    (["--prompt", "XYZ"], "--prompt='XYZ' cannot be encoded"),
])
def test_sample_flags_are_checked(export, capsys, flags, match):
    from tformer.cli.sample import main

    _fails(main, ["--checkpoint", str(export), "--max-new-tokens", "4", *flags], capsys, match)


def test_sample_good_flags_and_temperature_zero_is_greedy(export, capsys):
    from tformer.cli.sample import main

    run_cli(main, ["--checkpoint", str(export), "--max-new-tokens", "6", "--temperature", "0", "--prompt", "ab"])
    greedy = capsys.readouterr().out
    run_cli(main, ["--checkpoint", str(export), "--max-new-tokens", "6", "--greedy", "--prompt", "ab"])
    assert capsys.readouterr().out == greedy
    run_cli(main, ["--checkpoint", str(export), "--max-new-tokens", "4", "--top-p", "1", "--top-k", "2"])


def test_sample_and_classify_refuse_missing_or_damaged_exports(export, tmp_path, capsys):
    from tformer.cli import classify, sample as sampling

    _fails(sampling.main, ["--checkpoint", str(tmp_path / "nowhere")], capsys, "--checkpoint")
    _fails(classify.main, ["--checkpoint", str(tmp_path / "nowhere"), "text"], capsys, "--checkpoint")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "model.safetensors"):
        damaged.joinpath(name).write_bytes((export / name).read_bytes())
    weights = bytearray(damaged.joinpath("model.safetensors").read_bytes())
    weights[-3] ^= 0xFF
    damaged.joinpath("model.safetensors").write_bytes(bytes(weights))
    _fails(sampling.main, ["--checkpoint", str(damaged)], capsys, "does not match the SHA-256")


@pytest.mark.parametrize("flags, match", [
    (["--set", "training.device=tpu"], "training.device must be one of"),
    (["--set", "optimizer.betas=[1.5, 0.99]"], "optimizer.betas[0] must be in [0, 1)"),
    pytest.param(["--set", "deepspeed.zero_optimization.stage=9"], "deepspeed section is invalid",
                 marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                          reason="DeepSpeed checks its own section: pip install 'tformer[train]'")),
    (["--set", "run.steps"], "--set: expected section.key=value"),
    (["--config", "no_such_config.json"], "is neither a file nor a config"),
    (["--set", "data.path=my_corpus.txt"], "data.path='my_corpus.txt' has no effect"),
])
def test_train_user_errors(capsys, flags, match):
    from tformer.cli.train import main

    _fails(main, ["--config", "ds.json", *flags], capsys, match)


def test_train_without_deepspeed_names_the_extra(capsys, monkeypatch, tmp_path):
    # None in sys.modules: `import deepspeed` (and of any of its modules another test imported)
    # fails as if it were not installed.
    from tformer.cli.train import main

    for name in [name for name in sys.modules if name.split(".")[0] == "deepspeed"] + ["deepspeed"]:
        monkeypatch.setitem(sys.modules, name, None)
    _fails(main, ["--config", "ds.json", "--set", "training.strategy=deepspeed", "--set", f"run.out_dir={tmp_path}"],
           capsys, "training.strategy 'deepspeed' needs deepspeed, which is not installed: pip install 'tformer[train]'")


def test_train_resume_without_checkpoint(tmp_path, capsys):
    from tformer.cli.train import main

    from train_helpers import tiny_config
    import json

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config(tmp_path)))
    _fails(main, ["--config", str(path), "--resume"], capsys, "--resume: no complete checkpoint in")


def test_debug_shows_the_traceback(monkeypatch, capsys):
    from tformer.cli.train import main
    from tformer.training.config import ConfigError

    with pytest.raises(ConfigError):
        run_cli(main, ["--config", "ds.json", "--set", "training.threads=0", "--debug"])
    monkeypatch.setenv("TFORMER_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_cli(main, ["--config", "ds.json", "--set", "training.threads=0"])


def test_a_bug_is_not_hidden(capsys):
    def buggy(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        run_cli(buggy, [])


@pytest.mark.parametrize("argv, match", [
    (["sample", "--checkpoint", "/nonexistent", "--top-p", "0"], "--top-p"),
    (["checkpoint", "verify", "/nonexistent"], "verify: argument 'path'"),
])
def test_entry_points_exit_2_without_traceback(argv, match):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TFORMER_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "tformer", *argv], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert match in result.stderr.strip().splitlines()[-1]
    if argv[0] == "sample":  # argparse's own error: the usage line names the command as typed
        assert "usage: python -m tformer sample" in result.stderr


def test_train_script_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TFORMER_DEBUG", None)
    result = subprocess.run([sys.executable, str(REPO / "tformer" / "train.py"), "--set", "training.device=tpu"],
                            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: config: training.device must be one of ('auto', 'cpu', 'cuda'), got 'tpu'. Did you mean 'cpu'?")


def test_ops_reject_non_finite_eps_and_float_dim():
    from tformer.ops import softmax
    from tformer.ops.normalization import layer_norm, rms_norm

    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"layer_norm: argument 'eps' must be finite, got inf"):
        layer_norm(x, torch.ones(4), torch.zeros(4), eps=float("inf"))
    with pytest.raises(ValueError, match=r"rms_norm: argument 'eps'"):
        rms_norm(x, torch.ones(4), eps=float("nan"))
    with pytest.raises(ValueError, match=r"softmax: argument 'dim' must be an int, got 1.0"):
        softmax(x, dim=1.0)
