"""t-SNE (scikit-learn) of a classifier's pooled encoder states, coloured by label."""

from __future__ import annotations

import os

import numpy as np
import torch

from tformer.optional import require


@torch.no_grad()
def pooled_states(model, token_ids: list[list[int]], pad_id: int, *, batch_size: int = 32) -> np.ndarray:
    """``(N, d_model)`` float32: ``model.pooled(...)`` (the state the classification head reads)
    of each example, in batches padded with ``pad_id``."""
    from tformer.data.buckets import pad_batch

    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(token_ids), batch_size):
        tokens, key_padding_mask = pad_batch(token_ids[start:start + batch_size], pad_id, device=device)
        rows.append(model.pooled(tokens, key_padding_mask=key_padding_mask).float().cpu())
    return torch.cat(rows).numpy()


def tsne_2d(states: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """``(N, 2)`` t-SNE coordinates; the perplexity is capped below N as scikit-learn requires."""
    TSNE = require("sklearn.manifold", "t-SNE").TSNE
    if len(states) < 3:
        raise ValueError(f"tsne_2d: need at least 3 examples, got {len(states)}")
    perplexity = min(perplexity, (len(states) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(states)


def plot_embeddings(points: np.ndarray, labels: list[str], path: str | os.PathLike, *, width: float = 7.0,
                    height: float = 6.0, title: str | None = None):
    """A scatter plot of ``(N, 2)`` points, one colour per distinct label."""
    from .plotting import pyplot, save_png

    if len(points) != len(labels):
        raise ValueError(f"plot_embeddings: {len(points)} points but {len(labels)} labels")
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(width, height))
    for name in sorted(set(labels)):
        chosen = np.array([label == name for label in labels])
        axis.scatter(points[chosen, 0], points[chosen, 1], s=10, alpha=0.7, label=f"{name} ({chosen.sum()})")
    axis.legend()
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title or "t-SNE of pooled encoder states")
    figure.tight_layout()
    return save_png(figure, path)
