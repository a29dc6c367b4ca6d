"""``tformer env`` on this machine (every line present, each reason right), the build record
it reads, and the check that refuses an extension built against another torch."""

import importlib
import json
import sys

import pytest
import torch

import tformer
from tformer import build_info
from tformer.cli import env as env_report
from tformer.backends.cuda import extension_error


@pytest.fixture(scope="module")
def report():
    return env_report.collect()


def _line(lines: list[str], prefix: str) -> str:
    found = [line for line in lines if line.startswith(prefix)]
    assert len(found) == 1, f"expected one line starting {prefix!r}, got {found}"
    return found[0]


def test_text_report_has_every_line_with_the_right_reasons(report):
    lines = env_report.format_report(report)
    assert _line(lines, "tformer: ").startswith(f"tformer: {tformer.__version__} (")
    assert _line(lines, "Python: ").startswith(f"Python: {sys.version.split()[0]}")
    assert _line(lines, "torch: ").startswith(f"torch: {torch.__version__} (CUDA {torch.version.cuda or 'none'}")
    _line(lines, "Triton: ")
    _line(lines, "CUDA toolkit: ")
    _line(lines, "NVIDIA driver: ")
    for name, why in tformer.available_backends().items():
        shown = "available" if why is None else f"unavailable: {why}"
        assert _line(lines, f"backend {name}: ") == f"backend {name}: {shown}"
    assert _line(lines, "backend reference: ") == "backend reference: available"
    record = build_info.load_record()
    extension = _line(lines, "CUDA extension: ")
    if record is None or not record["cuda_extension"]:
        assert extension.startswith("CUDA extension: not built (")
        assert _line(lines, "CUDA extension archs cover") == "CUDA extension archs cover the GPUs: no extension"
    else:
        assert f"built for archs {';'.join(record['arch_list'])} against torch {record['torch']}" in extension
    for name in ("DeepSpeed", "FSDP2", "W&B"):
        _line(lines, f"{name}: ")
    for module, _, purpose in env_report.OPTIONAL_LIBRARIES:
        if module not in ("deepspeed", "wandb"):
            _line(lines, f"{module} [{purpose}]: ")
    if not torch.cuda.is_available():
        assert _line(lines, "GPUs: ") == "GPUs: none (no CUDA GPU is visible (torch.cuda.is_available() is False))"
        assert tformer.available_backends()["cuda"] is not None
    else:
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            assert f"compute capability {major}.{minor}" in _line(lines, f"GPU {index}: ")


def test_library_lines_say_why_an_import_fails():
    status = env_report.import_status("tformer_surely_missing_module", "tformer-surely-missing")
    assert status == {"ok": False, "error": "ModuleNotFoundError: No module named 'tformer_surely_missing_module'"}
    assert env_report.import_status("json", "no-such-dist") == {"ok": True, "version": None}


def test_fsdp2_and_deepspeed_report_what_imports(report):
    assert report["fsdp2"]["ok"] is True  # torch 2.6+ has torch.distributed.fsdp.fully_shard
    deepspeed = report["libraries"]["deepspeed"]
    try:
        importlib.import_module("deepspeed")
        assert deepspeed["ok"] is True
    except ImportError:
        assert deepspeed["ok"] is False


def test_json_report_round_trips(capsys, report):
    assert env_report.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"]["version"] == torch.__version__
    assert data["backends"] == tformer.available_backends()
    assert set(data) == set(report)


# --- the build record ------------------------------------------------------------------------------

def test_arch_coverage_follows_cuda_binary_compatibility():
    assert build_info.arch_covers(["8.0", "9.0"], (9, 0))
    assert build_info.arch_covers(["8.0"], (8, 6))  # sm_80 SASS runs on sm_86
    assert not build_info.arch_covers(["8.6"], (8, 0))
    assert not build_info.arch_covers(["8.0", "9.0"], (10, 0))  # no PTX: a Blackwell cannot run it
    assert build_info.arch_covers(["9.0+PTX"], (10, 0))  # PTX is JIT-compiled for newer GPUs
    assert build_info.parse_arch("9.0a") == (9, 0, False)


def test_report_says_whether_the_recorded_archs_cover_a_gpu():
    record = {"cuda_extension": True, "arch_list": ["8.0"], "torch": torch.__version__, "why_not": None}
    gpus = [{"index": 0, "name": "H100", "capability": "9.0", "memory_gib": 80.0},
            {"index": 1, "name": "A100", "capability": "8.0", "memory_gib": 80.0}]
    build = env_report._build(record, gpus, torch.__version__)
    assert build["covers"] == {"0": False, "1": True} and build["torch_mismatch"] is None


# --- the ABI check -----------------------------------------------------------------------------------

@pytest.fixture
def record_from_another_torch(tmp_path, monkeypatch):
    path = tmp_path / "_build_info.json"
    path.write_text(json.dumps({"cuda_extension": True, "why_not": None, "torch": "2.0.0+cu118",
                                "torch_cuda": "11.8", "arch_list": ["8.0", "9.0"]}))
    monkeypatch.setattr(build_info, "RECORD_PATH", path)
    monkeypatch.delitem(sys.modules, "tformer._C", raising=False)
    return path


def test_importing_an_extension_built_for_another_torch_says_to_rebuild(record_from_another_torch):
    with pytest.raises(ImportError) as error:
        exec("import tformer._C")
    message = str(error.value)
    assert f"built against torch 2.0.0+cu118 but torch {torch.__version__} is installed" in message
    assert "pip install --no-build-isolation" in message and "undefined symbol" not in message
    assert extension_error() == message  # the cuda backend's reason is the same sentence
    lines = env_report.format_report(env_report.collect())
    assert _line(lines, "CUDA extension ABI: ") == f"CUDA extension ABI: {message}"


def test_a_matching_or_missing_record_lets_the_import_proceed():
    assert build_info.torch_mismatch(None, "2.14.1") is None
    assert build_info.torch_mismatch({"cuda_extension": False, "torch": None}, "2.14.1") is None
    assert build_info.torch_mismatch({"cuda_extension": True, "torch": "2.14.1"}, "2.14.1") is None
