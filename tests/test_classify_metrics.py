"""Accuracy, F1 and the confusion matrix, checked against hand-computed values."""

import pytest
import torch

from tformer.tasks.metrics import classification_metrics, confusion_matrix, format_confusion


def test_binary_metrics_by_hand():
    targets = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    predictions = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    confusion = confusion_matrix(predictions, targets, 2)
    assert confusion.tolist() == [[4, 2], [1, 3]]  # rows true, columns predicted
    metrics = classification_metrics(confusion)
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["precision_1"] == pytest.approx(3 / 5) and metrics["recall_1"] == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert metrics["f1_0"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert metrics["macro_f1"] == pytest.approx((metrics["f1_0"] + metrics["f1_1"]) / 2)


def test_never_predicted_class_gives_zero_not_nan():
    metrics = classification_metrics(confusion_matrix(torch.zeros(4), torch.tensor([0, 1, 0, 1]), 2))
    assert metrics["accuracy"] == 0.5 and metrics["precision_1"] == 0.0 and metrics["f1"] == 0.0


def test_multiclass_f1_is_macro_and_table_prints():
    confusion = confusion_matrix(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]), 3)
    metrics = classification_metrics(confusion)
    assert metrics["f1"] == metrics["macro_f1"]
    table = format_confusion(confusion, ["a", "b", "c"])
    assert table.splitlines()[2].split() == ["b", "0", "1", "1"]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="'targets' must hold class indices in \\[0, 2\\)"):
        confusion_matrix(torch.tensor([0]), torch.tensor([2]), 2)
    with pytest.raises(ValueError, match="must match"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([1]), 2)
