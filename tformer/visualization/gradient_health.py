"""Per-layer gradient norms checked for vanishing and exploding values: no plotting, so the
trainer can warn at its log steps without importing matplotlib-backed code."""

from __future__ import annotations

import math
import re

PREFIX = "grad_norm/"


def layer_order(name: str) -> tuple:
    """Sort key: embeddings first, then ``block_0, block_1, ...`` in depth order, then the rest."""
    match = re.fullmatch(r"block_(\d+)", name)
    if match:
        return (1, int(match.group(1)), name)
    return (0 if "embedding" in name or name == "positional" else 2, 0, name)


def gradient_warnings(metrics: dict, vanish_below: float | None, explode_above: float | None) -> list[str]:
    """One message per layer in ``metrics`` (keys ``grad_norm/<layer>``) whose gradient norm is
    below ``vanish_below`` or above ``explode_above`` (or not finite); None turns a check off."""
    messages = []
    for key in sorted((k for k in metrics if k.startswith(PREFIX)), key=lambda k: layer_order(k[len(PREFIX):])):
        layer, norm = key[len(PREFIX):], float(metrics[key])
        if not math.isfinite(norm):
            messages.append(f"exploding gradients in {layer}: norm {norm}")
        elif explode_above is not None and norm > explode_above:
            messages.append(f"exploding gradients in {layer}: norm {norm:.3g} > {explode_above:g} "
                            f"(logging.grad_explode_above)")
        elif vanish_below is not None and norm < vanish_below:
            messages.append(f"vanishing gradients in {layer}: norm {norm:.3g} < {vanish_below:g} "
                            f"(logging.grad_vanish_below)")
    return messages
