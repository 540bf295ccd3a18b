"""Every code block in README.md and docs/ runs in a test, or a marker says why not (tests/examples/codeblocks.py)."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.examples.codeblocks import MODES, PAGES, ROOT, RUNNABLE, Block, all_blocks

BLOCKS = all_blocks()
SECRET = "docs-test-secret-0123456789abcdef"


def _id(block: Block) -> str:
    return block.id


def _select(mode: str, *languages: str) -> list[Block]:
    return [block for block in BLOCKS if block.mode == mode and block.language in languages]


def _environment(block: Block, tmp_path: Path) -> dict[str, str]:
    """What a snippet runs with: this interpreter's scripts first, the repository importable, a secret,
    and ``IDEMPO_STORE`` (an SQLite file in ``tmp_path``) where the block names it."""
    environment = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "IDEMPO_SECRET": SECRET,
    }
    environment.pop("IDEMPO_STORE", None)
    if "IDEMPO_STORE" in block.text:
        environment["IDEMPO_STORE"] = f"sqlite:///{tmp_path}/idempo.db"
    return environment


def test_every_block_runs_or_says_why_not() -> None:
    """Each block runs (python, sh, bash) or has a valid marker: a known mode, a reason, an existing test or file."""
    assert len(PAGES) > 5
    assert len(BLOCKS) > 40
    problems: list[str] = []
    for block in BLOCKS:
        where = f"{block.id} ({block.language or 'no language'})"
        if block.mode not in MODES:
            problems.append(f"{where}: unknown mode {block.mode!r}; one of {sorted(MODES)}")
        elif not block.marked and block.language not in RUNNABLE:
            problems.append(f"{where}: a {block.language or 'plain'} block does not run: mark it, e.g. skip <reason>")
        elif block.mode in ("imports", "raises") and block.language != "python":
            problems.append(f"{where}: {block.mode} is for python blocks")
        elif block.mode in ("raises", "skip", "run-by", "same-as") and not block.argument:
            problems.append(f"{where}: {block.mode} needs an argument")
        elif block.mode == "run-by":
            path, _, test = block.argument.partition("::")
            source = ROOT / path
            if not source.is_file() or not re.search(rf"^(async )?def {re.escape(test)}\(", source.read_text(), re.M):
                problems.append(f"{where}: run-by {block.argument}: no such test")
        elif block.mode == "same-as":
            source = ROOT / block.argument
            if not source.is_file():
                problems.append(f"{where}: same-as {block.argument}: no such file")
            elif source.read_text("utf-8").strip() != block.text.strip():
                problems.append(f"{where}: differs from {block.argument}: copy the file into the page again")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", _select("run", "python") + _select("raises", "python"), ids=_id)
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    """The block runs alone in a fresh interpreter, in an empty directory: exits 0, or raises what its marker says."""
    done = subprocess.run(
        [sys.executable, "-c", block.text],
        cwd=tmp_path,
        env=_environment(block, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if block.mode == "raises":
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        assert done.returncode != 0, f"{block.id} did not raise {block.argument}:\n{done.stdout}"
        assert re.match(rf"^([\w.]+\.)?{re.escape(block.argument)}\b", last), f"{block.id}:\n{done.stderr}"
    else:
        assert done.returncode == 0, f"{block.id} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("block", _select("run", "sh", "bash"), ids=_id)
def test_shell_block_runs(block: Block, tmp_path: Path) -> None:
    """The block runs in bash (errexit, pipefail) in an empty directory; its `pip install` lines are left out."""
    script = "\n".join(line for line in block.text.splitlines() if not line.lstrip().startswith("pip install "))
    assert script.strip(), f"{block.id} only installs packages: mark it skip"
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=_environment(block, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{block.id} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("block", _select("imports", "python"), ids=_id)
def test_python_fragment_compiles_and_its_imports_resolve(block: Block) -> None:
    """A fragment compiles; each module it imports exists, and each name it imports or reads from an idempo module."""
    tree = compile(block.text, block.id, "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    compile(tree, block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    modules: dict[str, ModuleType] = {}
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = importlib.import_module(alias.name)
                modules[alias.asname or alias.name.split(".")[0]] = (
                    module if alias.asname else importlib.import_module(alias.name.split(".")[0])
                )
        elif isinstance(node, ast.ImportFrom):
            assert node.module, f"{block.id}: a relative import"
            assert not node.level, f"{block.id}: a relative import"
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    value = getattr(module, alias.name)
                else:
                    try:
                        value = importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        problems.append(f"{node.module} has no {alias.name}")
                        continue
                if isinstance(value, ModuleType):
                    modules[alias.asname or alias.name] = value
    for node in ast.walk(tree):
        # idempo.x.y, principals.from_claim: attributes read from an imported idempo module exist.
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            module = modules[node.value.id]
            if module.__name__.split(".")[0] == "idempo" and not hasattr(module, node.attr):
                try:
                    importlib.import_module(f"{module.__name__}.{node.attr}")
                except ImportError:
                    problems.append(f"{module.__name__} has no {node.attr}")
    assert not problems, f"{block.id}: " + "; ".join(problems)


def _public_modules() -> list[str]:
    """Every public module of idempo (no part of its path starts with `_`) that defines __all__."""
    found = []
    for path in sorted((ROOT / "src" / "idempo").rglob("*.py")):
        parts = path.relative_to(ROOT / "src").with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        if re.search(r"^__all__\b", path.read_text("utf-8"), re.M):
            found.append(".".join(parts))
    return found


def test_the_reference_covers_every_public_module() -> None:
    """Each public module with an __all__ has docs/reference/<module>.md rendering it (`::: <module>`), in the nav."""
    modules = _public_modules()
    assert "idempo" in modules
    assert "idempo.asgi" in modules
    nav = (ROOT / "mkdocs.yml").read_text("utf-8")
    missing = []
    for module in modules:
        page = ROOT / "docs" / "reference" / f"{module}.md"
        if not page.is_file() or f"::: {module}\n" not in page.read_text("utf-8"):
            missing.append(f"docs/reference/{module}.md holding the line `::: {module}`")
        elif f"reference/{module}.md" not in nav:
            missing.append(f"a line `- {module}: reference/{module}.md` in mkdocs.yml's nav, under Reference")
    assert not missing, "the API reference lacks a public module; add " + "; ".join(missing)


def _github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_readme_links_resolve() -> None:
    """Every relative link of README.md names a file of the repository, and a heading of that page for an anchor."""
    readme = (ROOT / "README.md").read_text("utf-8")
    problems = []
    links = re.findall(r"\]\((?![a-z]+:)([^)#\s]*)(#[^)\s]*)?\)", readme)
    assert len(links) >= 10
    for target, anchor in links:
        path = ROOT / target if target else ROOT / "README.md"
        if not path.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#+\s+(.+?)\s*$", path.read_text("utf-8"), re.M)
            if anchor[1:] not in {_github_slug(heading) for heading in headings}:
                problems.append(f"{target}{anchor}: no such heading")
    assert not problems, "\n".join(problems)


# Issue 10, "Done when": the operating page says, for each failure, what a client and an operator see.
FAILURES = {
    "save failed after the handler ran": "idempo_saves_total",
    "the same, the store out for longer than the lease": "landed after N retries",
    "idempo's own code failed after the handler": "capturing the answer of record",
    "answer over `max_response_body`": "response-not-replayable",
    "store unreachable or too slow": 'idempo_requests_total{outcome="store_error"}',
    "store unreachable at start-up": "cannot be reached at start-up",
    "store misconfigured": "cannot use the store at <URL>",
    "memory store full of in-progress records": "store-unavailable",
    "more than `max_waiters`": 'idempo_requests_total{outcome="conflict"}',
    "a large JSON body": "worker thread",
    "an over-long `Idempotency-Key` header": 'idempo_requests_total{outcome="invalid_key"}',
    "`Content-Length` that is not a number of bytes": "invalid-content-length",
    "an ops command on a store it cannot use": "exit status 1",
    "a lease taken over": "idempo_lease_takeovers_total{decision}",
}


def test_the_operating_page_says_what_each_failure_looks_like() -> None:
    """Each failure of issue 10 is a row of docs/operating.md's table, with the client's answer, the log and the
    metric; the page and the README say how long a graceful shutdown waits for save retries."""
    page = (ROOT / "docs" / "operating.md").read_text()
    table = page.split("| failure | the client | the log (`idempo` logger) | the metric |", 1)[1].split("\n\n", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for failure, seen in FAILURES.items():
        row = next((line for name, line in rows.items() if name.startswith(failure)), None)
        assert row is not None, f"docs/operating.md has no row for {failure!r}"
        assert seen in row, (failure, seen)
        assert row.count("|") == 5, row
    assert "**A graceful shutdown waits, up to 10 s, for save retries.**" in page
    assert "waits at most 10 s for a failed save's background retries" in (ROOT / "README.md").read_text()
