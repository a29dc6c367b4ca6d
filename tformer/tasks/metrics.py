"""Classification metrics from a confusion matrix: accuracy, per-class precision/recall/F1,
macro F1, and a printable table."""

from __future__ import annotations

from typing import Sequence

import torch


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` int64 counts: row = true class, column = predicted class."""
    predictions, targets = torch.as_tensor(predictions).flatten(), torch.as_tensor(targets).flatten()
    if predictions.shape != targets.shape:
        raise ValueError(f"confusion_matrix: 'predictions' has {predictions.numel()} entries and 'targets' "
                         f"{targets.numel()}; they must match")
    for name, values in (("predictions", predictions), ("targets", targets)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"confusion_matrix: '{name}' must hold class indices in [0, {num_classes}), got "
                             f"values in [{int(values.min())}, {int(values.max())}]")
    flat = targets.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(confusion: torch.Tensor, positive_class: int | None = 1) -> dict[str, float]:
    """Metrics from a confusion matrix.

    Returns ``accuracy``, ``macro_f1`` and, per class ``c``, ``precision_c``, ``recall_c``,
    ``f1_c``. With two classes, ``f1`` is the F1 of ``positive_class`` (the usual binary F1;
    class 1 = positive review in IMDb); with more, ``f1`` is the macro F1. A class never
    predicted (or never present) gets precision (recall) 0, not NaN.
    """
    confusion = confusion.double()
    total = confusion.sum().item()
    true_positives = confusion.diagonal()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    precision = torch.where(predicted > 0, true_positives / predicted.clamp(min=1), torch.zeros_like(predicted))
    recall = torch.where(actual > 0, true_positives / actual.clamp(min=1), torch.zeros_like(actual))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-300),
                     torch.zeros_like(denominator))
    result = {"accuracy": true_positives.sum().item() / total if total else 0.0, "macro_f1": f1.mean().item()}
    for c in range(confusion.shape[0]):
        result[f"precision_{c}"] = precision[c].item()
        result[f"recall_{c}"] = recall[c].item()
        result[f"f1_{c}"] = f1[c].item()
    binary = confusion.shape[0] == 2 and positive_class is not None
    result["f1"] = result[f"f1_{positive_class}"] if binary else result["macro_f1"]
    return result


def format_confusion(confusion: torch.Tensor, label_names: Sequence[str]) -> str:
    """The matrix as a small text table, rows = true, columns = predicted."""
    names = list(label_names)
    width = max(8, *(len(n) for n in names), len(str(int(confusion.max()))) + 1)
    header = "true \\ pred".ljust(12) + "".join(n.rjust(width) for n in names)
    rows = [names[i][:12].ljust(12) + "".join(str(int(v)).rjust(width) for v in confusion[i].tolist())
            for i in range(len(names))]
    return "\n".join([header, *rows])
