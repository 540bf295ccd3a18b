"""The fenced code blocks of README.md and docs/, and how each is tested (docs/development.md, "Code blocks").

A block runs by default: a ``python`` block in a fresh interpreter, an ``sh`` or ``bash`` block
in bash. Otherwise an HTML comment on the line before the fence (other comments may sit between
them) says how it is tested, or that it is not run and why::

    <!-- docs-test: imports -->                         python: compiled, its imports resolved
    <!-- docs-test: raises FingerprintMismatch -->      python: run, and ends raising that exception
    <!-- docs-test: run-by tests/x/test_y.py::test_z --> a test of its own runs it (that test must exist)
    <!-- docs-test: same-as examples/proxy/x.toml -->   the block is that file, which its own tests load
    <!-- docs-test: skip installs packages -->          not run, for the reason given

The comment is invisible on GitHub and on the site.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The pages whose code blocks are tested: the README and every page of the site.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: Languages a block runs in when it has no marker.
RUNNABLE = frozenset({"python", "sh", "bash"})

#: Every mode a marker may name.
MODES = frozenset({"run", "imports", "raises", "run-by", "same-as", "skip"})

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<mode>\S+)\s*(?P<argument>.*?)\s*-->\s*$")
_COMMENT = re.compile(r"^\s*<!--.*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language and text, and how it is tested."""

    page: Path
    line: int  #: the 1-based line of its opening fence
    language: str
    text: str  #: its lines, less the fence's indentation
    mode: str  #: ``run`` when no marker says otherwise
    argument: str  #: what the marker says after the mode (a reason, a test, a file, an exception)
    marked: bool  #: whether a marker names the mode

    @property
    def id(self) -> str:
        """``docs/page.md:12``: its page relative to the repository, and its line."""
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> Iterator[Block]:
    """The fenced code blocks of one Markdown page, in order."""
    lines = page.read_text("utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not _closes(lines[end], fence):
            line = lines[end]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            end += 1
        mode, argument, marked = "run", "", False
        before = index - 1
        while before >= 0 and _COMMENT.match(lines[before]):
            marker = _MARKER.match(lines[before])
            if marker:
                mode, argument, marked = marker["mode"], marker["argument"], True
                break
            before -= 1
        yield Block(
            page=page,
            line=index + 1,
            language=info.split()[0].lower() if info else "",
            text="\n".join(body) + "\n",
            mode=mode,
            argument=argument,
            marked=marked,
        )
        index = end + 1


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(fence) and not stripped.strip(fence[0])


def all_blocks() -> list[Block]:
    """Every code block of every page."""
    return [block for page in PAGES for block in blocks(page)]


def first_block(page: str, language: str, containing: str = "") -> Block:
    """The first ``language`` block of ``page`` (relative to the repository) whose text contains ``containing``."""
    for block in blocks(ROOT / page):
        if block.language == language and containing in block.text:
            return block
    raise LookupError(f"{page} has no {language} block containing {containing!r}")
