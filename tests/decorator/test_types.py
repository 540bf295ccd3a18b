"""Issue 17: the argument and result types real payment code carries, through @idempotent (memory store).

Items 1 and 2: every argument fingerprints (bytes too, on pydantic models and
dataclasses alike), equal arguments give one fingerprint and changing any one
field gives another. Item 3: a replay returns the types the first call
returned, or an error; never other types.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import json
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idempo import (
    ConfigurationError,
    FingerprintMismatch,
    KeyHeld,
    Marker,
    RecordState,
    StoreError,
    idempotent,
)
from idempo._core.fingerprint import canonical_json
from idempo._core.records import Acquired, StoredResponse
from idempo.decorator import record_key
from idempo.secrets import store_secret
from idempo.serializers import JSONSerializer, fingerprint_form
from idempo.stores import AsyncMemoryStore, MemoryStore

UTC = datetime.UTC
PLUS_TWO = datetime.timezone(datetime.timedelta(hours=2))
PARIS = ZoneInfo("Europe/Paris")
EXAMPLES = settings(max_examples=40, deadline=None)


class Currency(enum.Enum):
    EUR = "EUR"
    USD = "USD"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Line:
    sku: str
    qty: int
    price: Decimal


@dataclasses.dataclass
class Payment:
    """A payment as a dataclass: every type of the issue."""

    ident: uuid.UUID
    when: datetime.datetime
    day: datetime.date
    amount: Decimal
    currency: Currency
    level: Level
    signature: bytes
    pair: tuple[str, int]
    tags: set[str]
    prices: frozenset[tuple[str, int]]
    lines: list[Line]
    grid: list[list[int]]
    ratio: float
    note: str | None


class LineModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)
    sku: str
    qty: int
    price: Decimal


class PaymentModel(pydantic.BaseModel):
    """The same payment as a pydantic model."""

    ident: uuid.UUID
    when: datetime.datetime
    day: datetime.date
    amount: Decimal
    currency: Currency
    level: Level
    signature: bytes
    pair: tuple[str, int]
    tags: set[str]
    prices: frozenset[tuple[str, int]]
    lines: list[LineModel]
    grid: list[list[int]]
    ratio: float
    note: str | None = None


# --- strategies --------------------------------------------------------------------------------

decimals = st.decimals(min_value=-(10**9), max_value=10**9, allow_nan=False, allow_infinity=False, places=3)
datetimes = st.one_of(
    st.datetimes(),  # naive
    # Local times that do not exist (a DST gap) are left out: Python compares
    # two of one zone by wall clock, the fingerprint by instant.
    st.datetimes(timezones=st.sampled_from([UTC, PLUS_TWO, PARIS]), allow_imaginary=False),
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "ident": st.uuids(),
    "when": datetimes,
    "day": st.dates(),
    "amount": decimals,
    "currency": st.sampled_from(Currency),
    "level": st.sampled_from(Level),
    "signature": st.binary(max_size=16),
    "pair": st.tuples(st.text(max_size=4), st.integers()),
    "tags": st.sets(st.text(max_size=4), max_size=4),
    "prices": st.frozensets(st.tuples(st.sampled_from(["EUR", "USD"]), st.integers(0, 50)), max_size=4),
    "grid": st.lists(st.lists(st.integers(), max_size=3), max_size=3),
    "ratio": st.floats(allow_nan=False, allow_infinity=False),
    "note": st.none() | st.text(max_size=8),
}
lines = st.builds(Line, sku=st.text(max_size=4), qty=st.integers(0, 9), price=decimals)
line_models = st.builds(LineModel, sku=st.text(max_size=4), qty=st.integers(0, 9), price=decimals)
payments = st.builds(Payment, lines=st.lists(lines, max_size=3), **FIELDS)
payment_models = st.builds(PaymentModel, lines=st.lists(line_models, max_size=3), **FIELDS)
either = st.one_of(payments, payment_models)


def replace(value: Payment | PaymentModel, **changes: Any) -> Payment | PaymentModel:
    if isinstance(value, Payment):
        return dataclasses.replace(value, **changes)
    return value.model_copy(update=changes)


def fp(value: Any) -> bytes:
    """The canonical JSON of ``value``'s fingerprint form: what @idempotent hashes."""
    return canonical_json(json.dumps(fingerprint_form(value)).encode())


def same_types(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down."""
    if type(a) is not type(b) or a != b:
        return False
    if isinstance(a, datetime.datetime | datetime.time):
        return a.tzinfo == b.tzinfo
    if isinstance(a, dict):
        return sorted(map(repr, a)) == sorted(map(repr, b)) and all(same_types(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return all(same_types(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, set | frozenset):
        return sorted(map(repr, a)) == sorted(map(repr, b))
    if dataclasses.is_dataclass(a):
        return all(same_types(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, pydantic.BaseModel):
        return all(same_types(getattr(a, name), getattr(b, name)) for name in type(a).model_fields)
    return True


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.calls


# --- item 1: binary values fingerprint ---------------------------------------------------------


class Signed(pydantic.BaseModel):
    signature: bytes
    amount: Decimal


@dataclasses.dataclass
class SignedData:
    signature: bytes | str


def test_a_pydantic_argument_holding_binary_bytes_runs_and_replays(store: MemoryStore) -> None:
    """A model with non-UTF-8 bytes fingerprints (pydantic's JSON mode would raise); the call runs once."""
    count = Counter()

    @idempotent(store=store, key="key")
    def charge(key: str, order: Signed) -> int:
        return count()

    order = Signed(signature=b"\xff\x00\x80", amount=Decimal("10.50"))
    assert charge("K1", order) == 1
    assert charge("K1", Signed(signature=b"\xff\x00\x80", amount=Decimal("10.5"))) == 1
    with pytest.raises(FingerprintMismatch):
        charge("K1", Signed(signature=b"\xff\x00\x81", amount=Decimal("10.50")))
    assert count.calls == 1
    assert fingerprint_form(order) == {
        "$model": [f"{__name__}:Signed", {"signature": {"$bytes": "/wCA"}, "amount": {"$decimal": "105e-1"}}]
    }


@pytest.mark.parametrize("wrap", [SignedData, lambda s: {"signature": s}], ids=["dataclass", "dict"])
def test_bytes_are_not_the_str_with_the_same_characters(store: MemoryStore, wrap: Any) -> None:
    """b"abc" and "abc" (and "YWJj", its base64) are three fingerprints: the second and third calls mismatch."""
    count = Counter()

    @idempotent(store=store, key="key")
    def sign(key: str, data: Any) -> int:
        return count()

    sign("K1", wrap(b"abc"))
    with pytest.raises(FingerprintMismatch):
        sign("K1", wrap("abc"))
    with pytest.raises(FingerprintMismatch):
        sign("K1", wrap("YWJj"))
    assert sign("K1", wrap(bytearray(b"abc"))) == 1  # bytearray == bytes, as in Python
    assert count.calls == 1


@EXAMPLES
@given(either)
def test_every_generated_payment_fingerprints_and_replays(value: Payment | PaymentModel) -> None:
    """Any dataclass or pydantic payment (bytes, sets, Decimals, datetimes...) runs once and replays once."""
    store = MemoryStore()
    count = Counter()

    @idempotent(store=store, key="key", scope="pay")
    def pay(key: str, payment: Any) -> int:
        return count()

    assert pay("K1", value) == pay("K1", value) == 1


# --- item 2: equal arguments, one fingerprint --------------------------------------------------


def test_sets_of_equal_elements_share_a_fingerprint(store: MemoryStore) -> None:
    """{("EUR", 2), ("EUR", 20)} and {("EUR", 2.0), ("EUR", 20)} are one call, as 2 and 2.0 are elsewhere."""
    count = Counter()

    @idempotent(store=store, key="key")
    def quote(key: str, prices: set[tuple[str, float]]) -> int:
        return count()

    assert quote("K1", {("EUR", 2), ("EUR", 20)}) == 1
    assert quote("K1", {("EUR", 2.0), ("EUR", 20)}) == 1
    assert quote("K1", frozenset({("EUR", 20.0), ("EUR", 2)})) == 1
    with pytest.raises(FingerprintMismatch):
        quote("K1", {("EUR", 2), ("EUR", 21)})
    assert count.calls == 1
    # Ordered by each element's canonical JSON: ["EUR",20] sorts before ["EUR",2] ("0" < "]").
    assert fingerprint_form({("EUR", 2.0), ("EUR", 20)}) == {"$set": [["EUR", 20], ["EUR", 2.0]]}


class Basket(pydantic.BaseModel):
    items: set[int]
    codes: frozenset[int]


def test_equal_models_whose_sets_iterate_differently_share_a_fingerprint(store: MemoryStore) -> None:
    """Two equal models whose set fields iterate in another order are one call (no FingerprintMismatch)."""
    count = Counter()

    @idempotent(store=store, key="key")
    def order(key: str, basket: Basket) -> int:
        return count()

    first, second = Basket(items={0, 8}, codes=frozenset({0, 8})), Basket(items={8, 0}, codes=frozenset({8, 0}))
    assert list(first.items) != list(second.items)  # 0 and 8 share a hash slot: insertion order shows
    assert first == second
    assert order("K1", first) == order("K1", second) == 1


# Each pair is (a, b, one fingerprint?): the equalities docs/decorator.md lists.
EQUALITIES = [
    (2, 2.0, True),
    (10**20, 10**20, True),
    (2**53, float(2**53), True),
    (2**53 + 1, float(2**53), False),
    (2**60, float(2**60), True),
    (1152921504606847000, float(2**60), False),  # the integer float(2**60)'s shortest repr spells
    (10**22, 1e22, True),
    (10**23, 1e23, False),  # the double nearest 1e23 is 99999999999999991611392
    (0, -0.0, True),
    (True, 1, False),
    (Decimal("10.5"), Decimal("10.50"), True),
    (Decimal("-0"), Decimal("0.00"), True),
    (Decimal("2"), 2, False),
    (Decimal("0.5"), 0.5, False),
    ((1, "a"), [1, "a"], True),
    ({1, 2}, frozenset({2, 1}), True),
    ({1, 2}, [1, 2], False),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True),
    ({1: "a"}, {"1": "a"}, False),
    ({1: "a"}, {1.0: "a"}, True),
    ({"$set": [1]}, {1}, False),
    (datetime.datetime(2026, 1, 1, 12, tzinfo=PLUS_TWO), datetime.datetime(2026, 1, 1, 10, tzinfo=UTC), True),
    (datetime.datetime(2026, 1, 1, 12, tzinfo=PARIS), datetime.datetime(2026, 1, 1, 11, tzinfo=UTC), True),
    (datetime.datetime(2026, 1, 1, 10), datetime.datetime(2026, 1, 1, 10, tzinfo=UTC), False),
    (datetime.date(2026, 1, 1), datetime.datetime(2026, 1, 1), False),
    (datetime.date(2026, 1, 1), "2026-01-01", False),
    (Currency.EUR, "EUR", False),
    (Level.LOW, 1, True),
    (uuid.UUID(int=1), str(uuid.UUID(int=1)), False),
    (b"abc", "abc", False),
    (b"abc", bytearray(b"abc"), True),
    (Line("a", 1, Decimal("1.0")), Line("a", 1, Decimal("1")), True),
    (Line("a", 1, Decimal("1")), {"sku": "a", "qty": 1, "price": Decimal("1")}, False),
    (LineModel(sku="a", qty=1, price=Decimal(1)), Line("a", 1, Decimal(1)), False),
]


@pytest.mark.parametrize(("a", "b", "equal"), EQUALITIES, ids=[f"{a!r}-{b!r}" for a, b, _ in EQUALITIES])
def test_the_documented_equalities(a: Any, b: Any, equal: bool) -> None:
    """Which values share a fingerprint: Python's == with the exceptions docs/decorator.md lists."""
    assert (fp(a) == fp(b)) is equal


_INTEGERS = st.sampled_from([0, 1, 2**53, 2**53 + 1, 2**60, 10**16, 10**21, 10**22, 10**23, 2**1023]).flatmap(
    lambda n: st.sampled_from([n, -n, n + 1, n - 1])
)
_NUMBERS = _INTEGERS | _INTEGERS.map(float) | st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(_NUMBERS, _NUMBERS)
def test_ints_and_floats_share_a_fingerprint_exactly_when_python_says_equal(a: int | float, b: int | float) -> None:
    """Numbers past 2**53 and 10**21 included: one fingerprint exactly when ``a == b`` (docs/decorator.md)."""
    assert (fp(a) == fp(b)) is (a == b)
    assert (fp([a]) == fp([b])) is (a == b)


def reordered(values: Any) -> Any:
    """An equal set built in another insertion order, so it may iterate in another order."""
    return type(values)(sorted(values, key=repr, reverse=True))


def rescaled(value: Decimal) -> Decimal:
    """An equal Decimal with one more trailing zero (10.5 -> 10.50)."""
    return value.scaleb(-1) * 10


@EXAMPLES
@given(either, st.sampled_from([UTC, PLUS_TWO, PARIS]))
def test_equal_payments_share_a_fingerprint(value: Payment | PaymentModel, zone: datetime.tzinfo) -> None:
    """Sets rebuilt, Decimals rescaled, aware datetimes moved to another zone, a tuple as a list: one fingerprint."""
    when = value.when.astimezone(zone) if value.when.tzinfo is not None else value.when
    lines = [replace_line(line) for line in value.lines]
    copy = replace(
        value,
        when=when,
        amount=rescaled(value.amount),
        tags=reordered(value.tags),
        prices=reordered(value.prices),
        lines=lines,
        pair=list(value.pair),
    )
    assert fp(copy) == fp(value)


def replace_line(line: Line | LineModel) -> Line | LineModel:
    if isinstance(line, Line):
        return dataclasses.replace(line, price=rescaled(line.price), qty=float(line.qty))  # type: ignore[arg-type]
    return line.model_copy(update={"price": rescaled(line.price), "qty": float(line.qty)})


@EXAMPLES
@given(either, st.data())
def test_changing_any_one_field_changes_the_fingerprint(value: Payment | PaymentModel, data: st.DataObject) -> None:
    """A payment with one field replaced has the same fingerprint exactly when that field is equal: never a replay."""
    name = data.draw(st.sampled_from(sorted(FIELDS)), label="field")
    new = data.draw(FIELDS[name], label="new value")
    changed = replace(value, **{name: new})
    old = getattr(value, name)
    if name == "when" and old.tzinfo is not None and new.tzinfo is not None:
        # Python compares two datetimes of one zone by wall clock (fold ignored), the fingerprint by instant.
        old, new = old.astimezone(UTC), new.astimezone(UTC)
    assert (fp(changed) == fp(value)) is (old == new)


# --- item 3: a replay keeps the types ----------------------------------------------------------


def test_an_unannotated_function_replays_datetime_uuid_and_decimal(store: MemoryStore) -> None:
    """Without an annotation the replay is a datetime, a UUID and a Decimal again (not str), to the digit."""
    count = Counter()
    when = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=PARIS)

    @idempotent(store=store, key="key", scope="receipt")
    def receipt(key):  # type: ignore[no-untyped-def]
        count()
        return {"when": when, "id": uuid.UUID(int=7), "amount": Decimal("10.50"), "day": when.date()}

    first = receipt("K1")
    replayed = receipt("K1")
    assert count.calls == 1
    assert replayed == first
    assert [type(v) for v in replayed.values()] == [datetime.datetime, uuid.UUID, Decimal, datetime.date]
    assert str(replayed["amount"]) == "10.50"
    assert replayed["when"].tzinfo is PARIS
    record = store.get(record_key("receipt", "K1", secret=store_secret(store)))
    assert record is not None
    assert record.response is not None
    assert record.response.body == (
        b'{"when":{"$datetime":["2026-03-04T05:06:07+01:00","Europe/Paris"]},'
        b'"id":{"$uuid":"00000000-0000-0000-0000-000000000007"},"amount":{"$decimal":"10.50"},'
        b'"day":{"$date":"2026-03-04"}}'
    )


def test_containers_keep_their_types(store: MemoryStore) -> None:
    """Tuples, sets, frozensets, bytes, non-str keys, a $ key, an Enum and NaN come back as they were."""
    result = {
        "pair": ("EUR", 2),
        "set": {1, 2},
        "frozen": frozenset({"a"}),
        "blob": b"\x00\xff",
        "by_id": {1: [Currency.EUR], (2, 3): None},
        "$ref": "kept",
        "inf": float("inf"),
        "level": Level.HIGH,
    }

    @idempotent(store=store, key="key", scope="containers")
    def make(key):  # type: ignore[no-untyped-def]
        return result

    make("K1")
    assert same_types(make("K1"), result)


@EXAMPLES
@given(either)
def test_every_generated_payment_replays_with_its_types(value: Payment | PaymentModel) -> None:
    """The typed form round-trips every payment, annotated or not, to an equal value of the same types."""
    serializer = JSONSerializer()
    for annotation in (Any, type(value)):
        back = JSONSerializer().loads(serializer.dumps(value), annotation)
        assert same_types(back, value)
        if isinstance(value, pydantic.BaseModel):
            assert back.model_fields_set == value.model_fields_set


class Lockbox:
    """A class of its own: no typed form."""


@dataclasses.dataclass
class WithEvent:
    done: threading.Event


def iterator() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize(
    ("annotation", "named"),
    [(Lockbox, "Lockbox"), (list[Lockbox], "Lockbox"), (Iterator[int], "Iterator"), (WithEvent, "Event")],
)
def test_a_return_type_that_cannot_be_rebuilt_is_refused_at_decoration(
    store: MemoryStore, annotation: Any, named: str
) -> None:
    """A function whose annotated return type has no typed form is refused when decorating, not after running."""

    def fn(key: str) -> Any:
        return None

    fn.__annotations__["return"] = annotation
    with pytest.raises(ConfigurationError, match=f"{named}.*serializer='pickle'"):
        idempotent(store=store, key="key")(fn)
    idempotent(store=store, key="key", serializer="pickle")(fn)  # pickle keeps any picklable value


def test_a_forward_reference_is_checked_before_the_first_call_runs(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A return type not yet defined at decoration is resolved and refused on the first call, before it runs."""
    count = Counter()

    @idempotent(store=store, key="key", scope="later")
    def later(key: str) -> DefinedLater:  # type: ignore[name-defined]  # noqa: F821
        count()
        return Lockbox()

    monkeypatch.setitem(globals(), "DefinedLater", Lockbox)  # as a class defined further down a module
    with pytest.raises(ConfigurationError, match="Lockbox"):
        later("K1")
    assert count.calls == 0
    assert store.get(record_key("later", "K1", secret=store_secret(store))) is None


@pytest.mark.parametrize(
    "result",
    [collections.OrderedDict(a=1), collections.Counter("ab"), threading.Lock(), [Lockbox()]],
    ids=["OrderedDict", "Counter", "Lock", "object in a list"],
)
def test_a_result_that_cannot_keep_its_type_is_refused_before_it_is_stored(store: MemoryStore, result: Any) -> None:
    """An unannotated function's result without a typed form raises once; nothing is stored; no second run."""
    count = Counter()

    @idempotent(store=store, key="key", scope="odd")
    def odd(key):  # type: ignore[no-untyped-def]
        count()
        return result

    with pytest.raises(ConfigurationError, match="cannot be stored with its type"):
        odd("K1")
    with pytest.raises(KeyHeld, match="unserialisable result"):
        odd("K1")
    record = store.get(record_key("odd", "K1", secret=store_secret(store)))
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.marker == Marker(Marker.HELD, "unserialisable result")
    assert count.calls == 1


def test_a_result_that_does_not_fit_its_annotation_is_refused_before_it_is_stored(store: MemoryStore) -> None:
    """A function returning another type than it declares raises on the call, not on a later replay."""
    count = Counter()

    @idempotent(store=store, key="key", scope="liar")
    def liar(key: str) -> Line:
        count()
        return {"sku": "a"}  # type: ignore[return-value]

    with pytest.raises(ConfigurationError, match="does not fit the return annotation"):
        liar("K1")
    record = store.get(record_key("liar", "K1", secret=store_secret(store)))
    assert record is not None
    assert record.marker == Marker(Marker.HELD, "unserialisable result")
    assert count.calls == 1


# --- records written before typed results ------------------------------------------------------


def legacy_record(store: MemoryStore, scope: str, key: str, fingerprint: str, body: bytes) -> None:
    """A completed record as idempo wrote it before typed results: content-type application/json, plain JSON."""
    rk = record_key(scope, key, secret=store_secret(store))
    began = store.begin(rk, fingerprint, 30_000)
    assert isinstance(began, Acquired)
    store.complete(rk, began.token, StoredResponse(200, ((b"content-type", b"application/json"),), body), 60_000)


def fingerprint_of(store: MemoryStore, scope: str, key: str) -> str:
    record = store.get(record_key(scope, key, secret=store_secret(store)))
    assert record is not None
    return record.fingerprint


@dataclasses.dataclass
class Receipt:
    ident: uuid.UUID
    when: datetime.datetime
    amounts: tuple[Decimal, ...]


def test_an_old_record_replays_when_the_annotation_says_every_type(store: MemoryStore) -> None:
    """An old plain-JSON record of an annotated function replays with the annotation's types."""

    @idempotent(store=store, key="key", scope="old")
    def receipt(key: str) -> Receipt:
        return Receipt(uuid.UUID(int=1), datetime.datetime(2026, 1, 1, tzinfo=UTC), (Decimal("1.50"),))

    receipt("K1")
    body = b'{"ident":"00000000-0000-0000-0000-000000000002","when":"2026-01-02T00:00:00+00:00","amounts":["2.50"]}'
    legacy_record(store, "old", "K2", fingerprint_of(store, "old", "K1"), body)
    replayed = receipt("K2")
    assert same_types(
        replayed, Receipt(uuid.UUID(int=2), datetime.datetime(2026, 1, 2, tzinfo=UTC), (Decimal("2.50"),))
    )


def test_an_old_record_whose_types_are_unknown_fails_clearly(store: MemoryStore) -> None:
    """An old record of an unannotated function replays numbers, but a str (maybe a datetime) raises StoreError."""
    count = Counter()

    @idempotent(store=store, key="key", scope="untyped")
    def untyped(key):  # type: ignore[no-untyped-def]
        count()
        return 3

    untyped("K1")
    fingerprint = fingerprint_of(store, "untyped", "K1")
    legacy_record(store, "untyped", "K2", fingerprint, b"3")
    legacy_record(store, "untyped", "K3", fingerprint, b'{"when":"2026-01-02T00:00:00+00:00"}')
    assert untyped("K2") == 3
    with pytest.raises(StoreError, match="stored without its type"):
        untyped("K3")
    assert count.calls == 1


@dataclasses.dataclass
class Cents:
    """A dataclass whose __post_init__ is not idempotent: building it again from its fields changes it."""

    amount: int

    def __post_init__(self) -> None:
        self.amount *= 100


@dataclasses.dataclass
class WithInitVar:
    amount: int
    scale: dataclasses.InitVar[int]

    def __post_init__(self, scale: int) -> None:
        pass


class Loose(pydantic.BaseModel):
    anything: Any


def local_class() -> Any:
    @dataclasses.dataclass
    class Local:
        x: int

    return Local(1)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Cents(5), "would not come back equal"),
        (lambda: WithInitVar(5, 2), "could not be rebuilt.*scale"),
        (lambda: Loose(anything=pydantic.HttpUrl("http://example.org")), "would not come back equal"),
        (local_class, "could not be rebuilt.*Local"),
    ],
    ids=["post_init", "InitVar", "pydantic type in Any", "local class"],
)
def test_a_result_a_replay_would_not_rebuild_equal_is_refused_before_it_is_stored(
    store: MemoryStore, make: Any, match: str
) -> None:
    """The result is rebuilt as a replay would before it is stored; one that would differ raises on the call."""
    count = Counter()

    @idempotent(store=store, key="key", scope="unfaithful")
    def unfaithful(key):  # type: ignore[no-untyped-def]
        count()
        return make()

    with pytest.raises(ConfigurationError, match=match):
        unfaithful("K1")
    with pytest.raises(KeyHeld, match="unserialisable result"):
        unfaithful("K1")
    record = store.get(record_key("unfaithful", "K1", secret=store_secret(store)))
    assert record is not None
    assert record.marker == Marker(Marker.HELD, "unserialisable result")
    assert count.calls == 1


class Scores(pydantic.RootModel[list[int]]):
    pass


class Aliased(pydantic.BaseModel):
    amount: Decimal = pydantic.Field(alias="amt")
    link: pydantic.HttpUrl
    token: pydantic.SecretStr
    key: pydantic.SecretBytes = pydantic.SecretBytes(b"\x00k")


def test_pydantic_root_models_aliases_and_pydantic_types_replay(store: MemoryStore) -> None:
    """A RootModel, a field with an alias, an HttpUrl and secrets (with their values) replay as they were."""
    results = [Scores([3, 1]), Aliased(amt=Decimal("1.10"), link="https://example.org/x", token="s3cret")]
    count = Counter()

    @idempotent(store=store, key="key", scope="models")
    def models(key):  # type: ignore[no-untyped-def]
        count()
        return results

    models("K1")
    replayed = models("K1")
    assert count.calls == 1
    assert replayed == results
    assert [type(r) for r in replayed] == [Scores, Aliased]
    assert replayed[1].token.get_secret_value() == "s3cret"
    assert replayed[1].key.get_secret_value() == b"\x00k"
    assert str(replayed[1].amount) == "1.10"


@pytest.mark.anyio
async def test_async_functions_keep_their_types_and_refuse_the_same_way() -> None:
    """The async wrapper: a typed replay, and a return type refused at decoration (asyncio and trio)."""
    store = AsyncMemoryStore()
    count = Counter()

    @idempotent(store=store, key="key", scope="async")
    async def book(key, when):  # type: ignore[no-untyped-def]
        count()
        return (when, uuid.UUID(int=3), {Decimal("1.50")})

    when = datetime.datetime(2026, 1, 1, 9, tzinfo=PARIS)
    first = await book("K1", when)
    replayed = await book("K1", when.astimezone(UTC))  # the same instant: the same call
    assert count.calls == 1
    assert same_types(replayed, first)
    with pytest.raises(ConfigurationError, match="Lockbox"):

        @idempotent(store=store, key="key")
        async def opaque(key: str) -> Lockbox:
            return Lockbox()


def test_a_parameter_type_only_a_type_checker_imports_does_not_hide_the_return_type(store: MemoryStore) -> None:
    """An unresolvable parameter annotation (an `if TYPE_CHECKING:` import) still lets the return type be checked."""

    def charge(key: str, client: StripeClient) -> Lockbox:  # type: ignore[name-defined]  # noqa: F821
        return Lockbox()

    with pytest.raises(ConfigurationError, match="Lockbox"):
        idempotent(store=store, key="key", exclude=["client"])(charge)
