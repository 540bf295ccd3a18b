"""The public API is exactly what __all__ says (httpx's tests/test_exported_members.py)."""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

import idempo

#: Public modules whose __all__ is pinned here, beside the top level.
MODULES = ["idempo.proxy", "idempo.proxy.config", "idempo.proxy.principal"]


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
        " 'flask', 'werkzeug', 'django', 'litestar', 'waitress', 'jwt', 'cryptography', 'prometheus_client')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", MODULES)
def test_module_all_is_sorted_and_complete(name: str) -> None:
    """A public module's __all__ is sorted, every name in it exists, and every class or function it defines is in it."""
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported)
    assert all(hasattr(module, attribute) for attribute in exported)
    defined = {
        attribute
        for attribute, value in vars(module).items()
        if not attribute.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == name
    }
    assert defined <= set(exported)


def test_importing_the_proxy_modules_needs_no_optional_dependency() -> None:
    """idempo.proxy, its config and principal modules import with only the core (Starlette, PyJWT, httpx lazily)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import idempo.proxy, idempo.proxy.config, idempo.proxy.principal\n"
        "bad = [m for m in ('starlette', 'httpx', 'uvicorn', 'jwt', 'cryptography', 'prometheus_client', 'click')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
