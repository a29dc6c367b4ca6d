"""bench/gpu_session.sh's first GPU call, rehearsed on the CPU (GPU_SESSION_DRY_RUN=1): it must reach
its end and leave the sweep's JSON and report.md where the device tool brings them back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_first_call_dry_run_reaches_its_end(tmp_path):
    # Not the test worker's PYTEST_XDIST_* variables: pytest-benchmark reads them in the stage's own
    # pytest run and would switch benchmarking off there ("xdist is on").
    parent = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}
    env = dict(parent, OUT=str(tmp_path), GPU_SESSION_DRY_RUN="1", PY=sys.executable)
    done = subprocess.run(["bash", "bench/gpu_session.sh", "first"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # alone ~2 min on 2 cores; beside other test workers longer
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dry run: no GPU here, the CUDA extension build is skipped" in done.stdout
    assert "first: stage wall time" in done.stdout
    # The canary ran the Triton path alone before the sweep (the GPU paths skipped on the CPU).
    canary = (tmp_path / "canary.log").read_text()
    assert "triton-fa2: ok" in canary and "cuda-sm80: skipped" in canary
    assert done.stdout.index("-- canary") < done.stdout.index("-- sweep")
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["device"] == "cpu" and sweep["total"]["wrong"] == 0 and sweep["total"]["crashes"] == 0
    report = (tmp_path / "report.md").read_text()
    assert "### softmax bwd" in report and "### attention fwd+bwd" in report
    # The ratio table is printed last, and no more files come back than a call returns (8).
    last_lines = done.stdout.rstrip().splitlines()[-3:]
    assert report.rstrip().splitlines()[-1] in last_lines and last_lines[-1].startswith("[wrote ")
    assert len(list(tmp_path.rglob("*"))) <= 8


def test_device_image_rehearsal_script_parses_and_names_real_tests():
    # bench/rehearse_device_image.sh downloads the GPU image's torch (GBs), so CI does not run it;
    # it must at least parse, and the test files it runs by default must exist.
    script = ROOT / "bench" / "rehearse_device_image.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    defaults = text.split("|| set -- ", 1)[1].split('\n"$VENV', 1)[0].replace("\\\n", " ").split()
    assert defaults and all((ROOT / name).is_file() for name in defaults), defaults
    assert 'TORCH_VERSION="${TORCH_VERSION:-2.11.0}"' in text and 'TRITON_VERSION="${TRITON_VERSION:-3.6.0}"' in text
