"""Training curves from ``metrics.jsonl``: losses, bpc or accuracy, learning rate, throughput,
with several runs overlaid (the ablation report draws its comparisons with this)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

# (panel title, metric keys tried in order: the first one present in a run is drawn)
PANELS = (
    ("train loss", ("train/loss",)),
    ("validation loss", ("val/loss",)),
    ("validation bpc / accuracy", ("val/bpc", "val/accuracy")),
    ("learning rate", ("train/lr",)),
    ("items / s", ("train/items_per_s",)),
)


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The metric records of a run folder (or a ``metrics.jsonl`` path), samples left out."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"read_metrics: argument 'run' must be a run folder holding metrics.jsonl or the "
                                f"file itself, got {str(run)!r}")
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            if number == len(lines):
                # What a killed run leaves: its last line cut short. The rest is plotted.
                warnings.warn(f"read_metrics: {path}: skipping line {number}, the last, which is damaged ({error}; "
                              f"a run killed while writing leaves this)", stacklevel=2)
                continue
            raise ValueError(f"read_metrics: {path}: line {number} is not JSON ({error})") from error
        if isinstance(record, dict) and "samples" not in record:
            records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one metric, non-finite values left out."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def plot_training_curves(runs: dict[str, list[dict]], path: str | os.PathLike, *, width: float = 15.0,
                         height: float = 8.0, panels=PANELS, title: str | None = None):
    """One panel per metric of ``panels``, one line per run (``{label: records}``)."""
    from .plotting import pyplot, save_png

    if not runs:
        raise ValueError("plot_training_curves: argument 'runs' must name at least one run")
    plt = pyplot()
    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
    for axis, (panel_title, keys) in zip(axes.flat, panels):
        for label, records in runs.items():
            for key in keys:
                steps, values = series(records, key)
                if steps:
                    axis.plot(steps, values, label=label, marker="." if len(steps) < 20 else None)
                    axis.set_ylabel(key)
                    break
        axis.set_title(panel_title)
        axis.set_xlabel("step")
        axis.grid(True, alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize="small", ncol=max(1, len(runs) // 8))
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_png(figure, path)
