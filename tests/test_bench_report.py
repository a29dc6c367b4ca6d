"""bench.report: each tformer backend as a ratio to the best anchor on the same row, the
training-step table against plain PyTorch, and the PNG plots, from a synthetic
pytest-benchmark JSON (no benchmark run needed)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/ lives beside tests/, not in the package
from bench import report  # noqa: E402

CEILINGS = {"ceiling_copy_gbps": 100.0, "ceiling_matmul_tflops": 10.0, "ceiling_copy_bytes": 2**26,
            "ceiling_matmul_n": 1024, "ceiling_matmul_dtype": "bfloat16"}


def _row(op, impl, value, *, shape=(4, 8), causal=None, seq_len=None, pass_name="fwd"):
    metric = "tflops" if op == "attention" else "gbps"
    info = {"op": op, "pass": pass_name, "impl": impl, "suite": "seq_sweep" if seq_len else "anchors",
            "shape": list(shape), "dtype": "bfloat16", metric: value, **CEILINGS}
    if op == "attention":
        info.update(causal=causal, seq_len=seq_len or shape[-2])
    return {"name": f"test_{op}[{impl}]", "extra_info": info}


def _write(tmp_path, benchmarks):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"datetime": "2026-01-01", "machine_info": {"tformer": {"device": "H100"}},
                                "commit_info": {"id": "0123456789abc"}, "benchmarks": benchmarks}))
    return path


def test_ratio_to_the_best_anchor_per_row_and_plots(tmp_path, capsys):
    benchmarks = [
        _row("layer_norm", "tformer-triton", 90.0), _row("layer_norm", "tformer-cuda", 30.0),
        _row("layer_norm", "torch", 40.0), _row("layer_norm", "torch-compile", 60.0),  # best anchor: 60
        _row("layer_norm", "tformer-triton", 10.0, shape=(2, 2)),  # a row with no anchor: no ratio
    ]
    for seq_len, scale in ((512, 1.0), (1024, 2.0)):
        shape = (1, 2, seq_len, 64)
        benchmarks += [_row("attention", "tformer-triton", 3.0 * scale, shape=shape, causal=True, seq_len=seq_len),
                       _row("attention", "sdpa-flash", 2.0 * scale, shape=shape, causal=True, seq_len=seq_len),
                       _row("attention", "sdpa-math", 0.5 * scale, shape=shape, causal=True, seq_len=seq_len)]
    benchmarks.append({"name": "test_train_step", "extra_info": {
        "op": "train_step", "model": "small", "impl": "plain-torch", "mode": "compile", "batch": 8, "seq_len": 1024,
        "tokens_per_s": 1000.0, "mfu": 0.3, "fraction_of_matmul_ceiling": 0.4, "peak_memory_gib": 2.0}})
    benchmarks.append({"name": "test_train_step", "extra_info": {
        **benchmarks[-1]["extra_info"], "impl": "tformer-triton", "tokens_per_s": 1300.0}})
    hf_row = {**benchmarks[-1]["extra_info"], "op": "hf_train_step", "model": "llama-gpu", "mode": "eager"}
    benchmarks.append({"name": "test_hf_train_step", "extra_info": {**hf_row, "impl": "hf-sdpa", "tokens_per_s": 800.0}})
    benchmarks.append({"name": "test_hf_train_step", "extra_info": {**hf_row, "impl": "tformer-cuda",
                                                                    "tokens_per_s": 1000.0}})
    out_dir = tmp_path / "out"
    report.main([str(_write(tmp_path, benchmarks)), "--out-dir", str(out_dir)])
    text = (out_dir / "report.md").read_text()
    assert text == capsys.readouterr().out.split("\n[wrote")[0]
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| suite") and "tformer-cuda" in line)
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    # Ratios to the best anchor, then to each anchor the targets name that ran (torch; no Liger here).
    assert columns[-5:] == ["best anchor", "tformer-cuda / best", "tformer-triton / best", "tformer-cuda / torch",
                            "tformer-triton / torch"]
    row = next(line for line in lines if line.startswith("| anchors | 4×8 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[-5:] == ["torch-compile (60.0)", "0.50×", "1.50×", "0.75×", "2.25×"]
    lonely = next(line for line in lines if line.startswith("| anchors | 2×2 |"))
    assert lonely.rstrip(" |").endswith("—")
    attention_header = next(line for line in lines if line.startswith("| suite") and "sdpa-flash" in line)
    assert attention_header.rstrip(" |").endswith("tformer-triton / best | tformer-triton / sdpa-flash")
    for seq_len in (512, 1024):
        row = next(line for line in lines if f"×{seq_len}×64" in line)
        assert "sdpa-flash (" in row and row.rstrip(" |").endswith("1.50× | 1.50×")
    train_row = next(line for line in lines if "| tformer-triton | compile |" in line)
    assert "1.30× (compile)" in train_row
    hf_line = next(line for line in lines if line.startswith("| llama-gpu |") and "tformer-cuda" in line)
    assert "1.25× (eager)" in hf_line and "ratio to hf-sdpa" in text
    assert (out_dir / "attention_fwd.png").stat().st_size > 0 and (out_dir / "layer_norm.png").stat().st_size > 0


def test_a_file_without_rows_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(_write(tmp_path, [{"name": "x"}]))])
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.json")])


def _timed(op, impl, seconds, *, shape, pass_name, causal=None, kind="tformer"):
    row = _row(op, impl, 1.0, shape=shape, causal=causal, pass_name=pass_name)
    row["extra_info"].update(median_s=seconds, kind=kind)
    return row


def test_auto_table_orders_backends_by_training_time_and_merges(tmp_path):
    attention = (4, 16, 4096, 128)
    benchmarks = [
        # fwd+bwd decides where measured: cuda wins it although triton's forward is faster.
        _timed("attention", "tformer-triton", 1.0, shape=attention, pass_name="fwd", causal=True),
        _timed("attention", "tformer-cuda", 2.0, shape=attention, pass_name="fwd", causal=True),
        _timed("attention", "tformer-triton", 5.0, shape=attention, pass_name="fwd+bwd", causal=True),
        _timed("attention", "tformer-cuda", 4.0, shape=attention, pass_name="fwd+bwd", causal=True),
        _timed("attention", "sdpa-flash", 0.5, shape=attention, pass_name="fwd+bwd", causal=True, kind="anchor"),
        # Rows: no fwd+bwd pass, so fwd + bwd are summed (triton 1 + 3 = 4 > cuda 2 + 1 = 3).
        _timed("layer_norm", "tformer-triton", 1.0, shape=(65536, 512), pass_name="fwd"),
        _timed("layer_norm", "tformer-triton", 3.0, shape=(65536, 512), pass_name="bwd"),
        _timed("layer_norm", "tformer-cuda", 2.0, shape=(65536, 512), pass_name="fwd"),
        _timed("layer_norm", "tformer-cuda", 1.0, shape=(65536, 512), pass_name="bwd"),
    ]
    table_path = tmp_path / "measured_auto.json"
    table_path.write_text(json.dumps({"measured": {}, "entries": [
        {"op": "softmax", "dtype": "bfloat16", "n": 512, "order": ["triton"]},  # not re-measured: kept
        {"op": "attention", "dtype": "bfloat16", "head_dim": 64, "seq": 512, "causal": False,
         "order": ["triton"]}]}))  # re-measured op: replaced
    report.main([str(_write(tmp_path, benchmarks)), "--out-dir", str(tmp_path / "out"), "--auto-table",
                 str(table_path)])
    table = json.loads(table_path.read_text())
    assert table["measured"]["device"] == "H100" and table["measured"]["date"] == "2026-01-01"
    by_op = {entry["op"]: entry for entry in table["entries"]}
    assert len(table["entries"]) == 3
    assert by_op["softmax"]["order"] == ["triton"]
    assert {k: by_op["attention"][k] for k in ("head_dim", "seq", "causal", "order")} == {
        "head_dim": 128, "seq": 4096, "causal": True, "order": ["cuda", "triton"]}
    assert by_op["layer_norm"]["n"] == 512 and by_op["layer_norm"]["order"] == ["cuda", "triton"]


def test_auto_table_refuses_cpu_results(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"datetime": "2026-01-01", "machine_info": {"tformer": {"device": "CPU (x86_64)"}},
                                "benchmarks": [_timed("softmax", "tformer-triton", 1.0, shape=(4, 8), pass_name="fwd")]}))
    with pytest.raises(SystemExit):
        report.main([str(path), "--out-dir", str(tmp_path / "out"), "--auto-table", str(tmp_path / "t.json")])
    assert "only a GPU run can order the GPU backends" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
