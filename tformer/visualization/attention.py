"""Attention weights of every layer and head, read from the reference attention path, and drawn
as a grid of heatmaps with the tokens on the axes."""

from __future__ import annotations

import math
import os

import torch

from tformer.backends.reference.attention import attention_weights
from tformer.nn import SelfAttention


@torch.no_grad()
def attention_maps(model: torch.nn.Module, tokens: torch.Tensor, *, forward=None,
                   **forward_kwargs) -> list[torch.Tensor]:
    """Run ``model(tokens, **forward_kwargs)`` once and return each attention layer's weights, in
    depth order, as ``(B, H, Sq, Sk)`` float tensors. ``forward`` replaces ``model`` as what is
    called (e.g. ``model.encode`` for a model whose forward needs more than tokens, such as a
    multi-task model's task name).

    Each :class:`~tformer.nn.SelfAttention` is given a pre-forward hook that projects its input
    with the layer's own :meth:`~tformer.nn.SelfAttention.project_qkv` and passes q and k to
    :func:`tformer.backends.reference.attention.attention_weights`, the reference attention's
    own softmax; nothing of the math is repeated here.
    """
    maps: list[torch.Tensor] = []

    def capture(module: SelfAttention, args, kwargs):
        if kwargs.get("kv_cache") is not None:
            raise ValueError("attention_maps: run without a kv_cache")
        q, k, _ = module.project_qkv(args[0], positional=kwargs.get("positional"),
                                     position_offset=kwargs.get("position_offset", 0))
        probs = attention_weights(q, k, causal=module.causal, key_padding_mask=kwargs.get("key_padding_mask"),
                                  scale=1.0 / math.sqrt(module.head_dim))
        maps.append(probs.detach().cpu())

    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    if not layers:
        raise ValueError(f"attention_maps: {type(model).__name__} has no tformer.nn.SelfAttention layers")
    handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
    was_training = model.training
    try:
        model.eval()
        (forward or model)(tokens, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return maps


def plot_attention(maps: list[torch.Tensor], tokens: list[str], path: str | os.PathLike, *,
                   cell_inches: float = 2.5, title: str | None = None):
    """A grid of heatmaps, one row per layer and one column per head, of the first example of
    each ``(B, H, S, S)`` map; queries on the y axis, keys on the x axis, labelled by ``tokens``
    (length S) when there are at most 48 of them."""
    from .plotting import pyplot, save_png

    if not maps:
        raise ValueError("plot_attention: argument 'maps' is empty")
    num_layers, num_heads = len(maps), maps[0].shape[1]
    length = maps[0].shape[-1]
    if len(tokens) != length:
        raise ValueError(f"plot_attention: argument 'tokens' has {len(tokens)} labels for {length} positions")
    plt = pyplot()
    figure, axes = plt.subplots(num_layers, num_heads, figsize=(cell_inches * num_heads + 1.0, cell_inches * num_layers),
                                squeeze=False)
    show_labels = length <= 48
    for layer, layer_maps in enumerate(maps):
        for head in range(num_heads):
            axis = axes[layer][head]
            image = axis.imshow(layer_maps[0, head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                                aspect="auto", interpolation="nearest")
            axis.set_title(f"layer {layer} head {head}", fontsize="small")
            if show_labels:
                axis.set_xticks(range(length), tokens, rotation=90, fontsize=6)
                axis.set_yticks(range(length), tokens, fontsize=6)
            else:
                axis.set_xticks([])
                axis.set_yticks([])
    figure.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    if title:
        figure.suptitle(title)
    return save_png(figure, path)
