"""Gradient flow: per-layer gradient norms (the trainer logs them as ``grad_norm/<layer>``),
checked for vanishing / exploding values and drawn per layer over training."""

from __future__ import annotations

import os

from .gradient_health import PREFIX, layer_order


def layer_norm_series(records: list[dict]) -> tuple[list[str], dict[str, tuple[list[int], list[float]]]]:
    """From metrics records: the layers in depth order and each layer's ``(steps, norms)``."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(PREFIX) and isinstance(value, (int, float)):
                steps, norms = series.setdefault(key[len(PREFIX):], ([], []))
                steps.append(int(record.get("step", len(steps))))
                norms.append(float(value))
    return sorted(series, key=layer_order), series


def plot_gradient_flow(records: list[dict], path: str | os.PathLike, *, width: float = 12.0, height: float = 4.5,
                       vanish_below: float | None = None, explode_above: float | None = None):
    """Left: each layer's gradient norm over the steps (log scale); right: its distribution over
    training as one box per layer, in depth order. Raises ValueError when ``records`` hold no
    ``grad_norm/<layer>`` values (``logging.layer_grad_norms`` off)."""
    from .plotting import pyplot, save_png

    layers, series = layer_norm_series(records)
    if not layers:
        raise ValueError("plot_gradient_flow: the metrics hold no 'grad_norm/<layer>' values; train with "
                         "logging.layer_grad_norms=true")
    plt = pyplot()
    figure, (lines, boxes) = plt.subplots(1, 2, figsize=(width, height))
    colors = plt.get_cmap("viridis")
    for index, layer in enumerate(layers):
        steps, norms = series[layer]
        lines.plot(steps, [max(n, 1e-30) for n in norms], label=layer, color=colors(index / max(len(layers) - 1, 1)))
    boxes.boxplot([[max(n, 1e-30) for n in series[layer][1]] for layer in layers], showfliers=True)
    boxes.set_xticks(range(1, len(layers) + 1), layers, rotation=45, ha="right")
    for axis, title in ((lines, "gradient norm per layer"), (boxes, "distribution over training")):
        axis.set_yscale("log")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        for bound in (vanish_below, explode_above):
            if bound is not None:
                axis.axhline(bound, color="red", linestyle="--", linewidth=0.8)
    lines.set_xlabel("step")
    lines.set_ylabel("L2 norm of the layer's gradients")
    lines.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return save_png(figure, path)
