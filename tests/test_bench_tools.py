"""The GPU-session helpers in bench/ that are not benchmarks: they run (small, on the CPU) and
refuse bad arguments with a message that names them."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/ lives beside tests/, not in the package
from bench import profile_attention  # noqa: E402


def test_profile_attention_runs_a_row(capsys):
    profile_attention.main(["--shape", "1,2,17,16", "--causal", "--backend", "reference", "--pass", "bwd",
                            "--dtype", "float32", "--warmup", "1", "--iterations", "1"])
    assert "ran attention bwd (1, 2, 17, 16) causal=True float32 backend=reference" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["1,2,64", "1,2,0,16", "a,b,c,d"])
def test_profile_attention_names_a_bad_shape(shape, capsys):
    with pytest.raises(SystemExit):
        profile_attention.main(["--shape", shape])
    assert "argument '--shape' must be B,H,S,D" in capsys.readouterr().err
