"""kernels/ installs as tformer.kernels, editable or not, and no top-level folder of the
repository can hide an installed package of the same name.

PyPI has packages named ``kernels`` (Hugging Face's, which transformers imports), ``bench``,
``configs`` and ``examples``. Python run from the project root (``python -m pytest``, a notebook,
``python -c``) has the root first on sys.path; a folder there with an ``__init__.py`` would be
imported instead of the installed package. Without one, the folder is only a namespace portion,
and a regular package anywhere on sys.path wins over it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tformer
import tformer.kernels
import tformer.kernels.attention

REPO = Path(__file__).resolve().parents[1]
# Every top-level folder that holds Python, and the names PyPI has for some of them.
TOP_LEVEL = ("bench", "configs", "csrc", "examples", "kernels", "tests")


def _fake_site(tmp_path: Path) -> Path:
    """A folder of regular packages named like the top-level folders, each saying where it is."""
    site = tmp_path / "fake_site"
    for name in TOP_LEVEL:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    return site


def _which_packages(cwd: Path, pythonpath: list[Path]) -> list[str]:
    probe = ("import importlib; "
             f"print([getattr(importlib.import_module(n), 'WHO', 'the project folder') for n in {TOP_LEVEL!r}]); "
             "import tformer.kernels.attention as a; print(a.__file__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def test_this_environment_imports_tformer_kernels_from_the_repository():
    # tformer/kernels/__init__.py adds the checkout's kernels/ folder to the package's path.
    assert Path(tformer.kernels.attention.__file__).resolve() == REPO / "kernels" / "attention.py"
    assert Path(tformer.kernels.__file__).resolve() == REPO / "tformer" / "kernels" / "__init__.py"


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_folder_is_not_a_regular_package(name):
    assert not (REPO / name / "__init__.py").exists(), (
        f"{name}/__init__.py makes the folder hide any installed package named {name!r} from code run "
        "at the project root")


def test_checkout_root_never_hides_installed_packages(tmp_path):
    # cwd first on sys.path (as for `python -c` or `python -m pytest` at the root), the installed
    # packages after it: the installed ones must win, and tformer's kernels still import.
    names, kernels_file = _which_packages(REPO, [_fake_site(tmp_path)])
    assert names == str([f"installed {name}" for name in TOP_LEVEL])
    assert Path(kernels_file).resolve() == REPO / "kernels" / "attention.py"


def test_hugging_face_kernels_is_what_the_root_imports():
    kernels = pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed")
    result = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).resolve() == Path(kernels.__file__).resolve()
    assert REPO / "kernels" not in Path(result.stdout.strip()).resolve().parents


@pytest.mark.slow
def test_plain_install_puts_kernels_under_tformer_and_hides_nothing(tmp_path):
    target = tmp_path / "site"
    env = dict(os.environ, TFORMER_BUILD_CUDA="0")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, env=env, cwd=tmp_path, timeout=600)
    kernel_modules = {p.name for p in (REPO / "kernels").glob("*.py")}
    assert kernel_modules and kernel_modules <= {p.name for p in (target / "tformer" / "kernels").glob("*.py")}
    for name in TOP_LEVEL:
        assert not (target / name).exists(), f"{name}/ must not install as a top-level package"
    # The installed tformer first, then packages named like the repository's folders: both import.
    names, kernels_file = _which_packages(tmp_path, [target, _fake_site(tmp_path)])
    assert names == str([f"installed {name}" for name in TOP_LEVEL])
    assert Path(kernels_file).resolve() == (target / "tformer" / "kernels" / "attention.py").resolve()


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


def test_bench_modules_import_each_other_by_their_full_name():
    # bench/ is a namespace folder (no __init__.py, so it hides no installed `bench`): pytest
    # imports each bench_*.py as a top-level module, where a relative import has no package.
    relative = [f"{path.name}:{number}" for path in sorted((REPO / "bench").glob("*.py"))
                for number, line in enumerate(path.read_text().splitlines(), 1)
                if line.lstrip().startswith("from .")]
    assert not relative, f"use `from bench.X import ...` instead of a relative import: {relative}"
