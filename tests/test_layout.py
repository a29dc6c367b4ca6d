"""The package layout: no import circle anywhere in the tree (tformer/, kernels/ and bench/), and
the layering that the README's "Layout" section describes (import-linter's layers contract in
pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tformer

PACKAGE_DIR = Path(tformer.__file__).resolve().parent
REPO = PACKAGE_DIR.parent
# Folder -> the dotted name its modules are imported by. kernels/ has no __init__.py and is
# imported as tformer.kernels (tformer/kernels/__init__.py extends its __path__); bench/ is a
# namespace package imported from the repository root as bench.
SOURCE_ROOTS = {"tformer": PACKAGE_DIR, "tformer.kernels": REPO / "kernels", "bench": REPO / "bench"}
# The same modules under the other names code may spell them with.
ALIASES = {"kernels": "tformer.kernels"}


def module_name(path: Path) -> str:
    """The dotted name ``path`` is imported by (kernels/attention.py -> tformer.kernels.attention)."""
    path = path.resolve()
    for prefix, root in sorted(SOURCE_ROOTS.items(), key=lambda item: -len(str(item[1]))):
        if path.is_relative_to(root):
            parts = (*prefix.split("."), *path.relative_to(root).with_suffix("").parts)
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(f"{path} is in none of {sorted(SOURCE_ROOTS)}")


def source_files() -> list[Path]:
    return sorted(path for root in SOURCE_ROOTS.values() for path in root.rglob("*.py")
                  if "__pycache__" not in path.parts)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _canonical(target: str) -> str:
    for alias, name in ALIASES.items():
        if target == alias or target.startswith(alias + "."):
            return name + target[len(alias):]
    return target


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules that ``path`` imports, at module level or inside functions (a lazy
    import still ties two modules together), outside ``if TYPE_CHECKING:``."""
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
        for target in map(_canonical, targets):
            # `from a import b` names module a.b when b is a submodule, else a name in a.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle: the strongly connected components of more than one module (Tarjan),
    each as a closed path through the component (``[a, b, a]``), sorted.

    A package's ``__init__`` importing its own submodules is not counted (``package ->
    package.sub`` is how packages re-export, while ``from package import sub`` in the submodule
    runs the package's ``__init__`` first, by Python's rules, whatever the package holds).
    """
    def edges(node):
        return sorted(t for t in graph.get(node, ()) if t in graph and not t.startswith(node + "."))

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(node):  # recursive Tarjan; the tree is a few hundred modules deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges(node):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(_closed_path(component, edges) for component in components)


def _closed_path(component: set[str], edges) -> list[str]:
    """A circle through ``component``'s first module (by name), back to it: breadth-first, so
    the circle printed is a shortest one."""
    start = min(component)
    parents = {start: None}
    queue = [start]
    for node in queue:
        for target in edges(node):
            if target == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if target in component and target not in parents:
                parents[target] = node
                queue.append(target)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_no_import_circles():
    circles = import_circles(import_graph())
    assert circles == [], "import circles (one path through each):\n" + "\n".join(" -> ".join(c) for c in circles)


def test_circle_finder_finds_every_circle():
    graph = {"tformer.a": {"tformer.b"}, "tformer.b": {"tformer.c"}, "tformer.c": {"tformer.a"},
             "tformer": {"tformer.a"}, "bench.x": {"tformer.kernels.y"}, "tformer.kernels.y": {"bench.x"},
             "tformer.d": {"tformer.a"}}
    assert import_circles(graph) == [["bench.x", "tformer.kernels.y", "bench.x"],
                                     ["tformer.a", "tformer.b", "tformer.c", "tformer.a"]]
    assert import_circles({"tformer": {"tformer.a"}, "tformer.a": {"tformer"}}) == []  # a package's own __init__
    assert import_circles({"tformer.a": {"tformer.b"}, "tformer.b": set()}) == []


def test_import_graph_sees_lazy_relative_and_aliased_imports():
    graph = import_graph()
    # tasks/lm.py imports generation lazily, inside a method; models/decoder_lm.py imports .config.
    assert "tformer.generation.sampling" in graph["tformer.tasks.lm"]
    assert "tformer.models.config" in graph["tformer.models.decoder_lm"]
    # TYPE_CHECKING imports are not edges: tasks sit below training.
    assert not any(target.startswith("tformer.training") for target in graph["tformer.tasks.base"])
    # kernels/ as tformer.kernels (relative imports there too), bench/ as bench.
    assert "tformer.kernels.launch" in graph["tformer.kernels.attention"]
    assert "tformer.kernels.attention" in graph["tformer.backends.triton.attention"]
    assert "bench.candidates" in graph["bench.bench_attention"]
    assert module_name(REPO / "kernels" / "attention.py") == "tformer.kernels.attention"


# What kernels/ may import: its own modules and the layers below it in pyproject.toml's contract
# (grimp does not scan kernels/, so the contract cannot check this side of it).
BELOW_KERNELS = ("tformer.kernels", "tformer.ops", "tformer.schema", "tformer.optional", "tformer.build_info")


def test_kernels_import_only_lower_layers_and_the_package_never_imports_bench():
    graph = import_graph()
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items() if module.startswith("tformer.kernels.")
                    for target in targets if not target.startswith(BELOW_KERNELS))
    assert upward == [], "kernels/ imports from a layer above it: " + ", ".join(upward)
    into_bench = sorted(f"{module} -> {target}" for module, targets in graph.items() if module.startswith("tformer")
                        for target in targets if target.startswith("bench"))
    assert into_bench == [], "the package imports the benchmarks: " + ", ".join(into_bench)


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
