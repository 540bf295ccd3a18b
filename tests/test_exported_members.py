"""The public API is exactly what __all__ says (httpx's tests/test_exported_members.py)."""

from __future__ import annotations

import idempo


def test_all_is_sorted_and_complete() -> None:
    """Every name in __all__ exists, and every public attribute is in __all__."""
    exported = set(idempo.__all__)
    assert all(hasattr(idempo, name) for name in exported)
    public = {name for name in dir(idempo) if not name.startswith("_")}
    # Submodules are importable by path, not re-exported names.
    modules = {"exceptions", "stores", "typing", "asgi", "wsgi", "django", "fastapi", "flask", "litestar", "cli"}
    assert public - modules - exported == set()


def test_importing_idempo_needs_no_optional_dependency() -> None:
    """`import idempo` works with only the core dependencies (checked in a clean interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, idempo\n"
        "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'httpx', 'click', 'rich', 'redis', 'psycopg',"
        " 'flask', 'werkzeug', 'django', 'litestar', 'waitress')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
