"""The engine's blocking code is what ``scripts/unasync`` generates from its async source, and the check
that CI runs (``scripts/unasync --check``, in ``scripts/test``) fails when one twin is edited alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "unasync"
SYNC = Path("src/idempo/_engine/_sync")
ASYNC = Path("src/idempo/_engine/_async")


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the generated code, its source and the settings ruff formats them with."""
    for part in (ASYNC, SYNC):
        shutil.copytree(ROOT / part, tmp_path / part)
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_generated_code_is_up_to_date() -> None:
    """Every file of ``_engine/_sync/`` is what its ``_engine/_async/`` source generates, header included."""
    done = _check(ROOT)
    assert done.returncode == 0, done.stderr
    for path in (ROOT / SYNC).glob("*.py"):
        if path.name != "__init__.py":
            assert path.read_text("utf-8").startswith(f"# Generated from ../_async/{path.name} by scripts/unasync")


def test_the_check_passes_on_an_unchanged_copy(checkout: Path) -> None:
    """The check itself: a faithful copy passes (so the failures below are the edits')."""
    done = _check(checkout)
    assert done.returncode == 0, done.stderr


def test_the_check_fails_when_the_generated_file_is_edited_by_hand(checkout: Path) -> None:
    """A fix made in the blocking driver only fails the check, which names the file and shows the line."""
    drivers = checkout / SYNC / "drivers.py"
    text = drivers.read_text("utf-8")
    assert "value = command.fn()\n" in text
    drivers.write_text(text.replace("value = command.fn()\n", "value = command.fn() or None\n", 1), "utf-8")
    done = _check(checkout)
    assert done.returncode == 1
    assert f"{SYNC / 'drivers.py'} is not what scripts/unasync generates" in done.stderr
    assert "-                value = command.fn() or None" in done.stderr


def test_the_check_fails_when_the_async_source_is_edited_alone(checkout: Path) -> None:
    """A change to the async source whose blocking twin was not regenerated fails the check."""
    source = checkout / ASYNC / "drivers.py"
    text = source.read_text("utf-8")
    assert "        if not isinstance(exc, Exception):\n" in text
    source.write_text(text.replace("if not isinstance(exc, Exception):", "if not isinstance(exc, Warning):", 1))
    done = _check(checkout)
    assert done.returncode == 1
    assert f"{SYNC / 'drivers.py'} is not what scripts/unasync generates" in done.stderr
    assert "+        if not isinstance(exc, Warning):" in done.stderr
