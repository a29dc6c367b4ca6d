"""The per-device self-check behind backend="auto", proven on the CPU with stand-in paths that
hang, crash, answer wrong or answer right but slowly, and its cache: keying, invalidation,
atomic writes, one checking rank per node."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tformer.ops import auto
from tformer.ops.selftest import cache, check

TESTS = Path(__file__).resolve().parent
CPU = torch.device("cpu")
STANDINS = {name: f"selftest_standins:{attr}" for name, attr in
            (("hangs", "HANGS"), ("crashes", "CRASHES"), ("wrong", "WRONG"), ("slow", "SLOW"))}


@pytest.fixture
def standin_env(monkeypatch, tmp_path):
    """The worker processes import the stand-ins from tests/; verdicts go to a fresh cache folder."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(check, "_verdicts", {})
    return tmp_path


def test_misbehaving_paths_are_excluded_or_demoted(standin_env, caplog):
    with caplog.at_level(logging.WARNING, logger="tformer"):
        verdict = check.verdict_for(CPU, paths=STANDINS, timeout_s=40, directory=standin_env, repeats=3)
    status = {name: result["status"] for name, result in verdict["paths"].items()}
    assert status == {"hangs": "hang", "crashes": "crash", "wrong": "wrong", "slow": "ok"}
    assert "off by" in verdict["paths"]["wrong"]["detail"]
    warnings = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    assert len(warnings) == 3 and all("\n" not in w for w in warnings)
    for name in ("hangs", "crashes", "wrong"):
        (line,) = [w for w in warnings if w.startswith(f"tformer self-check: {name} excluded")]
        assert f"reproduce: python -m tformer.ops.selftest.worker {name} --device cpu --standin {STANDINS[name]}" in line

    # The slow path answered right: it keeps its timings and is demoted, never picked over torch.
    (entry,) = verdict["timings"]
    assert set(entry["times_ms"]) == {"slow", "torch"} and entry["times_ms"]["slow"] > entry["times_ms"]["torch"]
    passed = {name for name, result in verdict["paths"].items() if result["status"] == "ok"}
    order, why = auto.decide("attention", entry["dtype"], {"head_dim": 16, "seq": 32, "causal": True},
                             verdict["timings"], passed, "test")
    assert order == ("torch", "reference") and "slow" in why

    # The table says what was checked, and how to reproduce each exclusion.
    table = "\n".join(check.format_table(verdict))
    assert "hangs" in table and "reproduce: python -m tformer.ops.selftest.worker crashes" in table


def _entries(**times):
    return [{"op": "attention", "dtype": "bfloat16", "head_dim": 64, "seq": 1024, "causal": True, "times_ms": times}]


KEY = {"head_dim": 64, "seq": 1000, "causal": True}


@pytest.mark.parametrize("times, passed, chosen", [
    (dict(torch=1.0, triton=0.90), {"triton"}, "triton"),  # 11% faster: picked
    (dict(torch=1.0, triton=0.98), {"triton"}, "torch"),  # 2% faster: within the 3% margin
    (dict(torch=1.0, triton=0.5), set(), "torch"),  # fast but failed its check
    (dict(torch=1.0, triton=0.9, cuda=0.8), {"triton", "cuda"}, "cuda"),  # the fastest verified path
    (dict(triton=0.5), {"triton"}, "torch"),  # never measured against torch
])
def test_auto_picks_a_kernel_only_where_verified_and_3_percent_faster(times, passed, chosen):
    order, why = auto.decide("attention", "bfloat16", KEY, _entries(**times), passed, "test")
    assert order[0] == chosen and order[-2:] == ("torch", "reference"), why
    assert auto.decide("attention", "float16", KEY, _entries(**times), passed, "test")[0] == auto.FALLBACK


def test_auto_uses_the_cached_verdict_on_cuda(monkeypatch):
    # No GPU here: measurements() stands in for this device's cached verdict.
    monkeypatch.setattr(auto, "_memo", {})
    monkeypatch.setattr(auto, "measurements", lambda device: (_entries(torch=1.0, **{"triton:atomic_dq": 0.8}),
                                                              {"triton:atomic_dq"}, "this device's self-check"))
    q = torch.empty(2, 4, 1024, 64, device="meta")
    args = dict(q=q, k=q, v=q, causal=True)
    order, why = auto.candidates("attention", torch.device("cuda"), torch.bfloat16, args)
    assert order == ("triton:atomic_dq", "torch", "reference") and "25% faster than torch" in why
    assert auto.candidates("attention", CPU, torch.bfloat16, args) == (auto.FALLBACK, auto.CPU_WHY)


def _fake_check(calls):
    def run(device, paths, timeout_s, repeats):
        calls.append(device)
        return {"key": cache.device_key(device), "created": "now", "paths": {}, "timings": []}
    return run


def test_verdict_is_cached_per_key_and_invalidated_when_the_key_changes(standin_env, monkeypatch):
    calls = []
    monkeypatch.setattr(check, "run_selftest", _fake_check(calls))
    first = check.verdict_for(CPU, paths={}, directory=standin_env)
    assert check.verdict_for(CPU, paths={}, directory=standin_env) == first and len(calls) == 1  # from the file
    path = cache.key_file(cache.device_key(CPU), standin_env)
    assert json.loads(path.read_text())["key"] == cache.device_key(CPU)
    for field, value in (("build", "edited-kernels"), ("torch", "9.9"), ("driver", "999")):
        key = dict(cache.device_key(CPU), **{field: value})
        assert cache.key_file(key, standin_env) != path  # another torch, driver or build: another verdict
        monkeypatch.setattr(cache, "device_key", lambda device, key=key: key)
        check.verdict_for(CPU, paths={}, directory=standin_env)
    assert len(calls) == 4
    check.verdict_for(CPU, paths={}, directory=standin_env, refresh=True)
    assert len(calls) == 5
    # A file whose key does not match (edited, or from an older format) is not trusted.
    path.write_text(json.dumps({"key": {"device": "other"}}))
    assert cache.read(path, cache.device_key(CPU)) is None


def test_build_hash_follows_the_kernel_sources():
    assert len(cache.build_hash()) == 16 and cache.build_hash() == cache.build_hash()


def test_a_check_that_dies_midway_leaves_no_verdict(standin_env, monkeypatch):
    def dies(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(check, "run_selftest", dies)
    with pytest.raises(KeyboardInterrupt):
        check.verdict_for(CPU, paths={}, directory=standin_env)
    assert not cache.key_file(cache.device_key(CPU), standin_env).exists()
    # Nor does a write interrupted while serializing: the verdict file appears whole or not at all.
    path = standin_env / "selftest-x.json"
    with pytest.raises(TypeError):
        cache.write(path, {"key": {}, "bad": object()})
    assert not path.exists() and not list(standin_env.glob("*.tmp"))


def test_other_ranks_wait_for_local_rank_0(standin_env, monkeypatch):
    calls = []
    monkeypatch.setattr(check, "run_selftest", _fake_check(calls))
    monkeypatch.setenv("LOCAL_RANK", "1")
    # Nobody checks: rank 1 gives up after its wait, and auto falls back to torch.
    assert check.verdict_for(CPU, paths={}, directory=standin_env, wait_s=1.0) is None and calls == []
    # Rank 0 (another process on the node) publishes its verdict while rank 1 waits.
    verdict = {"key": cache.device_key(CPU), "created": "by rank 0", "paths": {}, "timings": []}
    path = cache.key_file(verdict["key"], standin_env)
    writer = threading.Timer(1.0, lambda: cache.write(path, verdict))
    writer.start()
    started = time.monotonic()
    assert check.verdict_for(CPU, paths={}, directory=standin_env, wait_s=30)["created"] == "by rank 0"
    assert calls == [] and time.monotonic() - started >= 0.9
    writer.join()


def test_two_processes_never_write_at_once(standin_env):
    # A second process blocks on the lock while this one holds it.
    path = standin_env / "selftest-lock.json"
    script = (f"import time; from pathlib import Path; from tformer.ops.selftest import cache\n"
              f"print('ready', flush=True); start = time.monotonic()\n"
              f"with cache.locked(Path({str(path)!r})): print(time.monotonic() - start)")
    with cache.locked(path):
        other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline().strip() == "ready"
        time.sleep(2.0)
    waited = float(other.communicate(timeout=120)[0])
    assert waited > 1.5


def test_selftest_command_runs_on_the_cpu_and_says_what_it_checked(standin_env):
    env = dict(os.environ, TFORMER_SELFTEST="1")
    result = subprocess.run([sys.executable, "-c", "import sys; from tformer.cli import main; sys.exit(main(sys.argv[1:]))",
                             "selftest", "--timeout", "300"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: CPU")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line and not line.startswith(("timings", " "))
            and not line.startswith("cached")}
    assert rows["triton"][:2] == ["ok", "8"] and rows["triton:atomic_dq"][0] == "ok"
    assert rows["cuda"][0] == "unavailable" and rows["cuda:sm80"][0] == "unavailable"
    assert any(line.strip().startswith("attention float32") for line in lines)
    assert "cached at " + str(standin_env) in result.stdout


def test_every_variant_is_a_path_of_its_own():
    """The self-check covers the backends' variants as candidates for auto, CUDA's as Triton's."""
    paths = check.kernel_paths()
    assert {"triton", "triton:atomic_dq", "triton:fa2", "cuda", "cuda:sm80"} <= set(paths)
    assert not {"torch", "reference"} & set(paths)


def test_auto_never_starts_a_check_inside_a_trace(monkeypatch):
    monkeypatch.setattr(auto, "_memo", {})
    monkeypatch.setattr(check, "_verdicts", {})
    monkeypatch.setenv("TFORMER_SELFTEST", "1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(auto, "measurements", lambda device: pytest.fail("a check started inside a trace"))
    q = torch.empty(2, 4, 128, 64, device="meta")
    order, why = auto.candidates("attention", torch.device("cuda"), torch.bfloat16, dict(q=q, k=q, v=q, causal=True))
    assert order == auto.FALLBACK and "torch.compile" in why
