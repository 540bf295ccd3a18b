"""MkDocs hooks: links from a page to a repository file outside docs/ work on GitHub and on the site.

A page may link a file of the repository by its relative path, as GitHub shows it
(``[the dashboard](../contrib/grafana/idempo.json)``). MkDocs only knows docs/, so these hooks
copy each such file into the site under ``_repo/`` and point the link there. A link to a
repository file that does not exist is a warning, so ``mkdocs build --strict`` fails on it as on
any other broken link.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import File, Files

log = get_plugin_logger("idempo_repo_links")

# An inline link's target: ](path) or ](path#anchor), not a URL or an anchor alone.
_LINK = re.compile(r"\]\((?P<target>(?![a-z][a-z0-9+.-]*:|#)[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
_PREFIX = "_repo"
# Fenced blocks and code spans, whose text is shown as written.
_CODE = re.compile(r"^( *)(`{3,}|~{3,}).*?^\1\2[ \t]*$|``.+?``|`[^`\n]+`", re.S | re.M)


def _links(markdown: str) -> Iterator[re.Match[str]]:
    """The links of a page, outside code."""
    code = [(match.start(), match.end()) for match in _CODE.finditer(markdown)]
    for match in _LINK.finditer(markdown):
        if not any(start <= match.start() < end for start, end in code):
            yield match


def _outside(page_uri: str, target: str) -> str | None:
    """The repository-relative path a link leaves docs/ for, or None for a link within docs/."""
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), target))
    if not joined.startswith("../"):
        return None
    return joined[len("../") :]


def on_files(files: Files, config: Any) -> Files:
    """Add every repository file that a page links outside docs/ to the site, under ``_repo/``."""
    docs = Path(config["docs_dir"])
    root = docs.parent
    for page in [file for file in files if file.src_uri.endswith(".md")]:
        text = Path(page.abs_src_path or "").read_text("utf-8")
        for match in _links(text):
            path = _outside(page.src_uri, match["target"])
            if path is None or path.startswith("../") or not (root / path).is_file():
                continue
            uri = f"{_PREFIX}/{path}"
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(root / path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point each link to a repository file outside docs/ at its copy in the site."""
    root = Path(config["docs_dir"]).parent

    pieces: list[str] = []
    done = 0
    for match in _links(markdown):
        path = _outside(page.file.src_uri, match["target"])
        if path is None:
            continue
        if path.startswith("../") or not (root / path).is_file():
            log.warning(f"{page.file.src_uri} links {match['target']}, which is not a file of the repository")
            continue
        copy = posixpath.relpath(f"{_PREFIX}/{path}", posixpath.dirname(page.file.src_uri) or ".")
        pieces += [markdown[done : match.start()], f"]({copy}{match['anchor'] or ''})"]
        done = match.end()
    return "".join(pieces) + markdown[done:]
