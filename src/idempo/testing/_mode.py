"""The testing mode: idempo as a fast, deterministic pass in an application's own tests (stamina's ``set_testing``)."""

from __future__ import annotations

from types import TracebackType

from .. import _config
from ..stores.memory import AsyncMemoryStore, MemoryStore

__all__ = ["SECRET", "current_store", "is_testing", "set_testing"]

#: The server secret of the testing mode (32 bytes): record keys and fingerprints are the same in every run.
SECRET = b"idempo testing mode: not secret!"


class _Restore:
    """What :func:`set_testing` returns: use it as a context manager to restore the mode before it on exit.

    ``set_testing()`` alone leaves the mode on until ``set_testing(False)``;
    ``with set_testing(): ...`` turns it off again (or back to the testing
    mode of an outer block, with its store) when the block ends.
    """

    __slots__ = ("_previous",)

    def __init__(self, previous: _config.Testing | None) -> None:
        self._previous = previous

    def __enter__(self) -> _Restore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        _config.use(self._previous)


def set_testing(testing: bool = True) -> _Restore:
    """Turn the testing mode on (or off): idempo as a fast, deterministic pass for your own tests.

    While it is on, for the fronts (the middlewares, the framework
    integrations, ``@idempotent``, the consumers) built from then on:

    - every store URL (``"sqlite:///..."``, ``"postgresql://..."``,
      ``"redis://..."``) names one memory store of this process
      (:func:`current_store`), shared by every front, blocking and async: no
      file, no server, no schema, and nothing left behind. The URL is not
      opened. A store object passed in is used as given. Each
      ``set_testing()`` starts from an empty store (:func:`current_store`);
    - a front given no ``secret=`` keys its digests with :data:`SECRET` (not
      ``$IDEMPO_SECRET``, not a secret kept in the store): record keys are the
      same in every run, and the "no secret configured" warning is not logged;

    and for every request:

    - no lease is renewed and no failed save is retried in the background: no
      thread, no event-loop task, nothing still running when a test ends (a
      save the store refuses is logged and the lease left to expire);
    - the legacy window (records of versions before keyed digests) is never
      looked up.

    The protocol itself is unchanged: a repeat is replayed, a duplicate in
    flight gets 409, a mismatch 422, so a test can assert them. Call it
    before the app (or the decorated function) is built: at the top of
    ``conftest.py``, or in a fixture that builds the app after it.

    Args:
        testing: True to turn the mode on (with an empty store), False to turn it off.

    Returns:
        A context manager that restores the mode as it was before this call.
    """
    if not testing:
        return _Restore(_config.use(None))
    store = MemoryStore()
    return _Restore(_config.use(_config.Testing(SECRET, store, AsyncMemoryStore(store))))


def is_testing() -> bool:
    """True while the testing mode is on."""
    return _config.TESTING is not None


def current_store() -> MemoryStore:
    """The memory store every store URL names while the testing mode is on (to read its records in a test).

    Raises:
        RuntimeError: the testing mode is off.
    """
    testing = _config.TESTING
    if testing is None:
        raise RuntimeError("the testing mode is off: call idempo.testing.set_testing() first")
    return testing.store
