"""The public API is exactly what __all__ says (httpx's tests/test_exported_members.py)."""

from __future__ import annotations

from types import ModuleType

import idempo


def test_all_is_sorted_and_complete() -> None:
    """Every name in __all__ exists, and every public attribute is in __all__."""
    exported = set(idempo.__all__)
    assert all(hasattr(idempo, name) for name in exported)
    # Submodules (idempo.asgi, idempo.stores, ...) are imported by path, not re-exported.
    public = {
        name for name in dir(idempo) if not name.startswith("_") and not isinstance(getattr(idempo, name), ModuleType)
    }
    assert public == exported - {"__version__"}
    assert idempo.__all__ == sorted(idempo.__all__)


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
