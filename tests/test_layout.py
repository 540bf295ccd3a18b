"""The shape of src/idempo: no import cycle, no module using another's private name, one logger, the extras,
and CONTRIBUTING.md's map of the tree.

The import graph is read from the source (every ``import`` at any depth, in a
function or under ``TYPE_CHECKING`` too: a deferred import that only hides a
cycle is a cycle). Each public module is imported in a fresh interpreter
where every optional dependency is made unimportable, as with only the core
(``anyio``) installed: the core's modules import; the others fail with an
``ImportError`` that names their extra's package, nothing worse.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "idempo"


def _modules() -> dict[str, Path]:
    """Every module of idempo by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name an ``import from`` names (relative ones resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str) -> Iterator[tuple[str, str | None, ast.AST]]:
    """(imported module, imported name or None, node) for every import of an idempo module in ``module``."""
    tree = ast.parse(MODULES[module].read_text("utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            if base not in MODULES:
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    yield f"{base}.{alias.name}", None, node  # a submodule
                else:
                    yield base, alias.name, node


def _graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _ in _imports(module) if target != module} for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or with a self-loop (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    """No module imports, directly or through others, a module that imports it (deferred imports included)."""
    assert _cycles(_graph()) == []


def test_the_graph_finds_a_cycle() -> None:
    """The check itself: a deferred import that closes a loop is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_name() -> None:
    """``from x import _name`` (and ``x._name`` on an imported module) only within one module.

    A private module (``idempo._core.flow``) may be imported; its public
    names are its interface. A name starting with ``_`` is its own module's.
    """
    found = set()
    for module in MODULES:
        bound: dict[str, str] = {}
        for target, name, node in _imports(module):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                found.add((module, target, name))
            elif name is None and isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if isinstance(node, ast.Import) and alias.name == target:
                        bound[alias.asname or target.split(".")[0]] = target
                    elif isinstance(node, ast.ImportFrom) and target.endswith("." + alias.name):
                        bound[alias.asname or alias.name] = target
        tree = ast.parse(MODULES[module].read_text("utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and bound[node.value.id] != module
            ):
                found.add((module, bound[node.value.id], node.attr))
    assert sorted(found) == []


def test_one_idempo_logger() -> None:
    """``logging.getLogger("idempo")`` is called in one module; every other module imports that logger."""
    callers = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value == "idempo"
            ):
                callers.append(module)
    assert callers == ["idempo.observability._observation"]


# The packages of the extras (pyproject.toml), made unimportable below.
OPTIONAL = (
    "aiohttp",
    "asgiref",
    "celery",
    "click",
    "cryptography",
    "django",
    "fastapi",
    "flask",
    "h11",
    "hiredis",
    "httpx",
    "jwt",
    "litestar",
    "opentelemetry",
    "prometheus_client",
    "psycopg",
    "psycopg_pool",
    "pydantic",
    "redis",
    "requests",
    "rich",
    "sqlalchemy",
    "starlette",
    "tenacity",
    "uvicorn",
    "werkzeug",
)

#: Public modules that import with the core alone (anyio), whatever extras are missing.
CORE = [
    "idempo",
    "idempo.asgi",
    "idempo.consumer",
    "idempo.decorator",
    "idempo.demo",
    "idempo.exceptions",
    "idempo.observability",
    "idempo.principals",
    "idempo.proxy",
    "idempo.proxy.config",
    "idempo.proxy.principal",
    "idempo.secrets",
    "idempo.serializers",
    "idempo.stores",
    "idempo.stores.memory",
    "idempo.stores.sqlite",
    "idempo.testing",
    "idempo.transactional",
    "idempo.typing",
    "idempo.wsgi",
]

#: Public modules that need an extra, and the package whose absence their ImportError names.
EXTRAS = {
    "idempo.celery": "celery",
    "idempo.cli": "click",
    "idempo.client": "tenacity",
    "idempo.demo.command": "click",
    "idempo.demo.payments": "fastapi",
    "idempo.demo.storm": "tenacity",
    "idempo.django": "asgiref",
    "idempo.fastapi": "fastapi",
    "idempo.faults": "h11",
    "idempo.flask": "flask",
    "idempo.litestar": "litestar",
    "idempo.metrics": "prometheus_client",
    "idempo.proxy.aiohttp_forwarder": "aiohttp",
    "idempo.proxy.app": "httpx",
    "idempo.proxy.forwarder": "httpx",
    "idempo.requests_adapter": "tenacity",
    "idempo.stores.postgres": "psycopg",
    "idempo.starlette": "starlette",
    "idempo.stores.redis": "redis",
    "idempo.tracing": "opentelemetry",
}

_IMPORT_WITHOUT_EXTRAS = """
import importlib, sys

blocked = set(sys.argv[1].split(","))


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Block())
try:
    importlib.import_module(sys.argv[2])
except ImportError as exc:
    print("ImportError", exc.name)
except SystemExit as exc:  # a command's one-line hint
    print("SystemExit", exc.code)
else:
    print("imported")
"""


def _public() -> list[str]:
    return [name for name in MODULES if not any(part.startswith("_") for part in name.split("."))]


def test_every_public_module_is_classified() -> None:
    """Each public module is listed as core or as needing an extra (a new module must say which)."""
    data = {"idempo.stores.lua", "idempo.stores.sql", "idempo.stores.sql.postgres", "idempo.stores.sql.sqlite"}
    data |= {"idempo.stores.sql.postgres.migrations"}
    assert sorted(set(_public()) - data) == sorted([*CORE, *EXTRAS])


def _import_without_extras(module: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT_EXTRAS, ",".join(OPTIONAL), module],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("module", CORE)
def test_a_core_module_imports_without_any_extra(module: str) -> None:
    """The module imports in a fresh interpreter where no optional dependency can be imported."""
    assert _import_without_extras(module) == "imported"


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_a_module_of_an_extra_names_what_is_missing(module: str) -> None:
    """Without its extra, the module's import fails with an ImportError naming one of the extra's packages
    (a command's module: with its one-line hint naming the extra to install)."""
    outcome = _import_without_extras(module)
    if outcome.startswith("SystemExit "):
        assert "pip install 'idempo[" in outcome, outcome
        return
    assert outcome.startswith("ImportError "), outcome
    assert outcome.split()[1].partition(".")[0] in OPTIONAL


# --- CONTRIBUTING.md's map: one line per directory and top-level module, lowest layer first --------

CONTRIBUTING = SRC.parent / "CONTRIBUTING.md"
# A file the map names: a path with one of these endings (a directory's files by their path in it).
_NAMED = re.compile(r"(?<![\w/.])(?:[\w.]+/)*[\w-]+(?:\.[\w-]+)*\.(?:py|lua|sql|json)\b")


def _map_entries() -> list[tuple[str, str]]:
    """The map's entries in order: (head, text). A head is ``dir/`` or a top-level module's file name;
    the text is the entry's lines (a line that starts at the margin starts an entry)."""
    text = CONTRIBUTING.read_text("utf-8")
    block = text[text.index("## The map") :]
    block = block[block.index("```text\n") + len("```text\n") :]
    block = block[: block.index("```")]
    entries: list[tuple[str, str]] = []
    for line in block.splitlines():
        if line and not line[0].isspace():
            entries.append((line.split()[0], line))
        else:
            head, body = entries[-1]
            entries[-1] = (head, f"{body}\n{line}")
    return entries


def _named(text: str) -> set[str]:
    return set(_NAMED.findall(text))


def _units(entries: list[tuple[str, str]]) -> dict[str, int]:
    """Each module's entry (its index in the map): a directory's modules its line's, a top-level
    module the first top-level line that names its file."""
    units: dict[str, int] = {}
    for module, path in MODULES.items():
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) > 1:
            wanted = f"{relative.parts[0]}/"
            units[module] = next((i for i, (head, _) in enumerate(entries) if head == wanted), -1)
        else:
            units[module] = next(
                (
                    i
                    for i, (head, text) in enumerate(entries)
                    if not head.endswith("/") and relative.name in _named(text)
                ),
                -1,
            )
    return units


def test_the_map_has_a_line_for_each_directory_and_module() -> None:
    """Every directory of src/idempo has its line, every top-level module is named on a top-level line."""
    entries = _map_entries()
    heads = [head for head, _ in entries]
    directories = sorted(f"{path.name}/" for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__")
    assert [d for d in directories if d not in heads] == []
    assert len(set(heads)) == len(heads), "one line per directory"
    units = _units(entries)
    assert sorted(module for module, unit in units.items() if unit < 0) == []


def test_the_map_names_only_files_that_exist_and_every_module() -> None:
    """A file a line names exists (in the line's directory, or from src/idempo); a directory's line names
    each of its modules (``__init__.py`` aside) by its path in the directory or, directly in it, its name."""
    missing, unnamed = [], []
    for head, text in _map_entries():
        base = PACKAGE / head if head.endswith("/") else PACKAGE
        named = _named(text)
        missing += [
            (head, name) for name in sorted(named) if not (base / name).is_file() and not (PACKAGE / name).is_file()
        ]
        if head.endswith("/"):
            for path in sorted(base.rglob("*.py")):
                relative = path.relative_to(base)
                if path.name == "__init__.py" or str(relative) in named:
                    continue
                if len(relative.parts) == 1 and path.name in named:
                    continue
                unnamed.append(f"{head}{relative}")
    assert missing == []
    assert unnamed == []


def test_the_map_is_in_layer_order() -> None:
    """A module imports only from its own line or the lines above it (deferred imports included)."""
    entries = _map_entries()
    units = _units(entries)
    upward = sorted(
        f"{module} ({entries[units[module]][0]}) imports {target} ({entries[units[target]][0]})"
        for module, targets in _graph().items()
        for target in targets
        if units[target] > units[module]
    )
    assert upward == []
