"""A wheel built as the README says installs into a fresh venv, and its ``tformer env`` reports
the build it holds (read from the record setup.py writes into the wheel).

The wheel is built with TFORMER_BUILD_CUDA=0 (compiling csrc/ takes minutes on 2 cores); the
arch list of a CUDA build is checked by .ci/run, whose install compiles the extension.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_installs_in_a_fresh_venv_and_reports_its_build(tmp_path):
    env = dict(os.environ, TFORMER_BUILD_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, env=env, cwd=tmp_path, timeout=240)
    (wheel,) = wheels.glob("tformer-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record = json.loads(archive.read("tformer/_build_info.json"))
    assert {"tformer/cli/__init__.py", "tformer/__main__.py", "tformer/kernels/__init__.py", "tformer/kernels/attention.py",
            "tformer/assets/tinyshakespeare.txt",
            "tformer/configs/ds.json"} <= names
    assert record["cuda_extension"] is False and record["why_not"] == "TFORMER_BUILD_CUDA=0"
    assert any(name.endswith("entry_points.txt") for name in names)

    # A fresh venv that sees torch and the other dependencies (not tformer) through a .pth file.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    base_site = Path(torch.__file__).resolve().parents[1]
    Path(site, "base_site.pth").write_text(f"{base_site}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, env=env, cwd=tmp_path, timeout=240)

    result = subprocess.run([str(venv / "bin" / "tformer"), "env", "--json"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert Path(report["tformer"]["location"]).resolve() == Path(site, "tformer").resolve()
    assert report["build"]["record"] == str(Path(site, "tformer", "_build_info.json"))
    assert report["build"]["cuda_extension"] is False and report["build"]["arch_list"] == record["arch_list"]
    assert report["build"]["why_not"] == "TFORMER_BUILD_CUDA=0"
    assert report["backends"]["reference"] is None
