"""The blocking and async twins of every store offer the same surface (issue 15, "hand-kept twins").

Their behaviour is held equal by the conformance suite, which runs every test
on both fronts (tests/contract); this pins what it cannot see: the same
constructor arguments, and the same public methods, ``async def`` on the
async twin, ``close`` / ``aclose`` named as everywhere in idempo.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

TWINS = [
    ("idempo.stores.memory", "MemoryStore", "AsyncMemoryStore"),
    ("idempo.stores.sqlite", "SQLiteStore", "AsyncSQLiteStore"),
    pytest.param("idempo.stores.postgres", "PostgresStore", "AsyncPostgresStore", marks=pytest.mark.postgres),
    pytest.param("idempo.stores.redis", "RedisStore", "AsyncRedisStore", marks=pytest.mark.redis),
]


def _classes(module: str, blocking: str, asynchronous: str) -> tuple[type, type]:
    loaded = importlib.import_module(module)
    return getattr(loaded, blocking), getattr(loaded, asynchronous)


def _public(cls: type) -> dict[str, object]:
    return {name: member for name, member in inspect.getmembers(cls) if not name.startswith("_")}


@pytest.mark.parametrize(("module", "blocking", "asynchronous"), TWINS)
def test_twins_take_the_same_constructor_arguments(module: str, blocking: str, asynchronous: str) -> None:
    """Both twins take the same arguments, defaults included (the async memory store may also front a given one)."""
    sync_class, async_class = _classes(module, blocking, asynchronous)
    sync_parameters = dict(inspect.signature(sync_class).parameters)
    async_parameters = dict(inspect.signature(async_class).parameters)
    if async_class.__name__ == "AsyncMemoryStore":
        del async_parameters["store"]
    assert [(p.name, p.kind, p.default) for p in sync_parameters.values()] == [
        (p.name, p.kind, p.default) for p in async_parameters.values()
    ]


@pytest.mark.parametrize(("module", "blocking", "asynchronous"), TWINS)
def test_twins_have_the_same_methods(module: str, blocking: str, asynchronous: str) -> None:
    """Every public method of the blocking twin is on the async one as ``async def`` (``close`` as ``aclose``),
    open and stats included, and the other way round."""
    sync_class, async_class = _classes(module, blocking, asynchronous)
    sync_members = _public(sync_class)
    async_members = _public(async_class)
    sync_methods = {("aclose" if n == "close" else n) for n, m in sync_members.items() if inspect.isfunction(m)}
    async_methods = {n for n, m in async_members.items() if inspect.isfunction(m)}
    assert sync_methods == async_methods
    assert {"open", "stats", "begin", "complete", "release", "extend", "get", "purge_expired"} <= async_methods
    for name in async_methods:
        assert inspect.iscoroutinefunction(async_members[name]), f"{asynchronous}.{name} is not async"
        blocking_name = "close" if name == "aclose" else name
        assert not inspect.iscoroutinefunction(sync_members[blocking_name]), f"{blocking}.{blocking_name} is async"
    properties = {n for n, m in sync_members.items() if isinstance(m, property)}
    assert properties == {n for n, m in async_members.items() if isinstance(m, property)}
