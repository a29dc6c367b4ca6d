"""kernels/ installs as tformer.kernels (never as a top-level 'kernels'), editable or not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tformer
import tformer.kernels

REPO = Path(__file__).resolve().parents[1]


def test_this_environment_imports_tformer_kernels_from_the_repository():
    # Under `pip install -e .` the mapping package_dir={"tformer.kernels": "kernels"} points here.
    assert Path(tformer.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"


@pytest.mark.slow
def test_plain_install_puts_kernels_under_tformer(tmp_path):
    target = tmp_path / "site"
    env = dict(os.environ, TFORMER_BUILD_CUDA="0")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, env=env, cwd=tmp_path, timeout=600)
    assert (target / "tformer" / "kernels" / "__init__.py").exists()
    assert not (target / "kernels").exists(), "kernels/ must not install as a top-level package"
    probe = "import tformer.kernels, tformer.ops; print(tformer.kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(target)), timeout=300).stdout
    assert Path(out.strip()).resolve() == (target / "tformer" / "kernels" / "__init__.py").resolve()


def test_import_tformer_needs_neither_triton_nor_the_extension(tmp_path):
    # Hide triton and tformer._C; tformer must still import and the reference must run.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import importlib.abc, importlib.machinery, sys\n"
        "class Hide(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.') or name == 'tformer._C':\n"
        "            return importlib.machinery.ModuleSpec(name, self)\n"
        "    def create_module(self, spec):\n"
        "        raise ImportError(f'{spec.name} hidden by the test')\n"
        "    def exec_module(self, module):\n"
        "        pass\n"
        "sys.meta_path.insert(0, Hide())\n")
    probe = ("import torch, tformer; b = tformer.available_backends(); print(b['triton']); print(b['cuda']); "
             "print(tformer.ops.softmax(torch.zeros(3)).tolist())")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=300).stdout.splitlines()
    assert "Triton is not installed" in out[0] and "hidden by the test" in out[0]
    assert "extension" in out[1] or "no CUDA" in out[1] or "no CUDA support" in out[1]
    assert [round(p, 6) for p in eval(out[2])] == [0.333333] * 3
