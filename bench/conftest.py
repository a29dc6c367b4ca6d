"""pytest setup for ``pytest bench --benchmark-only``: collects ``bench_*.py``, times on the
GPU with CUDA events, measures the device's ceilings once per session, and records the
software versions in the JSON's machine_info."""

from __future__ import annotations

import platform

import pytest
import torch

import tformer

from bench.ceilings import Ceilings, measure_ceilings
from bench.shapes import DEVICE
from bench.timing import L2Flusher, clock_for


def pytest_collect_file(file_path, parent):
    # pyproject.toml's python_files is test_*.py; benchmark files are bench_*.py. A file named
    # on the command line is already collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    # Every benchmark in this directory reads the clock of the device it runs on.
    marker = pytest.mark.benchmark(timer=clock_for(DEVICE))
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(marker)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["tformer"] = {
        "device": device_name(DEVICE),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "tformer": tformer.__version__,
        "command": " ".join(["pytest", *config.invocation_params.args]),
        "backends": {name: reason or "available" for name, reason in tformer.available_backends().items()},
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def ceilings(device) -> Ceilings:
    """Copy bandwidth and matmul throughput of this device, measured once in this session."""
    return measure_ceilings(device)


@pytest.fixture(scope="session")
def flusher(device) -> L2Flusher:
    return L2Flusher(device)


@pytest.fixture(scope="session")
def device_info(device) -> dict:
    return {"device": device_name(device)}
