"""The plots a training run draws of itself with ``--visualize`` (``logging.visualize``)."""

from __future__ import annotations

import os
from pathlib import Path

from .curves import plot_training_curves, read_metrics
from .gradients import layer_norm_series, plot_gradient_flow


def write_run_plots(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Training curves and (when logged) gradient flow of the run in ``out_dir``, written to
    ``out_dir/plots/*.png``; returns ``{name: path}``. Nothing when no metrics were written."""
    out_dir = Path(out_dir)
    if not (out_dir / "metrics.jsonl").is_file():
        return {}
    records = read_metrics(out_dir)
    paths = {"training_curves": plot_training_curves({out_dir.name: records}, out_dir / "plots" / "training_curves.png")}
    if layer_norm_series(records)[0]:
        paths["gradient_flow"] = plot_gradient_flow(records, out_dir / "plots" / "gradient_flow.png")
    return paths
