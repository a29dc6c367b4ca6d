"""examples/tour.ipynb runs top to bottom (through nbmake, in a kernel of this interpreter), so
the walkthrough cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tour_notebook_executes(tmp_path):
    pytest.importorskip("nbmake", reason="nbmake is in the dev extra")
    env = dict(os.environ, MPLBACKEND="Agg", WANDB_MODE="offline")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake",
                             "--nbmake-timeout=240", str(REPO / "examples" / "tour.ipynb")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
