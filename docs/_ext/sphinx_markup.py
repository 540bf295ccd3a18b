"""A Griffe extension: idempo's docstrings, written in Sphinx's reStructuredText markup, as Markdown.

mkdocstrings renders docstrings as Markdown, while idempo's use reStructuredText's roles
(:class:`Policy`, :func:`~idempo.store_from_url`, :mod:`idempo.secrets`), literal blocks
(a paragraph ending in ``::``) and simple tables (``====  ====``). Once the package is loaded,
this rewrites every docstring:

- a role becomes an autorefs cross-reference to the page where the reference renders the name,
  resolved the way Sphinx's Python domain does (the enclosing class, its module, the parent
  packages, then the name as written; a leading dot searches by suffix; ``~`` shows the last
  part). A name that exists but is not public (``idempo._core.flow``) is shown as code, not
  linked: the reference documents public modules only. A name outside idempo (the standard
  library, builtins, a library idempo uses) is shown as code too. Any other name stays a
  cross-reference that resolves nowhere, so ``mkdocs build --strict`` fails on it;
- a literal block becomes a fenced code block (``python`` when it parses as Python);
- a simple table becomes a Markdown table.

Loaded by mkdocs.yml (mkdocstrings' ``extensions``) by path; no import from idempo, so the docs
build needs only the ``docs`` extra.
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
import textwrap
from typing import Any

import griffe

_logger = griffe.get_logger("idempo_sphinx_markup")

#: Top-level names of the libraries idempo's docstrings mention: references to them are shown as code.
THIRD_PARTY = frozenset(
    {
        "anyio",
        "celery",
        "click",
        "django",
        "fastapi",
        "flask",
        "flask_login",
        "h11",
        "httpx",
        "hypercorn",
        "jwt",
        "litestar",
        "opentelemetry",
        "prometheus_client",
        "psycopg",
        "psycopg_pool",
        "pydantic",
        "pytest",
        "redis",
        "requests",
        "rfc8785",
        "rich",
        "sqlalchemy",
        "starlette",
        "tenacity",
        "trio",
        "urllib3",
        "uvicorn",
        "waitress",
        "werkzeug",
    }
)

_ROLE = re.compile(r":(?P<role>class|func|meth|mod|data|attr|exc|obj|const):`(?P<body>[^`]+)`")
_EXPLICIT_TITLE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")


def _public_path(path: str) -> bool:
    return not any(
        part.startswith("_") and not (part.startswith("__") and part.endswith("__")) for part in path.split(".")
    )


class SphinxMarkup(griffe.Extension):
    """Rewrite reStructuredText roles, literal blocks and simple tables in docstrings as Markdown."""

    def __init__(self, package: str = "idempo") -> None:
        super().__init__()
        self.package = package

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Once the package is loaded: find what the reference documents, then rewrite each docstring."""
        if pkg.path != self.package:
            return
        self.collection = loader.modules_collection
        self.documented: dict[str, str] = {}
        self._index_public(pkg)
        self.all_paths: list[str] = []
        for obj in self._walk(pkg):
            self.all_paths.append(obj.path)
        for obj in self._walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = self.convert(obj.docstring.value, obj)

    # --- what the reference documents -------------------------------------------------------

    def _walk(self, obj: griffe.Object) -> Any:
        yield obj
        for member in obj.members.values():
            if member.is_alias:
                continue
            yield from self._walk(member)  # type: ignore[arg-type]

    def _lookup(self, path: str, depth: int = 0) -> griffe.Object | None:
        """The object at a dotted path, aliases followed; None when nothing is there."""
        if depth > 20:
            return None
        parts = path.split(".")
        try:
            obj: Any = self.collection[parts[0]]
        except KeyError:
            return None
        for index, part in enumerate(parts[1:], start=1):
            if obj.is_alias:
                obj = self._lookup(obj.target_path, depth + 1)
                if obj is None:
                    return None
            member = obj.members.get(part)
            if member is None:
                return None
            obj = member
            if obj.is_alias and index < len(parts) - 1:
                continue
        if obj.is_alias:
            return self._lookup(obj.target_path, depth + 1)
        return obj  # type: ignore[no-any-return]

    def _index_public(self, module: griffe.Module) -> None:
        """Map each documented object's path to the public path under which the reference renders it."""
        if not _public_path(module.path):
            return
        self.documented.setdefault(module.path, module.path)
        exports = [str(name) for name in (module.exports or [])]
        for name in exports:
            target = self._lookup(f"{module.path}.{name}")
            if target is None:
                continue
            public = f"{module.path}.{name}"
            # Prefer the defining module's own path where it is public, else the first public path.
            if target.path == public or target.path not in self.documented:
                self.documented[target.path] = public
            if target.is_class:
                self._index_members(target, self.documented[target.path])  # type: ignore[arg-type]
        for member in module.members.values():
            if not member.is_alias and member.is_module:
                self._index_public(member)  # type: ignore[arg-type]

    def _index_members(self, cls: griffe.Class, public: str) -> None:
        for name, member in cls.all_members.items():
            if name.startswith("_"):
                continue
            path = member.path if not member.is_alias else member.target_path
            self.documented.setdefault(f"{cls.path}.{name}", f"{public}.{name}")
            self.documented.setdefault(path, f"{public}.{name}")

    # --- roles -------------------------------------------------------------------------------

    def resolve(self, target: str, context: griffe.Object) -> griffe.Object | None:
        """The object a role's target names, seen from the docstring of ``context``."""
        if target.startswith("."):
            suffix = target
            found = [path for path in self.all_paths if path.endswith(suffix)]
            return self._lookup(found[0]) if len(found) == 1 else None
        scopes: list[str] = []
        scope: Any = context
        while scope is not None:
            if scope.is_class or scope.is_module:
                scopes.append(scope.path)
            scope = scope.parent
        for base in [*scopes, ""]:
            obj = self._lookup(f"{base}.{target}" if base else target)
            if obj is not None:
                return obj
        return None

    def role(self, match: re.Match[str], context: griffe.Object) -> str:
        role, body = match["role"], match["body"].strip()
        explicit = _EXPLICIT_TITLE.match(body)
        title: str | None = None
        if explicit:
            title, target = explicit["title"], explicit["target"]
        else:
            target = body
        short = target.startswith("~")
        target = target.lstrip("~!").removesuffix("()")
        if title is None:
            title = target.rsplit(".", 1)[-1] if short else target
            if role in ("func", "meth"):
                title += "()"
        obj = self.resolve(target, context)
        if obj is not None:
            public = self.documented.get(obj.path)
            if public is not None:
                return f"[`{title}`][{public}]"
            return f"`{title}`"  # a private name: not in the reference
        first = target.lstrip(".").split(".")[0]
        if first in sys.stdlib_module_names or hasattr(builtins, first) or first in THIRD_PARTY:
            return f"`{title}`"
        # Unknown: left as a cross-reference that resolves nowhere, so a strict build fails on it.
        _logger.warning(f"{context.path}: :{role}:`{match['body']}` names nothing idempo or Python knows")
        return f"[`{title}`][{target}]"

    # --- blocks ------------------------------------------------------------------------------

    def convert(self, text: str, context: griffe.Object) -> str:
        """The docstring ``text`` with its reStructuredText markup as Markdown."""
        text = literal_blocks(text)
        text = simple_tables(text)
        return _ROLE.sub(lambda match: self.role(match, context), text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def literal_blocks(text: str) -> str:
    """Turn each reStructuredText literal block (after a paragraph ending in ``::``) into a fenced block."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.rstrip()
        if not stripped.endswith("::") or stripped.endswith(":::"):
            out.append(line)
            index += 1
            continue
        base = _indent(line)
        block_start = index + 1
        while block_start < len(lines) and not lines[block_start].strip():
            block_start += 1
        if block_start >= len(lines) or _indent(lines[block_start]) <= base:
            out.append(line)
            index += 1
            continue
        end = block_start
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
            end += 1
        while end > block_start and not lines[end - 1].strip():
            end -= 1
        if stripped.strip() == "::":
            pass  # the marker alone: no text to keep
        elif stripped.endswith(" ::"):
            out.append(stripped[:-3])
        else:
            out.append(stripped[:-1])
        code = textwrap.dedent("\n".join(lines[block_start:end]))
        try:
            ast.parse(code)
            language = "python"
        except SyntaxError:
            language = "text"
        pad = " " * base
        if out and out[-1].strip():
            out.append("")
        out.append(f"{pad}```{language}")
        out.extend(f"{pad}{code_line}" if code_line else "" for code_line in code.split("\n"))
        out.append(f"{pad}```")
        index = end
    return "\n".join(out)


_BORDER = re.compile(r"^\s*=+( +=+)+\s*$")


def simple_tables(text: str) -> str:
    """Turn each reStructuredText simple table (``===  ===`` borders) into a Markdown table."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        if not _BORDER.match(lines[index]):
            out.append(lines[index])
            index += 1
            continue
        border = lines[index]
        base = _indent(border)
        columns = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]
        borders = [index]
        end = index + 1
        while end < len(lines) and len(borders) < 3:
            if lines[end].strip() == border.strip():
                borders.append(end)
            elif not lines[end].strip():
                break
            end += 1
        last = borders[-1]
        rows: list[list[str]] = []
        header_rows = 0
        for position in range(index + 1, last):
            line = lines[position]
            if position in borders:
                header_rows = len(rows)
                continue
            cells = []
            for number, (start, stop) in enumerate(columns):
                stop = len(line) if number == len(columns) - 1 else columns[number + 1][0]
                cells.append(line[start:stop].strip())
            if rows and not cells[0]:
                for number, cell in enumerate(cells):
                    if cell:
                        rows[-1][number] = f"{rows[-1][number]} {cell}".strip()
            else:
                rows.append(cells)
        if not header_rows:
            header_rows = 1 if len(borders) == 3 else 0
        pad = " " * base
        if not header_rows:
            rows.insert(0, [""] * len(columns))
            header_rows = 1
        if out and out[-1].strip():
            out.append("")
        out.append(pad + "| " + " | ".join(rows[0]) + " |")
        out.append(pad + "|" + "---|" * len(columns))
        for row in rows[1:]:
            out.append(pad + "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        index = last + 1
    return "\n".join(out)
