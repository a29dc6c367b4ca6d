"""README.md and docs/: links resolve, the commands shown run as written, the README stays a
front page, the pictures come from docs/make_figures.py, and (when MkDocs is installed and the
pictures are drawn) the site builds with ``mkdocs build --strict``.

The checks themselves live in docs/check_docs.py, which CI also runs on its own."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_docs = _load("check_docs")
make_figures = _load("make_figures")


def test_every_link_and_anchor_resolves():
    figures = set(make_figures.FIGURES)
    problems = [p for path in check_docs.markdown_files() for p in check_docs.check_links(path, figures)]
    assert problems == []


def test_every_command_shown_exists_and_takes_its_flags():
    problems = [p for path in check_docs.markdown_files() for p in check_docs.check_commands(path)]
    assert problems == []


def test_the_checker_finds_broken_links_anchors_and_commands(tmp_path):
    """The two tests above can fail: each kind of breakage is reported."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](#title) [gone](missing.md) [bad anchor](#nowhere)\n"
        "[readme](" + str(REPO / "README.md") + "#no-such-heading)\n\n"
        "```bash\n"
        "tformer train --config ds.json --set run.stepz=3\n"
        "tformer sample --no-such-flag\n"
        "tformer frobnicate\n"
        "python tformer/train.py --config no_such_config.json\n"
        "python -m tformer visualize attention --checkpoint x --text y --out z.png\n"
        "python -m tformer.sample --checkpoint x\n"
        "bash bench/gpu_session.sh no-such-stage\n"
        "pytest tests/test_no_such_file.py\n"
        "```\n\n`tformer ablate --list` and `tformer COMMAND --help` are mentions.\n")
    links = check_docs.check_links(page, set())
    assert len(links) == 3, links
    assert any("missing.md" in p for p in links) and any("#nowhere" in p for p in links)
    assert any("no-such-heading" in p for p in links)
    commands = check_docs.check_commands(page)
    assert len(commands) == 7, commands
    for needle in ("stepz", "--no-such-flag", "frobnicate", "no_such_config", "no-such-stage", "test_no_such_file",
                   "tformer.sample"):
        assert any(needle in p for p in commands), (needle, commands)


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first_screen = "\n".join(readme.splitlines()[:40])
    # what it is, how to install and run it, how to use the ops, where the figures and the docs are
    for needle in ("tformer is", "pip install", "--config ds.json", "#use-the-ops-in-your-own-model", "#figures",
                   "docs/index.md"):
        assert needle in first_screen, needle
    for needle in ("tformer.ops.attention", "scaled_dot_product_attention", "tformer.patch",
                   'attn_implementation="tformer"', "not yet measured on a GPU", "## Layout"):
        assert needle in readme, needle


def test_no_internal_notes_in_readme_or_docs():
    pattern = re.compile(r"\bissues? \d+|#\d{2,}\b|these machines|the machines this|lent GPU|/work/|shared/data"
                         r"|ANCHORS\.md|engineers", re.IGNORECASE)
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in check_docs.markdown_files()
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_every_figure_the_script_draws_is_shown():
    shown = {Path(target).name for path in check_docs.markdown_files()
             for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", path.read_text())}
    assert set(make_figures.FIGURES) <= shown, set(make_figures.FIGURES) - shown


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed: pip install -e '.[docs]'")
def test_site_builds_strict_and_renders_every_public_name(tmp_path):
    missing = [name for name in make_figures.FIGURES if not (REPO / "docs" / "figures" / name).is_file()]
    if missing:
        pytest.skip(f"the pictures are not drawn ({missing}): run python docs/make_figures.py first")
    site = tmp_path / "site"
    mkdocs = shutil.which("mkdocs") or sys.executable
    command = [mkdocs] if mkdocs != sys.executable else [sys.executable, "-m", "mkdocs"]
    result = subprocess.run([*command, "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert check_docs.check_api(site) == []

