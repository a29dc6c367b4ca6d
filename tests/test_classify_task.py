"""The 'classify' task on a small synthetic IMDb archive: batches and masks, resumable batch
order, padding-invariant logits, sharded evaluation, a full run through tformer/train.py with
export, and the ``tformer classify`` command."""

from __future__ import annotations

import json

import pytest
import torch
from imdb_synthetic import make_imdb_archive

from tformer.cli.classify import main as classify_main
from tformer.generation.classify import TextClassifier
from tformer.training.config import ConfigError, load_config
from tformer.tasks import get_task_class
from tformer.training.trainer import Trainer


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz", per_class=100)


def classify_config(archive, tmp_path, **sections) -> dict:
    config = {
        "task": "classify",
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "pooling": "mean", "backend": "reference"},
        "data": {"path": str(archive), "cache_dir": str(tmp_path / "cache"), "expected_per_class": None,
                 "bpe_vocab_size": 320, "max_tokens": 40, "head_tokens": 10, "val_size": 30, "show_misclassified": 2},
        "optimizer": {"lr": 5e-3, "min_lr": 5e-4, "warmup_steps": 5, "weight_decay": 0.01},
        "training": {"micro_batch_size": 16, "precision": "fp32", "strategy": "single", "threads": 2},
        "run": {"steps": 80, "eval_interval": 40, "eval_batches": 1, "final_eval_batches": None, "log_interval": 10,
                "out_dir": str(tmp_path / "run")},
        "logging": {"progress_bar": False, "wandb": False, "layer_grad_norms": False},
    }
    for section, values in sections.items():
        config[section] = {**config[section], **values}
    return config


def make_task(config: dict, **kwargs):
    task = get_task_class("classify")(load_config(config), **kwargs)
    task.prepare_data()
    task.load_data()
    return task


def test_train_batches_are_truncated_masked_and_resumable(archive, tmp_path):
    task = make_task(classify_config(archive, tmp_path))
    assert len(task.splits["train"].ids) == 170 and len(task.splits["val"].ids) == 30
    assert max(len(ids) for ids in task.splits["train"].ids) == 40  # head+tail cut the long reviews
    batch = task.next_train_batch()
    lengths = (~batch["key_padding_mask"]).sum(dim=1)
    assert batch["tokens"].shape[0] == 16 and batch["tokens"].shape[1] % 8 == 0
    assert torch.equal(batch["tokens"][batch["key_padding_mask"]], torch.zeros_like(lengths).new_zeros(
        int(batch["key_padding_mask"].sum())))  # padding is <pad> = 0
    assert lengths.max() - lengths.min() <= lengths.max() // 2 + 8  # bucketed: similar lengths
    for _ in range(11):  # cross an epoch boundary (11 batches per epoch)
        task.next_train_batch()
    state = task.state_dict()
    expected = [task.next_train_batch()["indices"].tolist() for _ in range(3)]
    resumed = make_task(classify_config(archive, tmp_path))
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [resumed.next_train_batch()["indices"].tolist() for _ in range(3)] == expected
    assert state["epoch"] == 1


def test_logits_do_not_depend_on_padding(archive, tmp_path):
    task = make_task(classify_config(archive, tmp_path, model={"pooling": "cls"}))
    torch.manual_seed(0)
    model = task.build_model().eval()
    lengths = [len(ids) for ids in task.splits["train"].ids]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    together = task._batch(task.splits["train"], [short, long])
    alone = task._batch(task.splits["train"], [short])
    assert together["tokens"].shape[1] > alone["tokens"].shape[1]
    with torch.no_grad():
        logits_together = model(together["tokens"], key_padding_mask=together["key_padding_mask"])
        logits_alone = model(alone["tokens"], key_padding_mask=alone["key_padding_mask"])
    torch.testing.assert_close(logits_together[0], logits_alone[0], atol=1e-5, rtol=1e-5)


def test_evaluation_shards_cover_every_review_once(archive, tmp_path):
    config = classify_config(archive, tmp_path, data={"eval_batch_size": 7})
    seen, counts = [], []
    for rank in range(2):
        task = make_task(config, rank=rank, world_size=2)
        batches = list(task.eval_batches("val", final=True))
        counts.append(len(batches))
        seen += [i for b in batches for i, w in zip(b["indices"].tolist(), b["weights"].tolist()) if w > 0]
    assert counts[0] == counts[1] and sorted(seen) == list(range(30))


def test_bad_data_settings_are_rejected(archive, tmp_path):
    with pytest.raises(ConfigError, match="head_tokens"):
        load_config(classify_config(archive, tmp_path, data={"head_tokens": 41}))
    with pytest.raises(ConfigError, match="Did you mean 'max_tokens'"):
        load_config(classify_config(archive, tmp_path, data={"max_token": 40}))


def test_train_run_reports_metrics_exports_and_cli_classifies(archive, tmp_path, capsys):
    trainer = Trainer(load_config(classify_config(archive, tmp_path)))
    history = trainer.fit()
    final = history[-1]
    for split, size in (("val", 30), ("test", 200)):
        confusion = [final[f"{split}/confusion/{t}_as_{p}"] for t in ("neg", "pos") for p in ("neg", "pos")]
        assert sum(confusion) == size
        assert final[f"{split}/accuracy"] == pytest.approx((confusion[0] + confusion[3]) / size)
        assert 0.0 <= final[f"{split}/f1"] <= 1.0
    # The cue words are easy: a 1-layer model learns them within 80 steps.
    assert final["test/accuracy"] >= 0.8, final
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("val/accuracy" in line for line in log)
    assert any("misclassified" in line or "confusion matrix" in line for line in log)

    # The CLI reproduces the trainer's test accuracy from raw text: same cleaning, BPE and truncation.
    task = trainer.task
    test = task._raw["test"]
    classifier = TextClassifier(tmp_path / "run")
    predictions = classifier.predict(test.texts)
    correct = sum(("neg", "pos")[label] == predicted for label, (predicted, _, _) in zip(test.labels, predictions))
    assert correct / len(test) == pytest.approx(final["test/accuracy"])
    capsys.readouterr()
    assert classify_main(["--checkpoint", str(tmp_path / "run" / "export"), "a wonderful superb film",
                          "the worst awful waste"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["pos", "neg"]
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in lines)


def test_cli_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        classify_main(["--checkpoint", str(tmp_path), "text"])


def test_accumulated_gradient_equals_one_big_batch(archive, tmp_path):
    """Two micro-batches of different padding widths give the gradient of the joint batch:
    loss sums over the global count (tformer/train.py), and padding changes no logit."""
    from tformer.training.strategies import accumulated_backward

    task = make_task(classify_config(archive, tmp_path))
    torch.manual_seed(0)
    model = task.build_model()
    lengths = [len(ids) for ids in task.splits["train"].ids]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    first, second = order[:3], order[-5:]  # short and long reviews: very different padding
    grads = []
    for batches in ([task._batch(task.splits["train"], first), task._batch(task.splits["train"], second)],
                    [task._batch(task.splits["train"], first + second)]):
        model.zero_grad()
        accumulated_backward(model, task, batches, global_count=8, world_size=1, label_smoothing=0.1)
        grads.append([p.grad.clone() for p in model.parameters()])
    for split_grad, joint_grad in zip(*grads):
        torch.testing.assert_close(split_grad, joint_grad, atol=1e-6, rtol=1e-5)


def test_bf16_checkpointing_accumulation_and_smoothing_run(archive, tmp_path):
    config = classify_config(archive, tmp_path, model={"n_layers": 2, "dropout": 0.1},
                             training={"precision": "bf16", "activation_checkpointing": True, "grad_accum_steps": 2,
                                       "label_smoothing": 0.1},
                             run={"steps": 3, "eval_interval": 0, "export": False})
    trainer = Trainer(load_config(config))
    history = trainer.fit()
    assert trainer.precision == "bf16" and len(history) == 3
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history)
    assert history[-1]["train/items"] == 32 and 0.0 <= history[-1]["test/accuracy"] <= 1.0
