"""Training strategies as objects: the trainer never branches on which it holds; activation
checkpointing, then per-block compile, then FSDP2; exports written from the trained state dict
without building a model; checkpoints of plain models load into checkpoint-wrapped ones."""

import ast
import inspect
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tformer.training.trainer as trainer_module
from tformer.models import DecoderLM, ModelConfig
from tformer.models.pretrained import load_pretrained
from tformer.training import parallelize
from tformer.training.config import ConfigError, load_config
from tformer.training.strategies import FSDP2, DeepSpeed, Single, resolve_strategy
from tformer.training.trainer import Trainer

from train_helpers import tiny_config

STRATEGY_WORDS = {"single", "deepspeed", "fsdp2", "fsdp", "zero"}


def test_trainer_source_has_no_strategy_branch():
    tree = ast.parse(inspect.getsource(trainer_module))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            found += [f"line {node.lineno}: compares with {c!r}" for c in constants if c.lower() in STRATEGY_WORDS]
        if isinstance(node, ast.Attribute) and node.attr in {"engine", "ds_config", "scaler", "set_requires_gradient_sync"}:
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [getattr(node, "module", None) or ""] + [alias.name for alias in node.names]
            found += [f"line {node.lineno}: imports {n}" for n in names
                      if "deepspeed" in n.lower() or "fsdp" in n.lower() or n.endswith("parallelize")]
        if isinstance(node, ast.Name) and node.id in {"Single", "FSDP2", "DeepSpeed"}:
            found.append(f"line {node.lineno}: names the strategy class {node.id}")
    assert not found, found


def test_trainer_imports_no_plotting_code():
    tree = ast.parse(inspect.getsource(trainer_module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    plotting = {name for name in imported if "matplotlib" in name or name.startswith("tformer.visualization.")
                and name != "tformer.visualization.gradient_health"}
    assert not plotting


def test_visualize_without_a_plot_writer_is_a_clear_error(tmp_path):
    config = load_config(tiny_config(tmp_path, logging={"visualize": True}))
    with pytest.raises(ConfigError, match="logging.visualize"):
        Trainer(config)


@pytest.mark.parametrize("name, kind", [("single", Single), ("fsdp2", FSDP2), ("deepspeed", DeepSpeed)])
def test_resolve_strategy_picks_the_object(tmp_path, name, kind):
    extra = {"deepspeed": {}} if name == "deepspeed" else {}
    strategy = resolve_strategy(load_config(tiny_config(tmp_path, training={"strategy": name}, **extra)))
    assert isinstance(strategy, kind) and strategy.name == name


# ----------------------------------------------------------------------------- wrapping order

def _tiny_model():
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(vocab_size=32, max_seq_len=16, d_model=16, n_layers=3, n_heads=2,
                                 backend="reference"))


@pytest.fixture
def one_rank_gloo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_blocks_are_checkpoint_wrapped_then_compiled_then_sharded(one_rank_gloo, monkeypatch):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule
    import torch.distributed.fsdp as fsdp

    model = _tiny_model()
    keys = set(model.state_dict())
    seen_at_sharding = []
    fully_shard = fsdp.fully_shard

    def spying_fully_shard(module, **kwargs):
        if module is not model:
            seen_at_sharding.append((isinstance(module, CheckpointWrapper), module._compiled_call_impl is not None))
        return fully_shard(module, **kwargs)

    monkeypatch.setattr(fsdp, "fully_shard", spying_fully_shard)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{"backend": "aot_eager", **kw}))
    parallelize.prepare_blocks(model, activation_checkpointing=True, checkpoint_every=1, compile=True)
    parallelize.apply_fsdp2(model)

    assert seen_at_sharding == [(True, True)] * 3  # every block: wrapped and compiled before it was sharded
    for block in model.blocks:
        assert isinstance(block, CheckpointWrapper) and isinstance(block, FSDPModule)
        assert type(block._checkpoint_wrapped_module).__name__ == "TransformerBlock"
    assert set(model.state_dict()) == keys  # no _checkpoint_wrapped_module. or _orig_mod. in the keys
    tokens = torch.randint(0, 32, (2, 8))
    model(tokens).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_activation_checkpointing_replaces_blocks_where_they_live():
    # The encoder-decoder's ``blocks`` is a property building a fresh ModuleList: the wrappers
    # must go into encoder_blocks / decoder_blocks, the real owners.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from tformer.models.encoder_decoder import EncoderDecoderConfig, EncoderDecoderTransformer

    torch.manual_seed(0)
    model = EncoderDecoderTransformer(EncoderDecoderConfig(
        encoder_input="tokens", vocab_size=16, src_vocab_size=16, max_seq_len=8, max_source_len=8, d_model=16,
        n_layers=2, n_encoder_layers=2, n_heads=2, backend="reference"))
    keys = set(model.state_dict())
    assert parallelize.apply_activation_checkpointing(model, every=1) == [0, 1, 2, 3]
    assert all(isinstance(b, CheckpointWrapper) for b in (*model.encoder_blocks, *model.decoder_blocks))
    assert set(model.state_dict()) == keys
    assert len(model.memory_kv(torch.randn(1, 4, 16))) == 2  # project_memory passes through the wrapper


# ----------------------------------------------------------------------------- export and resume

def test_export_writes_the_trained_state_without_building_a_model(tmp_path):
    config = load_config(tiny_config(tmp_path, run={"steps": 2, "export": True}))
    trainer = Trainer(config)

    def no_model(*args, **kwargs):
        raise AssertionError("export built a model")

    trainer.task.build_model = no_model
    trainer.fit()
    exported, _ = load_pretrained(Path(config.run.out_dir) / "export")
    trained = trainer.raw_model.state_dict()
    assert set(exported.state_dict()) == set(trained)
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    assert exported.lm_head.weight is exported.token_embedding.weight  # the tie survives


def test_checkpoint_of_a_plain_model_resumes_with_activation_checkpointing(tmp_path):
    sections = dict(optimizer={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": 8})
    straight = Trainer(load_config(tiny_config(tmp_path / "a", run={"steps": 8}, **sections))).fit()
    first = tiny_config(tmp_path / "b", run={"steps": 4, "checkpoint_interval": 4}, **sections)
    Trainer(load_config(first)).fit()  # written by a model without checkpoint wrappers
    first["run"]["steps"] = 8
    first["training"] = {**first["training"], "activation_checkpointing": True}
    resumed = Trainer(load_config(first), resume=True)
    assert resumed.step == 4
    losses = [h["train/loss"] for h in resumed.fit()]
    assert losses == pytest.approx([h["train/loss"] for h in straight][4:], rel=1e-6)


@pytest.mark.parametrize("grad_clip", [0.05, 0.0])
def test_deepspeed_without_zero_trains_as_a_single_process_does(tmp_path, grad_clip):
    # One process, fp32, ZeRO-0: the strategy clips the plain .grad itself and skips the engine's
    # all-reduce, so losses and grad norms must be those of plain PyTorch, clipped (0.05 is well
    # below the tiny model's norms) or not.
    histories = {}
    for name, sections in {"single": {"training": {"strategy": "single"}},
                           "deepspeed": {"training": {"strategy": "deepspeed"},
                                         "deepspeed": {"zero_optimization": {"stage": 0}}}}.items():
        sections["training"] = {"micro_batch_size": 4, "precision": "fp32", "threads": 1, **sections["training"]}
        config = load_config(tiny_config(tmp_path / name, optimizer={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                                                                     "grad_clip": grad_clip}, **sections))
        histories[name] = [(row["train/loss"], row["train/grad_norm"]) for row in Trainer(config).fit()
                           if "train/loss" in row]
    assert len(histories["single"]) == 6
    if grad_clip:
        assert min(norm for _, norm in histories["single"]) > grad_clip  # clipping really acted
    torch.testing.assert_close(histories["deepspeed"], histories["single"], rtol=1e-5, atol=1e-6)
