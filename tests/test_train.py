"""Single-process training: accumulation equivalence (float64), the loss falls, activation
checkpointing changes nothing, weight-decay groups, label smoothing."""

import copy

import pytest
import torch

from tformer.training.config import load_config
from tformer.models import DecoderLM, ModelConfig
from tformer.training.parallelize import apply_activation_checkpointing, clean_name
from tformer.tasks.lm import LanguageModelTask
from tformer.training.optim import build_optimizer, parameter_groups
from tformer.training.strategies import accumulated_backward
from tformer.training.trainer import Trainer

from train_helpers import tiny_config


def _task_and_model(tmp_path):
    config = load_config(tiny_config(tmp_path))
    task = LanguageModelTask(config)
    task.load_data()
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_dict(task.model_config_dict())).double()
    return task, model


def _grads(model):
    # named by the plain model (checkpoint_wrapper adds a component to named_parameters)
    return {clean_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weighted", [False, True])
def test_k_micro_batches_give_the_gradient_of_one_k_times_larger(tmp_path, weighted):
    task, model = _task_and_model(tmp_path)
    micro = [task.next_train_batch() for _ in range(3)]
    if weighted:  # uneven item counts: the case where averaging per-micro-batch means is wrong
        for index, batch in enumerate(micro):
            batch["weights"] = (torch.rand(batch["targets"].shape, generator=torch.Generator().manual_seed(index))
                                < 0.3 + 0.3 * index).double()
    big = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
    count = sum(task.num_items(b) for b in micro)
    reference = copy.deepcopy(model)
    accumulated_backward(model, task, micro, global_count=count, world_size=1)
    accumulated_backward(reference, task, [big], global_count=count, world_size=1)
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(_grads(model)[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_activation_checkpointing_gives_identical_gradients(tmp_path):
    task, model = _task_and_model(tmp_path)
    batch = task.next_train_batch()
    checkpointed = copy.deepcopy(model)
    assert apply_activation_checkpointing(checkpointed, every=1) == [0, 1]
    for m in (model, checkpointed):
        accumulated_backward(m, task, [batch], global_count=task.num_items(batch), world_size=1)
    assert model.state_dict().keys() == checkpointed.state_dict().keys()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(_grads(checkpointed)[name], grad, rtol=1e-12, atol=1e-14)


def test_decay_only_matmul_weights():
    model = DecoderLM(ModelConfig(vocab_size=16, max_seq_len=8, d_model=16, n_layers=1, n_heads=2))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "token_embedding.weight" in decayed  # tied to the head, a matmul weight
    assert all(p.dim() >= 2 for p in decay["params"])
    assert not any("norm" in names[id(p)] or names[id(p)].endswith("bias") for p in decay["params"])
    assert any("positional" in names[id(p)] for p in no_decay["params"])


@pytest.mark.parametrize("setting, fused", [(None, True), (False, False), (True, True)])
def test_adamw_is_fused_on_the_cpu_unless_the_config_says_otherwise(tmp_path, setting, fused):
    # The per-tensor AdamW loop (torch's CPU default) costs a measured share of a small model's
    # step; optimizer.fused=false keeps it for whoever wants it.
    config = load_config(tiny_config(tmp_path, optimizer={"lr": 3e-3, "fused": setting}))
    model = DecoderLM(ModelConfig(vocab_size=17, max_seq_len=8, d_model=16, n_layers=1, n_heads=2))
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    assert bool(optimizer.defaults["fused"]) is fused


def test_single_process_loss_falls_and_logs(tmp_path):
    config = load_config(tiny_config(tmp_path, run={"steps": 30, "eval_interval": 15, "export": True},
                                     training={"label_smoothing": 0.05, "activation_checkpointing": True,
                                               "checkpoint_every": 2}))
    history = Trainer(config).fit()
    losses = [h["train/loss"] for h in history]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert "val/loss" in history[14] and "val/bpc" in history[-1] and "grad_norm/block_1" in history[-1]
    # Each evaluation carries the wall time since the loop began ("val loss X within N minutes").
    assert 0 < history[14]["time/elapsed_s"] < history[-1]["time/elapsed_s"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"samples"' in line for line in lines) and len(lines) >= 30
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_fp16_and_bf16_autocast_run_on_the_cpu(tmp_path):
    for precision in ("bf16", "fp16"):
        config = load_config(tiny_config(tmp_path / precision, training={"precision": precision},
                                         run={"steps": 3}))
        trainer = Trainer(config)
        history = trainer.fit()
        assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history)
        assert (trainer.strategy.scaler is not None) == (precision == "fp16")


def test_wandb_offline_logs_config_metrics_and_samples(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = load_config(tiny_config(tmp_path, run={"steps": 2}, logging={"progress_bar": True, "wandb": True}))
    Trainer(config).fit()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_no_tformer_module_shadows_a_top_level_package():
    # `python tformer/train.py` puts tformer/ first on sys.path (train.py swaps it for the
    # repository root, but only once it runs): a tformer/schema.py next to a real `schema`
    # package, or a tformer/tokenizers/, would be imported in its place.
    import importlib.util
    from pathlib import Path

    import tformer

    root = Path(tformer.__file__).parent
    names = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.name.split(".")[0] for p in root.glob("*.so")}
    names -= {"__init__", "__main__"}  # any process finds its running script as __main__ (its spec may be None)
    assert {"train", "training", "data", "tasks"} <= names
    clashes = {name for name in names if importlib.util.find_spec(name) is not None}
    # tformer.kernels must keep its name (the Triton kernels' one import path), and PyPI's `kernels`
    # (which transformers imports) is installed with the dev extra. train.py's first statement
    # swaps tformer/ for the repository root, before any import, so the script never sees it.
    assert clashes <= {"kernels"}, f"tformer modules named like importable top-level modules: {sorted(clashes)}"
