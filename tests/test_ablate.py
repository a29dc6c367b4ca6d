"""Ablation grids: expansion and names, shared runs, resuming, the report; the post-LN block
against a hand-checked case."""

import csv
import json

import pytest
import torch

from tformer.cli import ablate
from tformer.experiments.grid import load_grid
from tformer.experiments.report import write_report
from tformer.experiments import runner
from tformer.nn import TransformerBlock
from tformer.schema import ConfigError

from train_helpers import tiny_config
from test_visualization import assert_png


def test_shipped_grid_expands_to_the_expected_variants():
    grid = load_grid("ablate_shakespeare.json")
    assert [v.name for v in grid.variants] == [
        "positional=none", "positional=sinusoidal", "positional=learned", "positional=rope",
        "heads=1x64", "heads=4x16", "norm=pre", "norm=post", "label_smoothing=0.0", "label_smoothing=0.1",
        "backend=reference", "backend=triton"]
    assert len(grid.seeds) >= 2 and grid.budget == {"steps": 300}
    assert [v.name for v in grid.variants if v.requires] == ["backend=triton"]
    by_name = {v.name: v for v in grid.variants}
    assert by_name["heads=1x64"].overrides == ["model.n_heads=1"]
    assert by_name["label_smoothing=0.1"].overrides == ["training.label_smoothing=0.1"]
    # The base choice of every axis is one config, trained once per seed.
    keys = {v.name: grid.config_key(v) for v in grid.variants}
    base = {keys[n] for n in ("positional=learned", "heads=4x16", "norm=pre", "label_smoothing=0.0",
                              "backend=reference")}
    assert len(base) == 1 and len(set(keys.values())) == 8


@pytest.mark.parametrize("change, message", [
    ({"axes": [{"name": "x", "key": "model.positional", "values": ["lerned"]}]}, "variant 'x=lerned'"),
    ({"seeds": [1, 1]}, "'seeds' must be a non-empty list of distinct ints"),
    ({"budget": {"minutes": 3}}, "'budget' must be a mapping"),
    ({"axes": [{"name": "x", "variants": {"a": []}, "requires": {"a": "tpu"}}]}, "'requires'"),
])
def test_bad_grid_is_a_clear_error(tmp_path, change, message):
    grid = {"base": tiny_config(tmp_path), "axes": [{"name": "norm", "key": "model.norm_position",
                                                       "values": ["pre"]}], **change}
    with pytest.raises(ConfigError, match=message):
        load_grid(grid)


def test_cli_user_error_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"base": tiny_config(tmp_path), "axes": []}))
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--config", str(path)])
    assert exit_info.value.code == 2
    assert "error: ablation grid: 'axes' must be a non-empty list" in capsys.readouterr().err


def test_gpu_only_variant_is_skipped_with_its_reason_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    grid = load_grid({"base": tiny_config(tmp_path), "seeds": [1, 2],
                      "axes": [{"name": "backend", "key": "model.backend", "values": ["triton"],
                                "requires": {"triton": "cuda"}}]})
    records = runner.run_grid(grid, log=lambda message: None)
    assert [(r["status"], r["seed"]) for r in records] == [("skipped", 1), ("skipped", 2)]
    assert "needs a CUDA GPU" in records[0]["reason"]


@pytest.mark.slow
def test_grid_runs_resumes_and_reports_every_variant(tmp_path, monkeypatch):
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps({
        "base": tiny_config(tmp_path, run={"eval_interval": 2}), "seeds": [1, 2], "budget": {"steps": 3},
        "out_dir": str(tmp_path / "ablation"),
        "axes": [{"name": "norm", "key": "model.norm_position", "values": ["pre", "post"]},
                 {"name": "heads", "variants": {"1": ["model.n_heads=1"], "2": ["model.n_heads=2"]}}]}))
    assert ablate.main(["--config", str(grid_file)]) == 0
    out = tmp_path / "ablation"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["variant"], r["seed"]) for r in rows] == [
        (v, s) for v in ("norm=pre", "norm=post", "heads=1", "heads=2") for s in ("1", "2")]
    # norm=pre and heads=2 are the base config: trained once per seed, reused for the second.
    assert [r["status"] for r in rows] == ["done"] * 6 + ["shared"] * 2
    assert len({r["run_dir"] for r in rows}) == 6
    assert all(float(r["val/loss"]) > 0 and float(r["tokens_per_s"]) > 0 and int(r["params"]) > 0 for r in rows)
    report = (out / "report.md").read_text()
    for name in ("norm=pre", "norm=post", "heads=1", "heads=2"):
        assert f"`{name}` |" in report
    assert "beyond spread" in report.lower()
    for plot in ("final_val_loss", "curves_norm", "curves_heads"):
        assert_png(out / "plots" / f"{plot}.png")
        assert f"plots/{plot}.png" in report

    # A rerun trains nothing: every run has its result.json.
    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "train_one", must_not_train)
    records = runner.run_grid(load_grid(str(grid_file)), log=lambda message: None)
    assert {r["status"] for r in records} == {"reused"}
    write_report(records, out, seeds=[1, 2], budget={"steps": 3})
    assert all(f"`{name}` |" in (out / "report.md").read_text() for name in ("norm=pre", "heads=1"))


# ----------------------------------------------------------------------------- post-LN vs pre-LN

def _hand_block(norm_position: str) -> TransformerBlock:
    """d_model 2, one head, every weight chosen so the sublayers are easy by hand: attention is
    the identity on a single token (v = x, proj = identity) and the MLP adds the constant
    (0.5, 0) (fc weights 0, so gelu(0) = 0; proj bias (0.5, 0))."""
    block = TransformerBlock(2, 1, d_ff=4, norm_position=norm_position, backend="reference").double()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.zero_()
        block.attention_norm.weight.fill_(1.0)
        block.mlp_norm.weight.fill_(1.0)
        block.attention.qkv.weight[4:6] = torch.eye(2, dtype=torch.float64)  # rows 4:6 project v
        block.attention.proj.weight.copy_(torch.eye(2, dtype=torch.float64))
        block.mlp.proj.bias.copy_(torch.tensor([0.5, 0.0]))
    return block


def _layer_norm_by_hand(values):
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return [(v - mean) / (variance + 1e-5) ** 0.5 for v in values]


def test_pre_and_post_ln_blocks_match_a_hand_checked_case():
    x = torch.tensor([[[1.0, 3.0]]], dtype=torch.float64)  # (B=1, T=1, d=2)

    # Pre-LN: x + attn(LN(x)) = [1, 3] + LN([1, 3]); then + mlp(LN(.)) = + [0.5, 0].
    ln_x = _layer_norm_by_hand([1.0, 3.0])  # ~[-1, 1]
    pre_expected = [1.0 + ln_x[0] + 0.5, 3.0 + ln_x[1]]
    hidden, residual = _hand_block("pre")(x)
    torch.testing.assert_close((hidden + residual)[0, 0], torch.tensor(pre_expected, dtype=torch.float64))

    # Post-LN: a = LN(x + attn(x)) = LN([2, 6]); out = LN(a + [0.5, 0]).
    a = _layer_norm_by_hand([2.0, 6.0])
    post_expected = _layer_norm_by_hand([a[0] + 0.5, a[1]])
    stream, nothing = _hand_block("post")(x)
    assert nothing is None
    torch.testing.assert_close(stream[0, 0], torch.tensor(post_expected, dtype=torch.float64))
    assert abs(post_expected[0] - pre_expected[0]) > 0.5


def test_post_ln_model_trains_with_the_config_key():
    from tformer.models import DecoderLM, ModelConfig

    model = DecoderLM(ModelConfig(vocab_size=11, max_seq_len=8, d_model=16, n_layers=2, n_heads=2,
                                  norm_position="post", backend="reference"))
    assert all(block.norm_position == "post" for block in model.blocks)
    loss = model(torch.randint(0, 11, (2, 8))).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="norm_position"):
        ModelConfig(norm_position="middle")


def test_wall_time_budget_stops_the_run_and_still_evaluates(tmp_path):
    from tformer.training.config import load_config
    from tformer.training.trainer import Trainer

    config = load_config(tiny_config(tmp_path, run={"steps": 100000, "time_limit_s": 0.5, "log_interval": 50}))
    history = Trainer(config).fit()
    assert 1 <= len(history) < 100000
    assert "val/loss" in history[-1] and (tmp_path / "run" / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="run.time_limit_s must be > 0"):
        load_config(tiny_config(tmp_path, run={"time_limit_s": 0}))
