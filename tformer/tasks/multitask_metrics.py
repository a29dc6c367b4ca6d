"""Metrics of the multi-task heads beyond classification's (:mod:`tformer.tasks.metrics`):
regression error and rank correlation, and entity-level NER scores with seqscore (conlleval's
figures: an entity counts only when its type and both boundaries are right, and an ``I-`` that
follows no entity of its type begins one, as conlleval reads it)."""

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


# tformer's tag schemes (tformer.data.conll.SCHEMES) by seqscore's encoding names.
_SEQSCORE_ENCODING = {"iob2": "BIO", "iob1": "IOB"}


def entity_metrics(true_tags: Sequence[Sequence[str]], predicted_tags: Sequence[Sequence[str]], *,
                   scheme: str = "iob2") -> dict[str, float]:
    """Entity-level ``precision``, ``recall``, ``f1`` (micro over entities, conlleval's figures)
    and ``token_accuracy`` of tag sequences, one per sentence, in ``scheme`` ``"iob2"`` (every
    entity begins with ``B-``) or ``"iob1"`` (the original CoNLL-2003 files: ``B-`` only between
    two entities of one type). Tags that break the scheme are read as conlleval reads them."""
    if scheme not in _SEQSCORE_ENCODING:
        raise ValueError(f"entity_metrics: 'scheme' must be one of {sorted(_SEQSCORE_ENCODING)}, got {scheme!r}")
    scoring = require("seqscore.scoring", "entity_metrics")
    true_tags, predicted_tags = [list(t) for t in true_tags], [list(p) for p in predicted_tags]
    if [len(t) for t in true_tags] != [len(p) for p in predicted_tags]:
        raise ValueError("entity_metrics: every sentence needs as many predicted tags as true tags")
    entities, tokens = scoring.score_label_sequences(predicted_tags, true_tags, _SEQSCORE_ENCODING[scheme],
                                                     repair="conlleval")
    return {"precision": entities.precision, "recall": entities.recall, "f1": entities.f1,
            "token_accuracy": tokens.hits / tokens.total if tokens.total else 0.0}
