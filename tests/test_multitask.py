"""Multi-task learning: the heads' shapes and padding masks, the weighted loss against a hand
sum, gradients of the learned uncertainty weights, the task sampler per schedule and its exact
resume, the task's batch streams and resume through the trainer, config errors, and a tiny
run (synthetic IMDb + synthetic NER) that beats chance on every task."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from imdb_synthetic import make_imdb_archive

from tformer.models import MultiTaskConfig, MultiTaskLoss, MultiTaskModel
from tformer.models.multitask import IGNORE_INDEX
from tformer.tasks import get_task_class
from tformer.tasks.task_sampler import TaskSampler
from tformer.training.config import ConfigError, load_config
from tformer.training.trainer import Trainer

HEADS = {"sentiment": {"kind": "classification", "dropout": 0.0},
         "rating": {"kind": "regression", "dropout": 0.0, "bounds": [1.0, 10.0], "loss": "huber"},
         "ner": {"kind": "token_classification", "num_labels": 5, "dropout": 0.0}}


def tiny_model(uncertainty: bool = False, **head_changes) -> MultiTaskModel:
    heads = {name: {**head, **head_changes.get(name, {})} for name, head in HEADS.items()}
    torch.manual_seed(0)
    return MultiTaskModel(MultiTaskConfig.from_dict({
        "vocab_size": 50, "max_seq_len": 16, "d_model": 16, "n_layers": 1, "n_heads": 2, "backend": "reference",
        "heads": heads, "uncertainty_weighting": uncertainty}))


def padded_batch(lengths=(5, 8, 3), width=8, seed=1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (len(lengths), width), generator=generator)
    mask = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    return {"tokens": tokens.masked_fill(mask, 0), "key_padding_mask": mask}


def token_labels(batch: dict, seed=2) -> torch.Tensor:
    labels = torch.randint(0, 5, batch["tokens"].shape, generator=torch.Generator().manual_seed(seed))
    labels[:, 1::3] = IGNORE_INDEX  # non-first sub-tokens
    return labels.masked_fill(batch["key_padding_mask"], IGNORE_INDEX)


# --- heads ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uncertainty", [False, True])
def test_forward_never_reads_a_tensor_on_the_host(uncertainty, monkeypatch):
    # A host read of a device tensor (bool(t), t.item(), t.tolist(), torch.tensor(...) of a host
    # value) syncs with the device. CPU tensors stand in for device ones here: every such read
    # fails while the forward passes run. The token head's padding-label check reads labels on
    # the host on purpose when they are CPU tensors, so its batch here has no padding mask.
    model = tiny_model(uncertainty=uncertainty)
    batch = padded_batch()
    labelled = {"sentiment": {**batch, "labels": torch.tensor([0, 1, 1])},
                "rating": {**batch, "labels": torch.tensor([2.0, 7.5, 9.0])},
                "ner": {"tokens": batch["tokens"], "labels": token_labels(batch)}}
    for name in ("__bool__", "item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, lambda *args, name=name: pytest.fail(f"forward called Tensor.{name}"))
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: pytest.fail("forward called torch.tensor"))
    results = {task: model(task_batch, task=task) for task, task_batch in labelled.items()}
    monkeypatch.undo()
    for task, result in results.items():
        assert torch.isfinite(result["weighted_loss"]), task
    assert int(results["rating"]["count"]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode detects "
                    "host syncs on a CUDA device only")
def test_forward_does_not_sync_a_cuda_device():
    model = tiny_model().cuda()
    batch = {key: value.cuda() for key, value in padded_batch().items()}
    labelled = {"sentiment": {**batch, "labels": torch.tensor([0, 1, 1], device="cuda")},
                "rating": {**batch, "labels": torch.tensor([2.0, 7.5, 9.0], device="cuda")},
                "ner": {**batch, "labels": token_labels(padded_batch()).cuda()}}
    for task, task_batch in labelled.items():  # warm up: lazy initialization may sync once
        model(task_batch, task=task)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for task, task_batch in labelled.items():
            model(task_batch, task=task)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_token_labels_at_padding_are_refused_on_the_cpu_and_never_counted():
    model = tiny_model()
    batch = padded_batch()
    labels = token_labels(batch)
    bad = labels.masked_fill(batch["key_padding_mask"], 1)
    with pytest.raises(ValueError, match="padding positions must be -100"):
        model({**batch, "labels": bad}, task="ner")
    assert int(model({**batch, "labels": labels}, task="ner")["count"]) == int((labels != IGNORE_INDEX).sum())


def test_head_shapes_bounds_and_predictions():
    model = tiny_model().eval()
    batch = padded_batch()
    assert model(batch, task="sentiment")["output"].shape == (3, 2)
    assert model(batch, task="ner")["output"].shape == (3, 8, 5)
    scores = model(batch, task="rating")["output"]
    assert scores.shape == (3,)
    with torch.no_grad():  # a huge pre-sigmoid output still lands inside [lo, hi]
        model.head.tasks["rating"].linear.bias.fill_(1e4)
    assert torch.all(model.predict(batch, "rating")["scores"] <= 10.0)
    predicted = model.predict(batch, "sentiment")
    assert torch.allclose(predicted["probs"].sum(-1), torch.ones(3))
    assert torch.equal(predicted["labels"], predicted["probs"].argmax(-1))
    tags = model.predict(batch, "ner")["tags"]
    assert torch.all(tags[batch["key_padding_mask"]] == IGNORE_INDEX)
    assert torch.all(tags[~batch["key_padding_mask"]] >= 0)
    with pytest.raises(ValueError, match="'task' must be one of"):
        model(batch, task="pos_tags")


def test_padding_never_counts_in_the_token_loss():
    model = tiny_model().eval()
    batch = padded_batch()
    labels = token_labels(batch)
    result = model({**batch, "labels": labels}, task="ner")
    assert result["count"].item() == int((labels != IGNORE_INDEX).sum())
    # Other tokens under the padding change nothing (masked keys, ignored labels).
    noisy = {**batch, "tokens": batch["tokens"].masked_fill(batch["key_padding_mask"], 7), "labels": labels}
    torch.testing.assert_close(model(noisy, task="ner")["loss"], result["loss"])
    # The loss by hand, over the labelled real tokens only.
    logits = result["output"].reshape(-1, 5)
    keep = labels.reshape(-1) != IGNORE_INDEX
    torch.testing.assert_close(result["loss"], F.cross_entropy(logits[keep], labels.reshape(-1)[keep]))
    bad = labels.clone()
    bad[0, 7] = 1  # a label on a padding position
    with pytest.raises(ValueError, match="padding positions"):
        model({**batch, "labels": bad}, task="ner")


# --- loss weighting ---------------------------------------------------------------------------------
def head_losses(model, batch) -> dict:
    """Each head's mean loss, computed here from its raw output."""
    labels = {"sentiment": torch.tensor([0, 1, 1]), "rating": torch.tensor([2.0, 9.0, 4.0]),
              "ner": token_labels(batch)}
    by_hand, results = {}, {}
    for task, target in labels.items():
        results[task] = model({**batch, "labels": target}, task=task)
        output = results[task]["output"]
        if task == "sentiment":
            by_hand[task] = F.cross_entropy(output, target, label_smoothing=0.1)
        elif task == "rating":
            by_hand[task] = F.huber_loss(output, target, delta=1.0)
        else:
            keep = target.reshape(-1) != IGNORE_INDEX
            by_hand[task] = F.cross_entropy(output.reshape(-1, 5)[keep], target.reshape(-1)[keep])
    return by_hand, results


def test_weighted_loss_equals_the_hand_sum():
    model = tiny_model(sentiment={"weight": 2.0, "label_smoothing": 0.1}, rating={"weight": 0.5},
                       ner={"weight": 1.5}).eval()
    by_hand, results = head_losses(model, padded_batch())
    total = sum(results[t]["weighted_loss"] for t in results)
    expected = 2.0 * by_hand["sentiment"] + 0.5 * by_hand["rating"] + 1.5 * by_hand["ner"]
    torch.testing.assert_close(total, expected)
    assert results["rating"]["task_weight"].item() == 0.5


def test_uncertainty_weighting_formula_and_gradients():
    model = tiny_model(uncertainty=True, sentiment={"label_smoothing": 0.1}).eval()
    log_vars = torch.tensor([0.3, -0.4, 0.1])  # sentiment, rating, ner (declaration order)
    with torch.no_grad():
        model.head.weighting.log_vars.copy_(log_vars)
    by_hand, results = head_losses(model, padded_batch())
    # Kendall et al. 2018: exp(-s) L + s/2 (softmax), exp(-s)/2 L + s/2 (Gaussian).
    scales = {"sentiment": 1.0, "rating": 0.5, "ner": 1.0}
    total = 0.0
    for index, task in enumerate(("sentiment", "rating", "ner")):
        s = log_vars[index]
        expected = scales[task] * torch.exp(-s) * by_hand[task] + 0.5 * s
        torch.testing.assert_close(results[task]["weighted_loss"], expected)
        total = total + results[task]["weighted_loss"]
    total.backward()
    grad = model.head.weighting.log_vars.grad
    # d/ds (c e^-s L + s/2) = -c e^-s L + 1/2 for each task.
    for index, task in enumerate(("sentiment", "rating", "ner")):
        expected = -scales[task] * math.exp(-log_vars[index].item()) * by_hand[task].item() + 0.5
        assert grad[index].item() == pytest.approx(expected, rel=1e-5)
    # One task's loss reaches only its own weight.
    model.zero_grad()
    model({**padded_batch(), "labels": torch.tensor([0, 1, 1])}, task="sentiment")["weighted_loss"].backward()
    assert model.head.weighting.log_vars.grad[0] != 0 and torch.all(model.head.weighting.log_vars.grad[1:] == 0)


def test_loss_module_checks_its_arguments():
    with pytest.raises(ValueError, match="kind"):
        MultiTaskLoss({"a": "ranking"}, {"a": 1.0})
    with pytest.raises(ValueError, match="unknown task"):
        MultiTaskLoss({"a": "regression"}, {"a": 1.0})("b", torch.tensor(1.0))


# --- task sampling ----------------------------------------------------------------------------------
def test_round_robin_cycles_in_order():
    sampler = TaskSampler(["a", "b", "c"], [10, 1, 5], schedule="round_robin")
    assert [sampler.next() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


@pytest.mark.parametrize("schedule, temperature, expected", [
    ("proportional", 1.0, [0.9, 0.1]),
    ("temperature", 2.0, [0.75, 0.25]),  # sqrt(900) : sqrt(100) = 30 : 10
    ("temperature", 1e9, [0.5, 0.5]),  # T -> infinity: uniform
])
def test_sampled_schedules_follow_their_probabilities(schedule, temperature, expected):
    sampler = TaskSampler(["big", "small"], [900, 100], schedule=schedule, temperature=temperature, seed=5)
    assert sampler.probabilities.tolist() == pytest.approx(expected)
    draws = [sampler.next() for _ in range(4000)]
    assert Counter(draws)["big"] / 4000 == pytest.approx(expected[0], abs=0.03)
    again = TaskSampler(["big", "small"], [900, 100], schedule=schedule, temperature=temperature, seed=5)
    assert [again.next() for _ in range(4000)] == draws  # deterministic under the seed


@pytest.mark.parametrize("schedule", ["round_robin", "proportional", "temperature"])
def test_sampler_resumes_exactly(schedule):
    sampler = TaskSampler(["a", "b", "c"], [50, 20, 5], schedule=schedule, seed=9)
    for _ in range(13):
        sampler.next()
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(30)]
    resumed = TaskSampler(["a", "b", "c"], [50, 20, 5], schedule=schedule, seed=123)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(30)] == expected


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        TaskSampler(["a"], [1], schedule="uniform")
    with pytest.raises(ValueError, match="temperature"):
        TaskSampler(["a"], [1], schedule="temperature", temperature=0.0)


# --- the task -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz", per_class=100)


def multitask_config(archive, tmp_path, heads=HEADS, **sections) -> dict:
    heads = {name: {k: v for k, v in head.items() if k != "num_labels"} for name, head in heads.items()}
    config = {
        "task": "multitask",
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "backend": "reference", "heads": heads},
        "data": {"path": str(archive), "cache_dir": str(tmp_path / "cache"), "expected_per_class": None,
                 "bpe_vocab_size": 400, "max_tokens": 40, "head_tokens": 10, "val_size": 40, "ner_synthetic": True,
                 "ner_synthetic_train": 300, "ner_synthetic_eval": 60},
        "optimizer": {"lr": 5e-3, "min_lr": 5e-4, "warmup_steps": 5, "weight_decay": 0.01},
        "training": {"micro_batch_size": 16, "precision": "fp32", "strategy": "single", "threads": 2},
        "run": {"steps": 150, "eval_interval": 0, "eval_batches": 2, "final_eval_batches": None, "log_interval": 30,
                "out_dir": str(tmp_path / "run")},
        "logging": {"progress_bar": False, "wandb": False, "layer_grad_norms": False},
    }
    for section, values in sections.items():
        config[section] = {**config[section], **values}
    return config


def make_task(config: dict):
    task = get_task_class("multitask")(load_config(config))
    task.prepare_data()
    task.load_data()
    return task


def test_task_batches_are_aligned_and_resume_exactly(archive, tmp_path):
    config = multitask_config(archive, tmp_path, data={"schedule": "temperature", "temperature": 3.0})
    task = make_task(config)
    first = [task.next_train_batch() for _ in range(40)]  # past an epoch of every stream
    assert {b["task"] for b in first} == {"sentiment", "rating", "ner"}
    ner = next(b for b in first if b["task"] == "ner")
    assert torch.all(ner["labels"][ner["key_padding_mask"]] == IGNORE_INDEX)
    # Each word's first sub-token is labelled: as many labels as words.
    sentence = task._ner("train")[int(ner["indices"][0])]
    assert int((ner["labels"][0] != IGNORE_INDEX).sum()) == len(sentence.words)
    rating = next(b for b in first if b["task"] == "rating")
    assert rating["labels"].dtype == torch.float32 and set(rating["labels"].tolist()) <= set(range(1, 11))
    state = json.loads(json.dumps(task.state_dict(), default=lambda t: t.tolist()))  # survives serialisation
    state["sampler"]["generator"] = torch.tensor(state["sampler"]["generator"], dtype=torch.uint8)
    expected = [task.next_train_batch() for _ in range(20)]
    resumed = make_task(config)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_train_batch()
        assert got["task"] == want["task"] and torch.equal(got["tokens"], want["tokens"])
        assert torch.equal(got["labels"], want["labels"])


def test_bad_multitask_settings_are_rejected(archive, tmp_path):
    with pytest.raises(ConfigError, match="unknown task"):
        load_config(multitask_config(archive, tmp_path, heads={"pos_tags": {}}))
    with pytest.raises(ConfigError, match="must be 'regression'"):
        load_config(multitask_config(archive, tmp_path, heads={"rating": {"kind": "classification"}}))
    with pytest.raises(ConfigError, match="schedule"):
        load_config(multitask_config(archive, tmp_path, data={"schedule": "uniform"}))
    with pytest.raises(ConfigError, match="ner_path"):
        get_task_class("multitask")(load_config(multitask_config(archive, tmp_path, data={"ner_synthetic": False})))


def test_resume_through_the_trainer_is_exact(archive, tmp_path):
    heads = {"sentiment": HEADS["sentiment"], "ner": HEADS["ner"]}
    cache = {"cache_dir": str(tmp_path / "cache")}  # one tokenizer for both runs
    straight = Trainer(load_config(multitask_config(
        archive, tmp_path / "a", heads=heads, data={"schedule": "proportional", "test_at_end": False, **cache},
        model={"uncertainty_weighting": True}, optimizer={"decay_steps": 8},
        run={"steps": 8, "log_interval": 1, "export": False, "final_eval_batches": 1}))).fit()
    config = multitask_config(archive, tmp_path / "b", heads=heads,
                              data={"schedule": "proportional", "test_at_end": False, **cache},
                              model={"uncertainty_weighting": True}, optimizer={"decay_steps": 8},
                              run={"steps": 4, "log_interval": 1, "export": False, "final_eval_batches": 1})
    Trainer(load_config(config)).fit()
    config["run"]["steps"] = 8
    resumed = Trainer(load_config(config), resume=True).fit()
    assert [h["train/loss"] for h in resumed] == [h["train/loss"] for h in straight[4:]]


@pytest.mark.slow
def test_tiny_multitask_run_beats_chance_on_every_task(archive, tmp_path):
    config = multitask_config(archive, tmp_path, model={"uncertainty_weighting": True})
    trainer = Trainer(load_config(config))
    final = trainer.fit()[-1]
    # Chance: 50% sentiment; rating: the MAE of always predicting the training mean; NER F1 ~ 0.
    ratings = torch.tensor(trainer.task._encoded("rating", "train").targets)
    test_ratings = torch.tensor(trainer.task._encoded("rating", "test").targets)
    baseline_mae = (test_ratings - ratings.mean()).abs().mean().item()
    assert final["test/sentiment/accuracy"] >= 0.8, final
    assert final["test/rating/mae"] < 0.7 * baseline_mae and final["test/rating/spearman"] > 0.5, final
    assert final["test/ner/f1"] >= 0.2 and final["test/ner/token_accuracy"] > 0.7, final
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {key for record in log for key in record}
    for task in ("sentiment", "rating", "ner"):
        assert {f"train/{task}/loss", f"train/{task}/weight"} <= logged
    # The export reloads as a MultiTaskModel and predicts as the trainer scored.
    model = MultiTaskModel.from_pretrained(tmp_path / "run" / "export")
    assert model.config == trainer.task.model_config()
    batch = next(trainer.task.eval_batches("test", True, "sentiment"))
    assert torch.equal(model.predict(batch, "sentiment")["labels"],
                       trainer.raw_model.eval()(batch, task="sentiment")["output"].argmax(-1))
