"""bench/gpu_canary.py: every attention path once, alone, before a GPU stage runs them together.
Here with a stand-in interpreter whose children hang, crash, answer wrong or pass, and for real
on the CPU (the Triton path under the interpreter)."""

import stat
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_canary  # noqa: E402

# Called as `python -m bench.gpu_canary --child NAME --device DEVICE`: $4 is the path's name.
STAND_IN = """#!/bin/sh
case "$4" in
  cuda-sm90a-fwd) sleep 60 ;;
  cuda-sm90a-bwd) echo "cuda-sm90a-bwd: WRONG, max |error| vs float64 out 1.2e-03, dq 4.0e+00"; exit 3 ;;
  cuda-sm90a-band) echo "cuda-sm90a-band: ok, max |error| vs float64 out 2.0e-03"; exit 0 ;;
  cuda-sm80) echo "Traceback: CUDA error: an illegal memory access was encountered"; exit 1 ;;
  triton-hopper-fwd) echo "triton-hopper-fwd: WRONG, max |error| vs float64 out 3.1e+00"; exit 3 ;;
  triton-fa2) echo "triton-fa2: ok with TFORMER_ATTENTION_FWD=$TFORMER_ATTENTION_FWD"; exit 0 ;;
esac
"""


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "python"
    path.write_text(STAND_IN)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_hang_crash_and_wrong_answer_are_told_apart_and_stepped_around(stand_in):
    lines = []
    start = time.monotonic()
    verdicts = gpu_canary.run(list(gpu_canary.PATHS), "cpu", timeout=3, python=stand_in, log=lines.append)
    assert time.monotonic() - start < 20  # the hung child was killed at the limit, not waited for
    assert verdicts == {"cuda-sm90a-fwd": "HANG", "cuda-sm90a-bwd": "WRONG", "cuda-sm90a-band": "ok",
                        "cuda-sm80": "CRASH", "triton-hopper-fwd": "WRONG", "triton-fa2": "ok"}
    assert any("illegal memory access" in line for line in lines)
    # Each child ran under its own path's environment.
    assert "triton-fa2: ok with TFORMER_ATTENTION_FWD=fa2" in lines
    assert gpu_canary.fallback_environment(verdicts) == {
        "TFORMER_ATTENTION_FORCE_SM80": "1", "TFORMER_ATTENTION_BWD_FORCE_SM80": "1", "TFORMER_GPU_SKIP_CUDA": "1",
        "TFORMER_ATTENTION_FWD": "fa2"}
    # The sm_90a backward alone failing keeps the sm_90a forward.
    assert gpu_canary.fallback_environment({"cuda-sm90a-fwd": "ok", "cuda-sm90a-bwd": "CRASH"}) == {
        "TFORMER_ATTENTION_BWD_FORCE_SM80": "1"}
    assert gpu_canary.fallback_environment({"triton-fa2": "ok", "cuda-sm80": "skipped"}) == {}
    # The banded variants failing moves only the banded calls.
    assert gpu_canary.fallback_environment({"cuda-sm90a-fwd": "ok", "cuda-sm90a-band": "HANG"}) == {
        "TFORMER_ATTENTION_BAND_FORCE_SM80": "1"}


def test_cpu_rehearsal_runs_the_triton_path_and_writes_no_fallback(tmp_path, capsys):
    env_out = tmp_path / "canary.env"
    assert gpu_canary.main(["--device", "cpu", "--paths", "triton-fa2,cuda-sm80", "--env-out", str(env_out)]) == 0
    out = capsys.readouterr().out
    assert "triton-fa2: ok, max |error| vs float64" in out and "cuda-sm80: skipped" in out
    assert env_out.read_text() == ""


def test_unknown_path_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_canary.main(["--paths", "triton-fa3"])
    assert "argument --paths: unknown triton-fa3" in capsys.readouterr().err
