"""tformer's dependencies: every one has the lower bound it was tested at, an upper bound only
with its reason, no extra needs a package that builds from an sdist with ``setup_requires``, and
(in CI, which installs with an empty pip cache) the optional integrations are the newest
releases the index serves, so the next upstream break shows up in CI, not in a user's terminal.

The checks that ask the package index run when ``TFORMER_CHECK_INDEX=1``, and the sdist check
reads the report of the install it checks (``pip install --report FILE``) from
``TFORMER_INSTALL_REPORT``; ``.ci/run`` sets both. Elsewhere they skip, saying so.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SETUP = (REPO / "setup.py").read_text()
# The optional integrations a user reaches through tformer, by distribution and import name.
INTEGRATIONS = {"transformers": "transformers", "sentence-transformers": "sentence_transformers",
                "deepspeed": "deepspeed", "wandb": "wandb", "librosa": "librosa", "jiwer": "jiwer",
                "seqscore": "seqscore"}

needs_index = pytest.mark.skipif(os.environ.get("TFORMER_CHECK_INDEX") != "1",
                                 reason="asks the package index; set TFORMER_CHECK_INDEX=1 (CI does)")


def requirements() -> list[Requirement]:
    """Every requirement setup.py declares, install_requires and all extras (read from setup.py
    itself, so an installed copy's metadata, stale after an edit, cannot hide one)."""
    found = []
    for node in ast.walk(ast.parse(SETUP)):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            value = ast.literal_eval(node.value)
            found += value if isinstance(value, list) else [r for extra in value.values() for r in extra]
    assert found, "setup.py declares no requirements?"
    return [Requirement(line) for line in found]


def _name(requirement: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", requirement.name).lower()


def test_every_dependency_has_a_tested_lower_bound():
    missing = [str(r) for r in requirements() if not any(s.operator in (">=", "==", "~=") for s in r.specifier)]
    assert not missing, f"requirements without a lower bound: {missing}"


def test_an_upper_bound_comes_with_its_reason():
    for requirement in requirements():
        if any(s.operator in ("<", "<=", "!=") for s in requirement.specifier):
            line = next(n for n, text in enumerate(SETUP.splitlines()) if f'"{requirement.name}' in text)
            comment = " ".join(SETUP.splitlines()[max(0, line - 3): line + 1])
            assert "#" in comment, f"{requirement}: an upper bound needs a comment saying why (setup.py line {line + 1})"


def test_installed_releases_meet_the_bounds():
    wrong = []
    for requirement in requirements():
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # an extra not installed here
        if not requirement.specifier.contains(installed, prereleases=True):
            wrong.append(f"{requirement.name} {installed} (tformer needs {requirement.specifier})")
    assert not wrong, wrong


def sdist_setup_requires(sdist: bytes) -> list[str]:
    """The ``setup_requires`` an sdist's setup.py or setup.cfg declares (pip fetches those with the
    legacy, unpinned mechanism that broke seqeval's install); [] when it declares none."""
    found = []
    with tarfile.open(fileobj=io.BytesIO(sdist)) as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")
            if len(parts) == 2 and parts[1] in ("setup.py", "setup.cfg") and member.isfile():
                text = archive.extractfile(member).read().decode("utf-8", "replace")
                found += re.findall(r"setup_requires\s*[=:]\s*([^\n]*)", text)
    return found


def _sdist(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"pkg-1.0/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_the_sdist_check_finds_setup_requires():
    assert sdist_setup_requires(_sdist({"setup.py": "setup(name='x', setup_requires=['setuptools_scm'])"})) == [
        "['setuptools_scm'])"]
    assert sdist_setup_requires(_sdist({"setup.cfg": "[options]\nsetup_requires =\n  setuptools_scm\n"})) == ["setuptools_scm"]
    assert sdist_setup_requires(_sdist({"setup.py": "setup(name='x', install_requires=['numpy'])"})) == []


def _pip(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"), **kwargs)


@pytest.mark.skipif(not os.environ.get("TFORMER_INSTALL_REPORT"),
                    reason="reads the report of an install of every extra; set TFORMER_INSTALL_REPORT (CI does)")
def test_no_extra_needs_an_sdist_with_setup_requires(tmp_path):
    # What the install of every extra fetched, as the index served it (pip install --report).
    report = json.loads(Path(os.environ["TFORMER_INSTALL_REPORT"]).read_text())
    urls = [item["download_info"]["url"] for item in report["install"]]
    assert any(url.endswith(".whl") for url in urls), "the report lists no wheel: is it the extras' install?"
    offenders = {}
    for url in urls:
        if url.endswith(".whl") or url.startswith("file:"):
            continue  # a wheel, or tformer itself
        fetched = _pip("download", "--no-deps", "--no-build-isolation", "--quiet", "-d", str(tmp_path), url)
        assert fetched.returncode == 0, fetched.stderr[-3000:]
        name = url.rsplit("/", 1)[-1].split("#")[0]
        declared = sdist_setup_requires((tmp_path / name).read_bytes())
        if declared:
            offenders[name] = declared
    assert not offenders, f"extras need sdists that fetch build dependencies with setup_requires: {offenders}"


@needs_index
@pytest.mark.parametrize("distribution", sorted(INTEGRATIONS))
def test_integration_is_the_newest_release_and_imports(distribution):
    __import__(INTEGRATIONS[distribution])
    installed = Version(metadata.version(distribution))
    listing = _pip("index", "versions", distribution)
    assert listing.returncode == 0, listing.stderr[-2000:]
    newest = Version(re.search(rf"^{re.escape(distribution)} \(([^)]+)\)", listing.stdout, re.I | re.M).group(1))
    capped = next((r for r in requirements() if _name(r) == distribution and not r.specifier.contains(newest)), None)
    if capped is not None:
        pytest.skip(f"{distribution} {newest} is excluded by tformer's bound {capped.specifier} (see setup.py's reason)")
    assert installed == newest, (f"{distribution}: CI installed {installed}, but the index serves {newest}; "
                                 "test the newest release, or bound it in setup.py with the reason")
