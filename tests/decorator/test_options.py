"""@idempotent's options and their errors: keys, scope, fingerprint, serialiser, lease (memory store)."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest

from idempo import (
    ConfigurationError,
    FingerprintMismatch,
    InvalidKey,
    KeyHeld,
    MissingKey,
    RecordState,
    StoreError,
    idempotent,
)
from idempo.decorator import record_key
from idempo.secrets import store_secret
from idempo.stores import AsyncMemoryStore, MemoryStore
from tests.support.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock=clock)


class Counter:
    """Counts calls of the functions under test."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> int:
        self.calls += 1
        return self.calls


# --- B03(b): a lease is never zero -------------------------------------------------------------


@pytest.mark.parametrize("lease", [0, 0.0, -1, timedelta(0), timedelta(seconds=-5), float("nan")])
def test_a_lease_of_zero_or_less_is_refused_at_decoration(store: MemoryStore, lease: Any) -> None:
    """B03(b): a configured lease of 0 (or less, or NaN) is refused with a clear error before any call."""
    with pytest.raises(ConfigurationError, match="lease_ttl"):
        idempotent(store=store, key="key", lease_ttl=lease)


def test_a_tiny_lease_still_gives_the_record_a_finite_lease(store: MemoryStore, clock: FakeClock) -> None:
    """B03(b): a lease below one millisecond still writes a record with a lease expiry, never none."""

    class Died(BaseException):
        pass

    @idempotent(store=store, key="key", scope="tiny", lease_ttl=0.0001)
    def pay(key: str) -> None:
        raise Died()

    with pytest.raises(Died):
        pay("K1")
    record = store.get(record_key("tiny", "K1", secret=store_secret(store)))
    assert record is not None
    assert record.state is RecordState.IN_PROGRESS
    assert record.created_at_ms < record.lease_expires_at_ms <= record.created_at_ms + 1
    clock.advance(0.002)
    assert store.get(record_key("tiny", "K1", secret=store_secret(store))) is None


# --- keys --------------------------------------------------------------------------------------


def test_key_from_a_callable_of_the_bound_arguments(store: MemoryStore) -> None:
    """key= may be a callable receiving the bound arguments (defaults applied, **kwargs flattened)."""
    count = Counter()
    seen: list[dict[str, Any]] = []

    def key_of(arguments: Any) -> str:
        seen.append(dict(arguments))
        return f"{arguments['tenant']}:{arguments['order']['id']}"

    @idempotent(store=store, key=key_of)
    def place(order: dict[str, Any], *, tenant: str = "t1", **extra: Any) -> int:
        return count()

    assert place({"id": 7}, note="x") == 1
    assert place({"id": 7}, tenant="t1", note="x") == 1
    assert place({"id": 7}, tenant="t2", note="x") == 2
    assert seen[0] == {"order": {"id": 7}, "tenant": "t1", "note": "x"}


def test_int_and_uuid_keys_are_accepted(store: MemoryStore) -> None:
    """Keys may be ints and UUIDs; each is the key of its text."""
    count = Counter()

    @idempotent(store=store, key="key")
    def run(key: Any) -> int:
        return count()

    ident = uuid.uuid4()
    assert run(ident) == 1
    assert run(str(ident)) == 1
    assert run(12) == 2
    assert run("12") == 2


@pytest.mark.parametrize("bad", ["", "   ", 1.5, b"k", True, object()])
def test_blank_keys_and_keys_of_other_types_are_rejected(store: MemoryStore, bad: Any) -> None:
    """A blank key, or one that is not a str, int or UUID, raises InvalidKey and stores nothing (B09d)."""
    count = Counter()

    @idempotent(store=store, key="key")
    def run(key: Any) -> int:
        return count()

    with pytest.raises(InvalidKey):
        run(bad)
    assert count.calls == 0
    assert len(store) == 0


def test_missing_key_raises_when_required(store: MemoryStore) -> None:
    """With require_key, a None key raises MissingKey and the function does not run (B09b)."""
    count = Counter()

    @idempotent(store=store, key="key", require_key=True)
    def run(key: str | None) -> int:
        return count()

    with pytest.raises(MissingKey):
        run(None)
    assert count.calls == 0


def test_missing_key_stores_nothing(store: MemoryStore) -> None:
    """In the default optional mode a call without a key writes nothing to the store (B09a)."""

    @idempotent(store=store, key="key")
    def run(key: str | None) -> int:
        return 1

    run(None)
    assert len(store) == 0


# --- scope -------------------------------------------------------------------------------------


def test_two_functions_never_share_records(store: MemoryStore) -> None:
    """The default scope is the function's module.qualname: one key in two functions is two records."""

    @idempotent(store=store, key="key")
    def refund(key: str) -> str:
        return "refund"

    @idempotent(store=store, key="key")
    def charge(key: str) -> str:
        return "charge"

    assert refund("K1") == "refund"
    assert charge("K1") == "charge"
    scope = f"{__name__}.test_two_functions_never_share_records.<locals>.charge"
    assert store.get(record_key(scope, "K1", secret=store_secret(store))) is not None


def test_function_records_never_collide_with_http_records() -> None:
    """A function's record key differs from an HTTP route's for the same scope text and key."""
    from idempo import make_record_key

    secret = b"decorator test secret"
    assert record_key("/orders", "K1", secret=secret) != make_record_key("", "POST", "/orders", "K1", secret=secret)


# --- fingerprint -------------------------------------------------------------------------------


def test_defaults_are_part_of_the_fingerprint(store: MemoryStore) -> None:
    """f(k, 1) and f(k, 1, currency="EUR") (the default) are the same call."""
    count = Counter()

    @idempotent(store=store, key="key")
    def pay(key: str, cents: int, currency: str = "EUR") -> int:
        return count()

    assert pay("K1", 1) == 1
    assert pay("K1", cents=1, currency="EUR") == 1
    with pytest.raises(FingerprintMismatch):
        pay("K1", 1, "USD")


def test_an_argument_without_json_form_gives_a_clear_error(store: MemoryStore) -> None:
    """A non-serialisable argument raises ConfigurationError naming it and exclude=; the function does not run."""
    count = Counter()
    lock = threading.Lock()

    @idempotent(store=store, key="key")
    def pay(key: str, cents: int, lock: Any) -> int:
        return count()

    with pytest.raises(ConfigurationError, match=r"argument 'lock'.*exclude=\['lock'\]"):
        pay("K1", 1, lock)
    assert count.calls == 0
    assert len(store) == 0

    @idempotent(store=store, key="key", exclude=["lock"])
    def pay_excluding(key: str, cents: int, lock: Any) -> int:
        return count()

    assert pay_excluding("K1", 1, lock) == 1
    assert pay_excluding("K1", 1, threading.Lock()) == 1
    with pytest.raises(FingerprintMismatch):
        pay_excluding("K1", 2, lock)


def test_fingerprint_names_choose_the_arguments(store: MemoryStore) -> None:
    """fingerprint=[names] compares only those arguments; fingerprint=() compares none."""
    count = Counter()

    @idempotent(store=store, key="key", fingerprint=["cents"])
    def pay(key: str, cents: int, note: str) -> int:
        return count()

    assert pay("K1", 100, "first") == 1
    assert pay("K1", 100, "second") == 1
    with pytest.raises(FingerprintMismatch):
        pay("K1", 200, "first")

    @idempotent(store=store, key="key", fingerprint=())
    def any_args(key: str, cents: int) -> int:
        return count()

    assert any_args("K1", 1) == 2
    assert any_args("K1", 999) == 2


def test_fingerprint_callable(store: MemoryStore) -> None:
    """fingerprint= may be a callable of the bound arguments returning a value with a JSON form."""
    count = Counter()

    @idempotent(store=store, key="key", fingerprint=lambda a: {"amount": a["order"]["amount"]})
    def pay(key: str, order: dict[str, Any]) -> int:
        return count()

    assert pay("K1", {"amount": 5, "trace": "a"}) == 1
    assert pay("K1", {"amount": 5, "trace": "b"}) == 1
    with pytest.raises(FingerprintMismatch):
        pay("K1", {"amount": 6, "trace": "a"})


def test_methods_leave_self_out_of_the_fingerprint(store: MemoryStore) -> None:
    """On a method, self is not fingerprinted: another instance replays the same key."""
    count = Counter()

    class Payments:
        def __init__(self) -> None:
            self.client = threading.Lock()  # no JSON form

        @idempotent(store=store, key="key")
        def pay(self, key: str, cents: int) -> int:
            return count()

    assert Payments().pay("K1", 5) == 1
    assert Payments().pay("K1", 5) == 1
    assert count.calls == 1


def test_big_integers_and_nan_are_fingerprinted(store: MemoryStore) -> None:
    """Arguments RFC 8785 cannot represent (ints past 2**53, NaN) still get a stable fingerprint."""
    count = Counter()

    @idempotent(store=store, key="key")
    def book(key: str, snowflake: int, ratio: float) -> int:
        return count()

    assert book("K1", 2**63 - 1, float("nan")) == 1
    assert book("K1", 2**63 - 1, float("nan")) == 1
    with pytest.raises(FingerprintMismatch):
        book("K1", 2**63 - 2, float("nan"))


# --- serialisers -------------------------------------------------------------------------------


@dataclasses.dataclass
class Opaque:
    handle: Any


def test_a_result_without_json_form_holds_the_key(store: MemoryStore) -> None:
    """JSON is the default: a result it cannot store raises ConfigurationError and holds the key (no rerun)."""
    count = Counter()

    @idempotent(store=store, key="key", scope="opaque")
    def open_handle(key: str) -> Opaque:
        count()
        return Opaque(threading.Lock())

    with pytest.raises(ConfigurationError, match="serializer='pickle'"):
        open_handle("K1")
    with pytest.raises(KeyHeld, match="unserialisable result"):
        open_handle("K1")
    assert count.calls == 1


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def test_pickle_only_when_asked(store: MemoryStore) -> None:
    """serializer="pickle" stores any picklable value; a JSON function never unpickles a pickle record."""
    count = Counter()

    def make(key: str) -> Any:
        count()
        return {Point(1, 2): frozenset({3})}

    pickled = idempotent(store=store, key="key", scope="shared", serializer="pickle")(make)
    first = pickled("K1")
    assert pickled("K1") == first == {Point(1, 2): frozenset({3})}
    record = store.get(record_key("shared", "K1", secret=store_secret(store)))
    assert record is not None
    assert record.response is not None
    assert record.response.headers == ((b"content-type", b"application/x-python-pickle"),)
    assert pickle.loads(record.response.body) == first

    as_json = idempotent(store=store, key="key", scope="shared")(make)
    with pytest.raises(StoreError, match="application/x-python-pickle"):
        as_json("K1")
    assert count.calls == 1


def test_unannotated_results_replay_with_their_types(store: MemoryStore) -> None:
    """Without a return annotation a replay still rebuilds the dataclass, also in a new decorator (a new process)."""

    def point(key):  # type: ignore[no-untyped-def]
        return Point(1, 2)

    assert idempotent(store=store, key="key", scope="point")(point)("K1") == Point(1, 2)
    replayed = idempotent(store=store, key="key", scope="point")(point)("K1")
    assert type(replayed) is Point
    assert replayed == Point(1, 2)


def test_an_undecodable_record_raises_store_error(store: MemoryStore) -> None:
    """A stored result that no longer fits the return annotation raises StoreError, not a wrong value."""

    @idempotent(store=store, key="key", scope="changed")
    def old(key: str) -> str:
        return "text"

    @idempotent(store=store, key="key", scope="changed")
    def new(key: str) -> Point:
        return Point(1, 2)

    old("K1")
    with pytest.raises(StoreError, match="does not fit the return annotation"):
        new("K1")


# --- decoration --------------------------------------------------------------------------------


def test_the_decorated_function_keeps_its_signature_and_metadata(store: MemoryStore) -> None:
    """functools.wraps: name, docstring, __wrapped__ and the signature are the function's."""

    def pay(key: str, cents: int, *, note: str = "") -> int:
        """Pay."""
        return cents

    wrapped = idempotent(store=store, key="key")(pay)
    assert wrapped.__name__ == "pay"
    assert wrapped.__doc__ == "Pay."
    assert wrapped.__wrapped__ is pay  # type: ignore[attr-defined]
    assert inspect.signature(wrapped) == inspect.signature(pay)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"key": "nope"}, "key 'nope' is not a parameter"),
        ({"key": "key", "exclude": ["nope"]}, "excluded argument 'nope'"),
        ({"key": "key", "fingerprint": ["nope"]}, "fingerprint argument 'nope'"),
        ({"key": "key", "fingerprint": "cents"}, "not one string"),
        ({"key": 3}, "parameter name or a callable"),
        ({"key": "key", "serializer": "yaml"}, "serializer must be"),
        ({"key": "key", "record_ttl": 0}, "record_ttl"),
        ({"key": "key", "wait": -1}, "wait"),
    ],
)
def test_bad_options_are_refused_at_decoration(store: MemoryStore, options: dict[str, Any], match: str) -> None:
    """Misconfiguration raises ConfigurationError when decorating, never on a call."""

    def pay(key: str, cents: int) -> int:
        return cents

    with pytest.raises(ConfigurationError, match=match):
        idempotent(store=store, **options)(pay)


def test_store_kinds_must_match_the_function(store: MemoryStore) -> None:
    """A sync function needs a Store and an async one an AsyncStore."""

    async def async_pay(key: str) -> int:
        return 1

    def pay(key: str) -> int:
        return 1

    with pytest.raises(ConfigurationError, match="needs an AsyncStore"):
        idempotent(store=store, key="key")(async_pay)
    with pytest.raises(ConfigurationError, match="needs a Store"):
        idempotent(store=AsyncMemoryStore(), key="key")(pay)


def test_generators_are_refused(store: MemoryStore) -> None:
    """A generator function cannot be made idempotent (its result is an iterator)."""

    def numbers(key: str) -> Any:
        yield 1

    with pytest.raises(ConfigurationError, match="generator"):
        idempotent(store=store, key="key")(numbers)


def test_store_urls_build_the_right_store(tmp_path: Any) -> None:
    """A store URL builds a sync store for a sync function and an async one for an async function."""
    url = f"sqlite:///{tmp_path / 'url.db'}"
    count = Counter()

    @idempotent(store=url, key="key")
    def pay(key: str) -> int:
        return count()

    assert pay("K1") == 1
    assert pay("K1") == 1

    @idempotent(store=url, key="key")
    async def apay(key: str) -> int:
        return count()

    assert inspect.iscoroutinefunction(apay)
