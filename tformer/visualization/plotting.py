"""matplotlib set up headless (Agg) and PNG writing shared by every plot."""

from __future__ import annotations

import os
from pathlib import Path

from tformer.optional import require

DPI = 100


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG at :data:`DPI` (so a ``(w, h)`` inch figure is ``w*DPI x h*DPI``
    pixels), creating the folder, and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    pyplot().close(figure)
    return path
