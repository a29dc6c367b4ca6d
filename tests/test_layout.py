"""The package layout: no import cycles between tformer's modules, and the layering that the
README's "Layout" section describes (import-linter's layers contract in pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tformer

PACKAGE_DIR = Path(tformer.__file__).resolve().parent
REPO = PACKAGE_DIR.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The tformer modules that ``path`` imports, at module level or inside functions
    (a lazy import still ties two modules together), outside ``if TYPE_CHECKING:``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skipped = {id(child) for node in ast.walk(tree) if _type_checking_block(node) for child in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # `from a import b` names module a.b when b is a submodule, else a name in a.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts]
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None. A package's ``__init__`` importing its own
    submodules is not a cycle (``package -> package.sub`` is how packages re-export)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def edges(node):
        return [t for t in graph.get(node, ()) if not t.startswith(node + ".")]

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in edges(node):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    graph = {"tformer.a": {"tformer.b"}, "tformer.b": {"tformer.c"}, "tformer.c": {"tformer.a"}, "tformer": {"tformer.a"}}
    assert find_cycle(graph) == ["tformer.a", "tformer.b", "tformer.c", "tformer.a"]
    assert find_cycle({"tformer": {"tformer.a"}, "tformer.a": set()}) is None


def test_import_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # tasks/lm.py imports generation lazily, inside a method; models/decoder_lm.py imports .config.
    assert "tformer.generation.sampling" in graph["tformer.tasks.lm"]
    assert "tformer.models.config" in graph["tformer.models.decoder_lm"]
    # TYPE_CHECKING imports are not edges: tasks sit below training.
    assert not any(target.startswith("tformer.training") for target in graph["tformer.tasks.base"])


def test_layers_contract():
    """import-linter (dev extra) checks the layers in pyproject.toml: no layer imports upward."""
    pytest.importorskip("importlinter", reason="import-linter is not installed (it is in the dev extra)")
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# The only modules at tformer/'s top: the package, `python -m tformer`, the documented launcher
# script (`deepspeed tformer/train.py`), and three modules every layer may use.
TOP_LEVEL_MODULES = {"__init__", "__main__", "train", "optional", "schema", "build_info"}


def test_top_level_holds_only_entry_points_and_shared_modules():
    found = {path.stem for path in PACKAGE_DIR.glob("*.py")}
    assert found == TOP_LEVEL_MODULES, f"unexpected top-level modules: {sorted(found - TOP_LEVEL_MODULES)}; " \
                                       f"missing: {sorted(TOP_LEVEL_MODULES - found)}"


def test_public_entry_points_import():
    import tformer.__main__  # noqa: F401  (python -m tformer)
    import tformer.cli.classify  # noqa: F401  (tformer classify)
    import tformer.generation  # noqa: F401
    import tformer.train  # noqa: F401  (deepspeed tformer/train.py)
    import tformer.training  # noqa: F401

    assert callable(tformer.patch) and callable(tformer.unpatch)
    from tformer.models import DecoderLM, EncoderClassifier

    assert DecoderLM.from_pretrained and EncoderClassifier.from_pretrained


def test_readme_layout_matches_tree():
    """Every package named in the README's Layout section exists, and every package exists there."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = {line.split("`")[1].rstrip("/") for line in section.splitlines() if line.startswith("- `tformer/")}
    packages = {f"tformer/{p.parent.relative_to(PACKAGE_DIR)}".replace("/.", "") for p in PACKAGE_DIR.glob("*/__init__.py")}
    assert named == packages, f"README Layout names {sorted(named - packages)} not in the tree; " \
                              f"missing from README: {sorted(packages - named)}"
