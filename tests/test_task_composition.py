"""Tasks are composed, not inherited: no registered task subclasses another; the model config is
resolved once; every task deals training batches through the one stream in tformer.data.dealing."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from tformer.data.dealing import BatchStream, ShuffledBatches, batches_per_rank, rank_share
from tformer.schema import ConfigError, check_choice
from tformer.tasks import TASKS, get_task_class
from tformer.tasks.base import Task, TaskVariant
from tformer.tasks.model_builder import ModelBuilder, round_vocab

REPO = Path(__file__).resolve().parents[1]


def _task_class(name):
    task = get_task_class(name)
    return task.task_class if isinstance(task, TaskVariant) else task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_no_task_subclasses_another(name):
    if name == "classify_hf":
        pytest.importorskip("transformers")
    cls = _task_class(name)
    others = {_task_class(other) for other in TASKS if other != "classify_hf" or _has_transformers()} - {cls}
    assert not [base.__name__ for base in inspect.getmro(cls)[1:] if base in others]
    assert cls.__bases__ == (Task,), cls.__bases__


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def test_classify_hf_is_classify_with_other_parts():
    pytest.importorskip("transformers")
    from tformer.models import SentenceClassifierConfig
    from tformer.tasks.classify import ClassificationTask

    variant = get_task_class("classify_hf")
    assert variant.task_class is ClassificationTask and variant.name == "classify_hf"
    assert variant.model_config_class is SentenceClassifierConfig
    assert variant.data_config_class is ClassificationTask.data_config_class


def test_model_builder_resolves_the_config_once_and_checks_it():
    calls = []

    @dataclasses.dataclass(kw_only=True)
    class Config:
        size: int = 1
        width: int = 8

        def __post_init__(self):
            calls.append(self.size)

        def to_dict(self):
            return dataclasses.asdict(self)

    def check(config):
        if config.size < 10:
            raise ConfigError("config: model.size too small")

    section = Config(width=4)
    calls.clear()
    builder = ModelBuilder(section, lambda config: ("model", config.size), lambda: {"size": 12}, check)
    assert builder.config() is builder.config() and builder.config_dict() == {"size": 12, "width": 4}
    assert builder.build() == ("model", 12) and calls == [12]
    with pytest.raises(ConfigError, match="too small"):
        ModelBuilder(section, None, lambda: {"size": 3}, check).config()
    assert [round_vocab(n) for n in (1, 64, 65, 257)] == [64, 64, 128, 320]


@pytest.mark.parametrize("num_items, batch_size, world_size", [(8, 2, 2), (9, 2, 2), (7, 3, 3), (1, 4, 2)])
def test_the_stream_gives_every_rank_as_many_batches_and_resumes_exactly(num_items, batch_size, world_size):
    order = ShuffledBatches(num_items, batch_size, seed=3)
    streams = [BatchStream(order, rank=rank, world_size=world_size) for rank in range(world_size)]
    per_rank = batches_per_rank(order, world_size)
    epoch = [[stream.next_indices() for _ in range(per_rank)] for stream in streams]
    assert all(stream.epoch == 0 for stream in streams)
    # The next draw starts the next epoch on every rank at once.
    assert {stream.next_indices_and_place()[1] for stream in streams} == set(range(world_size))
    assert all(stream.epoch == 1 for stream in streams)
    seen = [i for share in epoch for batch in share for i in batch]
    if len(order.batches(0)) >= world_size:  # else every rank gets one batch, some the same
        assert len(seen) == len(set(seen))
    state = streams[0].state_dict()
    expected = [streams[0].next_indices() for _ in range(5)]
    resumed = BatchStream(order, rank=0, world_size=world_size)
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(5)] == expected


def test_rank_share_splits_a_global_draw():
    assert [rank_share(list(range(6)), rank=r, world_size=3) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="does not split"):
        rank_share([1, 2, 3], rank=0, world_size=2)


def test_every_task_deals_its_training_batches_through_the_one_stream():
    """No task module slices data by rank itself: the dealing lives in tformer/data/dealing.py."""
    for module in sorted((REPO / "tformer" / "tasks").glob("*.py")):
        tree = ast.parse(module.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
                text = ast.unparse(node.slice)
                assert "rank" not in text and "world_size" not in text, (module.name, text)


def test_one_check_choice_with_one_error_type():
    assert check_choice("config: x", "a", ("a", "b")) == "a"
    with pytest.raises(ConfigError, match=r"Layer: argument 'norm' must be one of \('pre', 'post'\), got 'pree'. "
                                          r"Did you mean 'pre'\?"):
        check_choice("Layer: argument 'norm'", "pree", ("pre", "post"))
    assert not (REPO / "tformer" / "nn" / "choices.py").exists()
    sources = [path.read_text() for path in (REPO / "tformer").rglob("*.py")]
    assert sum(text.count("def check_choice(") for text in sources) == 1


def test_config_checks_does_not_import_the_config_module():
    tree = ast.parse((REPO / "tformer" / "training" / "config_checks.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "tformer.training.config" not in imported
