"""bench/gpu_sweep.py on the CPU (Triton interpreted, tiny shapes): it counts, writes its JSON,
re-runs a case from its reproducer, and catches a wrong implementation."""

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/ lives beside tests/, not in the package
from bench import gpu_sweep  # noqa: E402


def test_sweep_counts_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    status = gpu_sweep.main(["--device", "cpu", "--seconds", "60", "--max-cases", "5", "--seed", "7",
                             "--dtypes", "float32,bfloat16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "seed 7" in printed and "| attention/triton |" in printed
    result = json.loads(out.read_text())
    assert result["seed"] == 7 and result["backends"] == ["triton"]
    counted = sum(row["cases"] + row["skipped"] for row in result["counts"].values())
    assert counted == 5 and result["total"] == dict(cases=5 - sum(r["skipped"] for r in result["counts"].values()),
                                                   wrong=0, crashes=0)
    assert set(result["counts"]) == {f"{op}/triton" for op in gpu_sweep.OPS}


def test_cases_are_reproducible_from_the_seed():
    first = [gpu_sweep.make_case(random.Random(3), op, "triton", "float16", "cuda") for op in gpu_sweep.OPS]
    second = [gpu_sweep.make_case(random.Random(3), op, "triton", "float16", "cuda") for op in gpu_sweep.OPS]
    assert first == second
    attention = gpu_sweep.make_case(random.Random(5), "attention", "triton", "bfloat16", "cuda")
    assert attention["batch"] * attention["num_heads"] * attention["seq_q"] * attention["seq_k"] \
        <= gpu_sweep.GPU_LIMITS["max_scores"]


def _perturbed(op):
    def wrong(*args, backend=None, **kwargs):
        out = op(*args, backend=backend, **kwargs)
        return out if backend == "reference" else out * 1.05  # 5% off: far outside every tolerance
    return wrong


def test_checker_catches_a_wrong_result(monkeypatch, capsys):
    gpu_sweep._ops()
    monkeypatch.setitem(gpu_sweep.IMPLEMENTATIONS, "softmax", _perturbed(gpu_sweep.IMPLEMENTATIONS["softmax"]))
    result = gpu_sweep.sweep(60, seed=1, device="cpu", backends=["triton"], ops=["softmax"], dtypes=["float32"],
                             max_cases=2)
    assert result["total"]["wrong"] == 2 and result["counts"]["softmax/triton"]["wrong"] == 2
    failure = result["failures"][0]
    assert failure["status"] == "wrong" and "out: error" in failure["detail"]
    assert failure["reproducer"].startswith("python -m bench.gpu_sweep --case '")
    # The reproducer's JSON re-runs the same case: wrong again while perturbed (exit 1), right without.
    case_json = failure["reproducer"].split("--case ", 1)[1].strip("'")
    assert gpu_sweep.main(["--case", case_json]) == 1
    monkeypatch.undo()
    assert gpu_sweep.main(["--case", case_json]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "ok"


def test_checker_catches_a_nan(monkeypatch):
    gpu_sweep._ops()
    layer_norm = gpu_sweep.IMPLEMENTATIONS["layer_norm"]

    def nan_row(*args, backend=None, **kwargs):
        out = layer_norm(*args, backend=backend, **kwargs)
        if backend == "reference":
            return out
        first = out[0] if isinstance(out, tuple) else out
        first = first.index_fill(0, torch.tensor([0]), float("nan"))
        return (first, *out[1:]) if isinstance(out, tuple) else first

    monkeypatch.setitem(gpu_sweep.IMPLEMENTATIONS, "layer_norm", nan_row)
    case = gpu_sweep.make_case(random.Random(2), "layer_norm", "triton", "float32", "cpu")
    result = gpu_sweep.check_case(case)
    assert result["status"] == "wrong" and "non-finite" in result["detail"]


def test_a_gpu_case_reruns_on_the_cpu_with_device_cpu(capsys):
    case = dict(gpu_sweep.make_case(random.Random(8), "rms_norm", "triton", "float16", "cpu"), device="cuda")
    assert gpu_sweep.main(["--case", json.dumps(case), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "ok"


@pytest.mark.parametrize("text, message", [("{not json", "must be a case's JSON"),
                                           ('{"op": "conv"}', "whose 'op' is one of")])
def test_bad_case_json_is_a_one_line_error(text, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_sweep.main(["--case", text])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_interrupted_sweep_keeps_its_counts(monkeypatch):
    # `timeout` sends SIGTERM, which the CLI turns into KeyboardInterrupt: the counts so far survive.
    gpu_sweep._ops()
    softmax, calls = gpu_sweep.IMPLEMENTATIONS["softmax"], []

    def second_case_interrupted(*args, backend=None, **kwargs):
        calls.append(backend)
        if calls.count("triton") == 2:
            raise KeyboardInterrupt
        return softmax(*args, backend=backend, **kwargs)

    monkeypatch.setitem(gpu_sweep.IMPLEMENTATIONS, "softmax", second_case_interrupted)
    result = gpu_sweep.sweep(60, seed=4, device="cpu", backends=["triton"], ops=["softmax"], dtypes=["float32"],
                             max_cases=5)
    assert result["interrupted"] and result["total"]["cases"] == 1


@pytest.mark.parametrize("variant, variable, value", [("triton+fa2", "TFORMER_ATTENTION_FWD", "fa2"),
                                                       ("triton+atomic_dq", "TFORMER_ATTENTION_DQ", "atomic")])
def test_variants_run_their_backend_under_their_environment(monkeypatch, variant, variable, value):
    """"triton+fa2" runs backend "triton" with TFORMER_ATTENTION_FWD=fa2 set for the forward and
    the backward and restored afterwards (likewise "triton+atomic_dq", whose variable the backward
    reads); variants are swept on the attention ops only."""
    gpu_sweep._ops()
    attention = gpu_sweep.IMPLEMENTATIONS["attention"]
    seen = []

    def recording(*args, backend=None, **kwargs):
        seen.append((backend, os.environ.get(variable)))
        return attention(*args, backend=backend, **kwargs)

    monkeypatch.setitem(gpu_sweep.IMPLEMENTATIONS, "attention", recording)
    monkeypatch.delenv(variable, raising=False)
    result = gpu_sweep.sweep(60, seed=4, device="cpu", backends=[variant], ops=["attention", "softmax"],
                             dtypes=["float32"], max_cases=2)
    assert set(result["counts"]) == {f"attention/{variant}"}
    assert result["total"]["cases"] == 2 and result["total"]["wrong"] == 0 and result["total"]["crashes"] == 0
    assert ("triton", value) in seen and ("reference", None) in seen
    assert variable not in os.environ


def test_exclude_leaves_out_a_backend_with_its_variants(capsys):
    every = ["triton", "cuda", "triton+fa2", "cuda+sm80", "triton+atomic_dq"]
    assert gpu_sweep.leave_out(every, ["cuda"]) == ["triton", "triton+fa2", "triton+atomic_dq"]
    assert gpu_sweep.leave_out(every, ()) == every
    with pytest.raises(SystemExit):
        gpu_sweep.main(["--device", "cpu", "--backends", "triton,triton+fa2", "--exclude", "triton"])
    assert "--exclude triton: leaves no backend to sweep" in capsys.readouterr().err


def test_gpu_cases_favour_the_head_dims_of_the_sm90a_kernels():
    rng = random.Random(0)
    dims = [gpu_sweep.make_case(rng, "attention", "cuda", "bfloat16", "cuda")["head_dim"] for _ in range(800)]
    assert 0.3 < sum(d in (64, 128) for d in dims) / len(dims) < 0.45
    assert set(dims) == set(gpu_sweep.GPU_HEAD_DIMS)  # every head dim still comes up


def test_flash_grid_joins_the_sweep(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    status = gpu_sweep.main(["--device", "cpu", "--seconds", "0", "--seed", "2", "--backends", "reference",
                             "--ops", "softmax", "--flash-grid", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    grid = json.loads(out.read_text())["flash_grid"]
    assert grid["cases"] == 2 and grid["counts"]["reference"]["cases"] == 2 and grid["total"]["wrong"] == 0
    assert "flash grid: 2 cases x 1 backends" in printed
