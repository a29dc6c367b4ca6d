"""Optional dependencies: a missing one is named with the extra that installs it."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tformer import optional
from tformer.data.speech import load_split
from tformer.nn.speech import LogMel
from tformer.optional import OPTIONAL, MissingDependency, require
from tformer.tasks.speech_metrics import error_counts
from tformer.training.config import read_config_file

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _setup_extras() -> dict[str, list[str]]:
    """setup.py's extras_require, read without running setup()."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def test_every_optional_dependency_is_in_the_extra_it_names():
    extras = _setup_extras()
    for module, (distribution, extra) in OPTIONAL.items():
        names = {re.split(r"[<>=!~\[ ]", requirement)[0].lower() for requirement in extras[extra]}
        assert distribution.lower() in names, f"{module}: {distribution} is not in setup.py's extra {extra!r}: {names}"


def test_an_installed_dependency_is_returned():
    assert require("yaml", "a test").safe_load("a: 1") == {"a": 1}


def test_a_missing_dependency_names_what_needed_it_and_the_extra(monkeypatch):
    monkeypatch.setitem(OPTIONAL, "tformer_absent_package", ("tformer-absent-package", "speech"))
    with pytest.raises(MissingDependency, match=r"^LogMel needs tformer-absent-package, which is not installed: "
                                                r"pip install 'tformer\[speech\]' \(or pip install tformer-absent-package\) "
                                                r"\[ModuleNotFoundError: No module named 'tformer_absent_package'\]$") as raised:
        require("tformer_absent_package.sub", "LogMel")
    assert isinstance(raised.value.__cause__, ModuleNotFoundError)


def test_import_failure_names_where_a_shadowing_module_came_from(tmp_path, monkeypatch):
    # A package that loads but lacks what the importer wanted: the message says where it came from.
    (tmp_path / "tformer_shadow_package").mkdir()
    (tmp_path / "tformer_shadow_package" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as raised:
        exec("from tformer_shadow_package import Missing")
    described = optional.import_failure(raised.value)
    assert described.startswith("ImportError: cannot import name 'Missing' from 'tformer_shadow_package'")
    assert str(tmp_path / "tformer_shadow_package") in described


def test_a_clash_with_the_integrations_dependencies_reads_as_a_clash(tmp_path):
    # The failure this guards against: a folder named like a package transformers imports
    # (Hugging Face's `kernels`) in the directory Python runs from.
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    probe = ("import tformer.integrations.transformers as hf; print('imported')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    if result.returncode == 0:
        pytest.skip("this transformers does not import 'kernels' on the integration's path")
    last = result.stderr.strip().splitlines()[-1]
    assert "tformer.integrations.transformers needs Hugging Face transformers" in last
    assert "'kernels'" in last and str(tmp_path / "kernels") in last, last
    assert "The above exception was the direct cause" in result.stderr


def test_a_broken_install_keeps_its_own_error(tmp_path, monkeypatch):
    # The package is there but one of its own imports fails: that error is the useful one.
    (tmp_path / "tformer_broken_package").mkdir()
    (tmp_path / "tformer_broken_package" / "__init__.py").write_text("import tformer_missing_inner_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(OPTIONAL, "tformer_broken_package", ("tformer-broken-package", "viz"))
    with pytest.raises(ModuleNotFoundError) as raised:
        require("tformer_broken_package", "a test")
    assert raised.value.name == "tformer_missing_inner_module" and not isinstance(raised.value, MissingDependency)


def test_only_known_optional_dependencies_are_required():
    with pytest.raises(ValueError, match=r"'numpy' is not one of tformer's optional dependencies"):
        require("numpy", "a test")


@pytest.mark.parametrize("module, call, needed_by", [
    ("librosa", lambda folder: LogMel(), "LogMel"),
    ("jiwer", lambda folder: error_counts(["a"], ["a"]), "error_counts"),
    ("yaml", lambda folder: read_config_file(_write(folder / "run.yaml", "run: {steps: 3}\n")), "config: reading run.yaml"),
    ("soundfile", lambda folder: load_split(folder, "train"), "load_split"),
])
def test_tformer_code_paths_name_the_missing_extra(monkeypatch, tmp_path, module, call, needed_by):
    # None in sys.modules makes `import module` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, module, None)
    _, extra = OPTIONAL[module]
    with pytest.raises(MissingDependency, match=rf"^{re.escape(needed_by)} needs .*pip install 'tformer\[{extra}\]'"):
        call(tmp_path)


def test_the_module_has_no_third_party_imports():
    # It sits below every layer (pyproject's import-linter contract) and must import anywhere.
    imports = [node for node in ast.walk(ast.parse(Path(optional.__file__).read_text()))
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name for node in imports for alias in node.names} | {node.module for node in imports
                                                                         if isinstance(node, ast.ImportFrom)}
    assert names <= {"__future__", "annotations", "importlib", "sys", "types", "ModuleType"}, names
