"""MkDocs hooks: links from a page to a repository file outside docs/ (a config, bench/RESULTS.md),
and the Sphinx roles of docstrings.

MkDocs only knows the files under docs/, so it would report such a link as broken. This hook
checks the file exists in the repository (a missing one is a warning, which fails
``mkdocs build --strict``) and points the link at ``repo_url`` when mkdocs.yml sets one;
without ``repo_url`` the link becomes its text.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repository_links")

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    repo_root = Path(config["config_file_path"]).resolve().parent
    page_dir = (docs_dir / page.file.src_path).parent
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def rewrite(match: re.Match) -> str:
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match[0]
        path, _, anchor = target.partition("#")
        resolved = (page_dir / path).resolve()
        if resolved.is_relative_to(docs_dir):
            return match[0]  # MkDocs checks links between pages itself
        if not resolved.is_relative_to(repo_root) or not resolved.exists():
            log.warning(f"{page.file.src_path}: link to '{target}', which is not a file of the repository")
            return match[0]
        relative = posixpath.join(*resolved.relative_to(repo_root).parts)
        if not repo_url:
            return match["text"]
        kind = "tree" if resolved.is_dir() else "blob"
        return f"[{match['text']}]({repo_url}/{kind}/HEAD/{relative}{'#' + anchor if anchor else ''})"

    # Leave fenced code alone: only text between fences holds links.
    parts = re.split(r"(^(?:```|~~~).*?^(?:```|~~~)[^\n]*$)", markdown, flags=re.MULTILINE | re.DOTALL)
    return "".join(part if index % 2 else LINK.sub(rewrite, part) for index, part in enumerate(parts))


# Docstrings use Sphinx roles (:class:`X`), which mkdocstrings prints as written: keep the code.
ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):(?=<code>)")


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub("", html)
