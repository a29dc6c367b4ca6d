"""Metrics of the multi-task heads beyond classification's (:mod:`tformer.tasks.metrics`):
regression error and rank correlation, and entity-level NER scores with seqeval (the library
NER results are reported with; conlleval's exact-match rule: an entity counts only when its
type and both boundaries are right)."""

from __future__ import annotations

from typing import Sequence

import torch

from tformer.optional import require


def regression_metrics(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``mae``, ``rmse`` and ``spearman`` (scipy; ties averaged) of ``(N,)`` predictions."""
    spearmanr = require("scipy.stats", "regression_metrics").spearmanr
    predictions, targets = predictions.double().flatten().cpu(), targets.double().flatten().cpu()
    if predictions.shape != targets.shape or predictions.numel() == 0:
        raise ValueError(f"regression_metrics: 'predictions' {tuple(predictions.shape)} and 'targets' "
                         f"{tuple(targets.shape)} must be equal, non-empty shapes")
    errors = predictions - targets
    constant = bool((predictions == predictions[0]).all() or (targets == targets[0]).all())
    spearman = 0.0 if constant else float(spearmanr(predictions.numpy(), targets.numpy()).statistic)
    return {"mae": errors.abs().mean().item(), "rmse": errors.pow(2).mean().sqrt().item(), "spearman": spearman}


def entity_metrics(true_tags: Sequence[Sequence[str]], predicted_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level ``precision``, ``recall``, ``f1`` (micro over entities, seqeval's default
    conlleval-compatible mode) and ``token_accuracy`` of IOB2 tag sequences, one per sentence."""
    seqeval = require("seqeval.metrics", "entity_metrics")
    f1_score, precision_score, recall_score = seqeval.f1_score, seqeval.precision_score, seqeval.recall_score
    true_tags, predicted_tags = [list(t) for t in true_tags], [list(p) for p in predicted_tags]
    if [len(t) for t in true_tags] != [len(p) for p in predicted_tags]:
        raise ValueError("entity_metrics: every sentence needs as many predicted tags as true tags")
    tokens = sum(len(t) for t in true_tags)
    correct = sum(a == b for t, p in zip(true_tags, predicted_tags) for a, b in zip(t, p))
    return {"precision": float(precision_score(true_tags, predicted_tags, zero_division=0)),
            "recall": float(recall_score(true_tags, predicted_tags, zero_division=0)),
            "f1": float(f1_score(true_tags, predicted_tags, zero_division=0)),
            "token_accuracy": correct / tokens if tokens else 0.0}
