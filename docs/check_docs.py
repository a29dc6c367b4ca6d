"""Check README.md and docs/: every link resolves, and every command shown runs as written.

    python docs/check_docs.py                       # links, anchors and commands (a few seconds)
    python docs/check_docs.py --site build/site     # also: the API pages render every public name

- **Links**: every relative link and image of README.md and docs/**/*.md names an existing file
  (a picture under docs/figures/ must be one docs/make_figures.py draws), and a ``#anchor`` into
  a Markdown file names one of its headings.
- **Commands**: every ``tformer ...`` (or ``python -m tformer ...``), ``python -m ...``, ``python SCRIPT``, ``deepspeed`` /
  ``torchrun ... SCRIPT`` and ``bash SCRIPT STAGE`` line of a shell code block (and every
  ``tformer ...`` in inline code) exists and accepts its flags: tformer's own commands are parsed
  by their argparse parser in this process, with ``--config`` resolved and every ``--set`` applied
  to it; other modules and scripts must answer ``--help``. ``pytest`` paths must exist.
- **API** (``--site``): each name in ``__all__`` of tformer.ops, tformer.nn and tformer.models
  has an entry on its API page of the built site.

Exit status 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# bench/ is a folder of the repository, not an installed package: importable from the end of the
# path (the front would let the top-level kernels/ shadow the installed package of that name).
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
API_PAGES = {"tformer.ops": "api/ops", "tformer.nn": "api/nn", "tformer.models": "api/models"}

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
SHELL_LANGS = ("bash", "sh", "shell", "console")
SEPARATORS = ("&&", "||", ";", "|")
MENTION = "MENTION"
# Scripts that are thin shims over a tformer module with an argparse parser: parsed in-process.
TRAIN_SHIMS = {"tformer/train.py": "tformer.cli.train"}


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def split_code(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(the text with fenced blocks blanked out, [(language, body)] of the fenced blocks)."""
    blocks = [(m["lang"], re.sub(rf"^{m['indent']}", "", m["body"], flags=re.MULTILINE)) for m in FENCE.finditer(text)]
    return FENCE.sub("", text), blocks


# ---------------------------------------------------------------- links

def slug(heading: str) -> str:
    """The anchor MkDocs (toc) and GitHub give a heading: lower case, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    text, _ = split_code(path.read_text())
    return frozenset(slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line))


def figure_names() -> set[str]:
    sys.path.insert(0, str(DOCS))
    try:
        return set(importlib.import_module("make_figures").FIGURES)
    finally:
        sys.path.remove(str(DOCS))


def check_links(path: Path, figures: set[str]) -> list[str]:
    problems = []
    text, _ = split_code(path.read_text())
    where = _shown(path)
    for match in LINK.finditer(text):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http(s), mailto: not fetched
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(REPO) and not resolved.exists():
            problems.append(f"{where}: link '{target}': {resolved} does not exist")
        elif not resolved.is_relative_to(REPO) and path.is_relative_to(REPO):
            problems.append(f"{where}: link '{target}' leaves the repository")
        elif resolved.parent == DOCS / "figures" and not resolved.exists():
            if resolved.name not in figures:
                problems.append(f"{where}: picture '{target}' is not one docs/make_figures.py draws {sorted(figures)}")
        elif not resolved.exists():
            problems.append(f"{where}: link '{target}': {_shown(resolved)} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: link '{target}': no heading with anchor '#{anchor}' in "
                            f"{_shown(resolved)} (has {sorted(anchors(resolved))})")
    return problems


# ---------------------------------------------------------------- commands

def shell_commands(path: Path) -> list[str]:
    """The simple commands shown: shell code blocks' lines (continuations joined, comments
    dropped, split at && ; | ||) and inline ``tformer ...`` code, which may name a command
    without its required arguments (marked with a leading ``MENTION``)."""
    text, blocks = split_code(path.read_text())
    commands = []
    for lang, body in blocks:
        if lang not in SHELL_LANGS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as error:
                commands.append(f"<unparsable: {line.strip()} ({error})>")
                continue
            current: list[str] = []
            for token in tokens + [";"]:
                if token in SEPARATORS:
                    if current:
                        commands.append(shlex.join(current))
                    current = []
                else:
                    current.append(token)
    for span in INLINE_CODE.findall(text):
        words = span.split()
        # `tformer COMMAND --help` and `tformer ...` name placeholders, not commands
        if len(words) >= 2 and words[0] == "tformer" and words[1][0].isalpha() and not words[1].isupper():
            commands.append(f"{MENTION} {span}")
    return commands


def check_command(command: str) -> str | None:
    """None when the command exists and takes its flags, else why not."""
    if command.startswith("<unparsable"):
        return command
    tokens = shlex.split(command)
    mention = tokens[:1] == [MENTION]
    tokens = tokens[1:] if mention else tokens
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]  # VAR=value prefixes
    if not tokens:
        return None
    program, args = tokens[0], tokens[1:]
    if program == "tformer":
        why = _check_tformer(args)
        # prose may name a command and some of its options without the required ones
        return None if mention and why and "arguments are required" in why else why
    if program in ("python", "python3"):
        if args[:2] == ["-m", "tformer"]:
            return _check_tformer(args[2:])  # python -m tformer COMMAND: the tformer command
        if args[:1] == ["-m"] and len(args) >= 2:
            # this project's modules only (python3 -m venv, -m build: not its commands)
            return _check_module(args[1], args[2:]) if args[1].split(".")[0] in ("tformer", "bench") else None
        if args and args[0].endswith(".py"):
            return _check_script(args[0], args[1:])
        return None  # python -c, python3 -m venv ...: not a tformer command
    if program in ("deepspeed", "torchrun"):
        scripts = [i for i, token in enumerate(args) if token.endswith(".py")]
        if not scripts:
            return f"'{program}' starts no .py script"
        return _check_script(args[scripts[0]], args[scripts[0] + 1:])
    if program == "bash" and args and args[0].endswith(".sh"):
        return _check_bash(args[0], args[1:])
    if program == "pytest":
        # positional paths only (not the value of an option such as --benchmark-json FILE)
        paths = [a for before, a in zip(["pytest", *args], args) if not before.startswith("-") or "=" in before]
        missing = [a for a in paths if re.match(r"^(tests|bench|examples)\b", a) and not (REPO / a.split("::")[0]).exists()]
        return f"pytest: no such path {missing}" if missing else None
    return None  # pip, docker, cmake, mkdocs, ...: not checked here


def _check_tformer(args: list[str]) -> str | None:
    from tformer.cli import COMMANDS, build_parser, load_command

    if not args or args[0].startswith("-"):
        return _parse(build_parser(), args)
    if args[0] not in COMMANDS:
        return f"'tformer {args[0]}' is not a tformer command ({sorted(COMMANDS)})"
    return _check_module(COMMANDS[args[0]].module, args[1:], load=lambda: load_command(args[0]))


def _check_module(name: str, args: list[str], load=None) -> str | None:
    try:
        module = load() if load else importlib.import_module(name)
    except (ImportError, SystemExit) as error:
        return f"module {name} does not import: {error}"
    if hasattr(module, "build_parser"):
        return _parse(module.build_parser(), args)
    return _answers_help((sys.executable, "-m", name))


def _check_script(script: str, args: list[str]) -> str | None:
    if not (REPO / script).is_file():
        return f"no such script: {script}"
    if Path(script).as_posix() in TRAIN_SHIMS:
        return _check_module(TRAIN_SHIMS[Path(script).as_posix()], args)
    return _answers_help((sys.executable, str(REPO / script)))


def _check_bash(script: str, args: list[str]) -> str | None:
    path = REPO / script
    if not path.is_file():
        return f"no such script: {script}"
    if path.name == "gpu_session.sh":
        stages = set(re.findall(r"^\s+([a-z][a-z-]*)\)", path.read_text(), flags=re.MULTILINE))
        unknown = [a for a in args if a not in stages]
        if unknown:
            return f"{script}: unknown stages {unknown} (has {sorted(stages)})"
    return None


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """Parse ``args`` like the command would; a --config is resolved and its --set applied."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parsed = parser.parse_args(args)
    except SystemExit as error:
        return None if error.code == 0 else f"{parser.prog}: {stderr.getvalue().strip().splitlines()[-1]}"
    return _check_config(parsed)


def _check_config(parsed: argparse.Namespace) -> str | None:
    config = getattr(parsed, "config", None)
    if not isinstance(config, str):
        return None
    from tformer.schema import ConfigError
    from tformer.training.config import load_config, resolve_config_path

    try:
        path = resolve_config_path(config)
    except ConfigError as error:
        return str(error)
    if hasattr(parsed, "set") and isinstance(parsed.set, list):  # a training command: load it all
        try:
            load_config(str(path), parsed.set)
        except (ConfigError, ValueError) as error:
            return f"--config {config} {' '.join('--set ' + s for s in parsed.set)}: {error}"
    return None


_HELP_RUNS: dict[tuple[str, ...], subprocess.Popen] = {}


def start_help(argv: tuple[str, ...]) -> None:
    """Start ``argv --help`` in the background (it may import torch: seconds), once."""
    if argv not in _HELP_RUNS:
        _HELP_RUNS[argv] = subprocess.Popen([*argv, "--help"], cwd=REPO, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)


def _answers_help(argv: tuple[str, ...]) -> str | None:
    start_help(argv)
    run = _HELP_RUNS[argv]
    _, stderr = run.communicate(timeout=300) if run.returncode is None else (None, "")
    if run.returncode != 0:
        return f"'{' '.join(argv[1:])} --help' exits {run.returncode}: {(stderr or '').strip()[-300:]}"
    return None


def prefetch_help(paths: list[Path]) -> None:
    """Start every script's ``--help`` at once, so they overlap the checks done in this process."""
    for path in paths:
        for command in shell_commands(path):
            tokens = command.split()
            scripts = [t for t in tokens if t.endswith(".py") and (REPO / t).is_file() and t not in TRAIN_SHIMS]
            if tokens and tokens[0] in ("python", "python3") and scripts:
                start_help((sys.executable, str(REPO / scripts[0])))


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def check_commands(path: Path) -> list[str]:
    where = _shown(path)
    problems = []
    for command in dict.fromkeys(shell_commands(path)):
        why = check_command(command)
        if why:
            problems.append(f"{where}: `{command}`: {why}")
    return problems


# ---------------------------------------------------------------- API pages

def check_api(site: Path) -> list[str]:
    problems = []
    for module_name, page in API_PAGES.items():
        html_path = site / page / "index.html"
        if not html_path.is_file():
            problems.append(f"{html_path}: missing (build the site first: mkdocs build --strict)")
            continue
        ids = set(re.findall(r'id="([^"]+)"', html_path.read_text()))
        for name in importlib.import_module(module_name).__all__:
            # an entry is `module.name`, or `module.submodule.name` where the page renders it there
            if not any(i == f"{module_name}.{name}" or (i.startswith(f"{module_name}.") and i.endswith(f".{name}"))
                       for i in ids):
                problems.append(f"{page}: {module_name}.{name} (in __all__) has no entry")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/check_docs.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, default=None,
                        help="the built site (mkdocs.yml's site_dir, build/site): also check the API pages")
    args = parser.parse_args(argv)
    figures = figure_names()
    prefetch_help(markdown_files())
    problems, commands = [], 0
    for path in markdown_files():
        problems += check_links(path, figures)
        problems += check_commands(path)
        commands += len(set(shell_commands(path)))
    if args.site:
        problems += check_api(args.site)
    for problem in problems:
        print(problem)
    print(f"check_docs: {len(markdown_files())} files, {commands} commands, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
