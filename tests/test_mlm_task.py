"""The 'mlm' task (masked-LM self-pretraining) and ``training.init_from`` on a small synthetic
IMDb archive: BERT masking statistics and determinism, the loss at the masked positions only,
the shared tokenizer and validation carve-out, the test split never read, a pretraining run
whose loss falls, and a classifier that starts from its trunk bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from imdb_synthetic import make_imdb_archive

from tformer.training.config import load_config, resolve_config_path
from tformer.data import bpe
from tformer.models import EncoderClassifier, EncoderClassifierConfig, EncoderMaskedLM
from tformer.tasks import get_task_class
from tformer.tasks import mlm as mlm_module
from tformer.tasks.base import cross_entropy_sum
from tformer.tasks.mlm import mask_tokens, split_into_chunks
from tformer.training.trainer import Trainer

TEST_MARKER = "zyzzyvatestonly"  # in every test review of the archive below, nowhere else


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz", per_class=100, unsup=40)


def task_config(task: str, archive, tmp_path, **sections) -> dict:
    """The shipped tiny pair (imdb_mlm_tiny / imdb_finetune_tiny) shrunk to the synthetic archive."""
    config = json.loads(resolve_config_path(f"imdb_{'mlm' if task == 'mlm' else 'finetune'}_tiny").read_text())
    config["model"] = {**config["model"], "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}
    config["data"] = {**config["data"], "path": str(archive), "cache_dir": str(tmp_path / "cache"),
                      "expected_per_class": None, "bpe_vocab_size": 320, "max_tokens": 40, "head_tokens": 10,
                      "val_size": 30, "val_limit": None}
    if task != "mlm":
        config["data"]["test_limit"] = None
    config["optimizer"] = {**config["optimizer"], "lr": 5e-3, "warmup_steps": 5}
    config["training"] = {**config["training"], "micro_batch_size": 16, "strategy": "single", "init_from": None}
    config["run"] = {**config["run"], "steps": 30, "eval_interval": 0, "eval_batches": 2, "final_eval_batches": None,
                     "log_interval": 10, "out_dir": str(tmp_path / task)}
    for section, values in sections.items():
        config[section] = {**config[section], **values}
    return config


def make_task(config: dict, **kwargs):
    task = get_task_class(config["task"])(load_config(config), **kwargs)
    task.prepare_data()
    task.load_data()
    return task


# ----------------------------------------------------------------------------- masking

def test_masking_follows_bert_statistics_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 500, (64, 256), generator=generator)
    lengths = torch.randint(1, 257, (64,), generator=generator)
    padding = torch.arange(256)[None, :] >= lengths[:, None]
    tokens[padding] = 0

    def run(seed):
        return mask_tokens(tokens, padding, mask_id=1, random_ids=(2, 500), probability=0.15,
                           generator=torch.Generator().manual_seed(seed))

    inputs, positions, targets = run(1)
    chosen = torch.zeros(tokens.numel(), dtype=torch.bool)
    chosen[positions] = True
    chosen = chosen.view_as(tokens)
    assert not chosen[padding].any()  # padding is never a prediction target
    assert torch.equal(inputs[padding], tokens[padding]) and torch.equal(inputs[~chosen], tokens[~chosen])
    assert torch.equal(targets, tokens.flatten()[positions]) and torch.equal(positions, positions.sort().values)
    assert chosen.any(dim=1).all()  # at least one per sequence, even a one-token review
    real = int((~padding).sum())
    assert abs(len(positions) / real - 0.15) < 0.01
    masked = inputs.flatten()[positions] == 1
    kept = inputs.flatten()[positions] == targets
    randomised = ~masked & ~kept
    assert abs(masked.float().mean().item() - 0.8) < 0.03
    assert abs(kept.float().mean().item() - 0.1) < 0.03  # unchanged, plus random draws equal to the original
    assert abs(randomised.float().mean().item() - 0.1) < 0.03
    assert inputs.flatten()[positions][randomised].min() >= 2  # never a special token

    again = run(1)
    assert all(torch.equal(a, b) for a, b in zip((inputs, positions, targets), again))
    assert not torch.equal(run(2)[1], positions)


def test_long_reviews_are_cut_into_near_equal_chunks():
    chunks = split_into_chunks(list(range(10)), 4)
    assert [len(c) for c in chunks] == [3, 4, 3] and sum(chunks, []) == list(range(10))  # not 4 + 4 + 2
    assert split_into_chunks([5, 6], 4) == [[5, 6]] and split_into_chunks([], 4) == []


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_mlm_model_shares_the_classifier_trunk_and_predicts_only_where_asked(pooling):
    config = EncoderClassifierConfig(vocab_size=64, max_seq_len=12, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                     pooling=pooling, backend="reference")
    classifier, mlm = EncoderClassifier(config), EncoderMaskedLM(config).eval()
    trunk = {k: v.shape for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    assert trunk == {k: v.shape for k, v in mlm.state_dict().items() if not k.startswith("head.")}
    tokens = torch.randint(2, 64, (3, 10))
    padding = torch.arange(10)[None, :] >= torch.tensor([10, 4, 7])[:, None]
    positions = torch.tensor([0, 9, 12, 21, 26])
    with torch.no_grad():
        everywhere = mlm(tokens, key_padding_mask=padding)
        selected = mlm(tokens, key_padding_mask=padding, prediction_positions=positions)
    assert everywhere.shape == (3, 10, 64) and selected.shape == (5, 64)
    torch.testing.assert_close(selected, everywhere.reshape(30, 64)[positions])
    # The output projection is the token embedding (tied): id 1 is never an input, yet its
    # embedding row gets a gradient, through the head.
    assert all(p.shape != (64, 16) for p in mlm.head.parameters())
    mlm(tokens, key_padding_mask=padding, prediction_positions=positions).logsumexp(-1).sum().backward()
    assert mlm.token_embedding.weight.grad[1].abs().sum() > 0


# ----------------------------------------------------------------------------- task

def test_loss_is_counted_at_the_masked_positions_only(archive, tmp_path):
    task = make_task(task_config("mlm", archive, tmp_path))
    torch.manual_seed(0)
    model = task.build_model().eval()
    batch = task.next_train_batch()
    loss, count = task.loss_sum(model, batch)
    assert count == len(batch["positions"]) == len(batch["targets"]) > 0
    with torch.no_grad():
        everywhere = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"])
    flat = everywhere.reshape(-1, everywhere.shape[-1])
    expected = cross_entropy_sum(flat[batch["positions"]], batch["targets"])
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-4)
    assert not batch["key_padding_mask"].flatten()[batch["positions"]].any()


def test_batches_and_masks_resume_exactly(archive, tmp_path):
    config = task_config("mlm", archive, tmp_path)
    task = make_task(config)
    for _ in range(14):  # past the first epoch boundary
        task.next_train_batch()
    state = json.loads(json.dumps(task.state_dict()))
    expected = [task.next_train_batch() for _ in range(3)]
    resumed = make_task(config)
    resumed.load_state_dict(state)
    for batch in expected:
        again = resumed.next_train_batch()
        assert all(torch.equal(batch[key], again[key]) for key in ("tokens", "positions", "targets", "indices"))


def test_mlm_shares_the_tokenizer_and_split_and_never_reads_the_test_split(archive, tmp_path, monkeypatch):
    real_load = mlm_module.load_imdb

    def load_with_marked_test(*args, **kwargs):
        splits = real_load(*args, **kwargs)
        splits["test"].texts[:] = [f"{TEST_MARKER} {text}" for text in splits["test"].texts]
        return splits

    monkeypatch.setattr(mlm_module, "load_imdb", load_with_marked_test)
    mlm_task = make_task(task_config("mlm", archive, tmp_path))
    classify_task = make_task(task_config("classify", archive, tmp_path))
    assert mlm_task.tokenizer.to_str() == classify_task.tokenizer.to_str()
    assert bpe.mask_id(mlm_task.tokenizer) == 1 and bpe.pad_id(mlm_task.tokenizer) == 0
    assert mlm_task._raw["train"].names == classify_task._raw["train"].names
    assert mlm_task._raw["val"].names == classify_task._raw["val"].names
    assert len(mlm_task._raw["unsup"]) == 40 and "test" not in mlm_task._raw
    # Train minus validation, plus unsup, whole: every token once, in chunks of at most max_tokens.
    pretraining_texts = mlm_task._raw["train"].texts + mlm_task._raw["unsup"].texts
    assert len(pretraining_texts) == 170 + 40
    chunks = mlm_task.splits["train"].ids
    assert sum(chunks, []) == sum(bpe.encode(mlm_task.tokenizer, pretraining_texts), [])
    assert max(len(chunk) for chunk in chunks) <= 40 and len(chunks) > len(pretraining_texts)
    seen = "".join(mlm_task.tokenizer.decode(ids) for split in ("train", "val") for ids in mlm_task.splits[split].ids)
    assert TEST_MARKER not in seen and mlm_task.eval_splits(final=True) == ["val"]
    with pytest.raises(ValueError, match="'test'"):
        mlm_task._split("test")
    with pytest.raises(Exception, match="never reads the test split"):
        load_config(task_config("mlm", archive, tmp_path, data={"test_at_end": True}))


# ----------------------------------------------------------------------------- runs and init_from

@pytest.fixture(scope="module")
def pretrained(archive, tmp_path_factory):
    """One short MLM run through tformer/train.py: (its history, its out_dir)."""
    tmp_path = tmp_path_factory.mktemp("mlm_run")
    history = Trainer(load_config(task_config("mlm", archive, tmp_path, run={"eval_interval": 15}))).fit()
    return history, tmp_path / "mlm", tmp_path


def test_mlm_loss_falls_and_the_run_exports(pretrained):
    history, out_dir, _ = pretrained
    first, last = history[0]["train/loss"], sum(h["train/loss"] for h in history[-5:]) / 5
    assert last < first - 1.0, (first, last)  # ln(320) = 5.8 at the start; filler words are ~uniform
    assert "val/loss" in history[14] and history[-1]["val/loss"] < math.log(320) - 1.0
    assert 0.0 <= history[-1]["val/accuracy"] <= 1.0
    exported = json.loads((out_dir / "export" / "config.json").read_text())
    assert exported["model_class"] == "EncoderMaskedLM" and "tokenizer" in exported["metadata"]


def test_init_from_loads_the_trunk_bit_exactly_and_leaves_the_head_fresh(archive, pretrained, capsys):
    from safetensors.torch import load_file

    _, out_dir, tmp_path = pretrained
    config = load_config(task_config("classify", archive, tmp_path, training={"init_from": str(out_dir)},
                                     run={"steps": 2, "export": False}))
    trainer = Trainer(config)
    stored = load_file(str(out_dir / "export" / "model.safetensors"))
    state = trainer.raw_model.state_dict()
    trunk = [key for key in state if not key.startswith("head.")]
    assert trunk and all(torch.equal(state[key], stored[key]) for key in trunk)
    torch.manual_seed(config.training.seed)
    fresh = trainer.task.build_model()
    assert torch.equal(state["head.weight"], fresh.head.weight) and torch.equal(state["head.bias"], fresh.head.bias)
    assert "fresh: ['head.bias', 'head.weight']" in trainer.init_from_summary
    capsys.readouterr()
    trainer.fit()
    assert trainer.init_from_summary in capsys.readouterr().out
    # --resume takes the weights from the checkpoint: init_from is not even looked at.
    config = task_config("classify", archive, tmp_path, training={"init_from": str(tmp_path / "gone")},
                         run={"steps": 2, "export": False})
    resumed = Trainer(load_config(config), resume=True)
    assert resumed.step == 2 and resumed.init_from_summary is None


def test_init_from_errors_name_what_is_wrong(archive, pretrained, tmp_path):
    from safetensors.torch import load_file, save_file

    _, out_dir, shared_tmp = pretrained

    def task_config(*args, **sections):  # the shared tokenizer cache, but a run folder of this test's own
        config = globals()["task_config"](*args, **sections)
        config["run"]["out_dir"] = str(tmp_path / "classify")
        return config

    missing = tmp_path / "no_such_run"
    # A mistyped path fails before the data is read (data.path is wrong too, and is not reached).
    with pytest.raises(FileNotFoundError, match="no_such_run.*does not exist"):
        Trainer(load_config(task_config("classify", tmp_path / "absent.tar.gz", shared_tmp,
                                        training={"init_from": str(missing)})))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        Trainer(load_config(task_config("classify", archive, shared_tmp, training={"init_from": str(empty)})))
    with pytest.raises(ValueError, match="d_model: 32 there, 48 here"):
        Trainer(load_config(task_config("classify", archive, shared_tmp, model={"d_model": 48},
                                        training={"init_from": str(out_dir)})))
    # Weights without a config.json: the per-tensor check names the key, both shapes and the file.
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    tensors = load_file(str(out_dir / "export" / "model.safetensors"))
    tensors["final_norm.weight"] = torch.ones(31)
    save_file(tensors, str(weights_only / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'final_norm.weight' has shape \(31,\) in .*weights_only.* but \(32,\)"):
        Trainer(load_config(task_config("classify", archive, shared_tmp, training={"init_from": str(weights_only)})))
    del tensors["final_norm.weight"]
    save_file(tensors, str(weights_only / "model.safetensors"))
    with pytest.raises(ValueError, match="has no tensor 'final_norm.weight'"):
        Trainer(load_config(task_config("classify", archive, shared_tmp, training={"init_from": str(weights_only)})))
    # Another validation carve-out trains another tokenizer: same shapes, different ids.
    with pytest.raises(ValueError, match="tokenizer recorded in .* differs"):
        Trainer(load_config(task_config("classify", archive, shared_tmp, data={"split_seed": 1},
                                        training={"init_from": str(out_dir)})))


def test_shipped_pairs_agree_on_model_and_data(tmp_path):
    """Each pretraining config and its fine-tune config share the trunk and the tokenizer's inputs,
    and the fine-tune starts from the pretraining run's out_dir."""
    shared_data = ("path", "bpe_vocab_size", "bpe_min_frequency", "max_tokens", "val_size", "split_seed",
                   "train_limit")
    for pretrain, finetune in (("imdb_mlm", "imdb"), ("imdb_mlm_tiny", "imdb_finetune_tiny")):
        first, second = load_config(pretrain), load_config(finetune)
        assert first.task == "mlm" and second.task == "classify"
        strip = ("dropout", "attn_dropout")
        first_model, second_model = first.to_dict()["model"], second.to_dict()["model"]  # the keys each file sets
        assert {k: v for k, v in first_model.items() if k not in strip} == \
            {k: v for k, v in second_model.items() if k not in strip}
        assert all(getattr(first.data, key) == getattr(second.data, key) for key in shared_data), (pretrain, finetune)
        assert second.training.init_from == first.run.out_dir
