"""The JSON form of results and its decoding by annotation (pure, no store)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import pathlib
import uuid
from decimal import Decimal
from typing import Any, Literal, NamedTuple, Optional, Union

import pydantic
import pytest

from idempo.serializers import JSONSerializer, PickleSerializer, Serializer, from_json_form, json_form


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Pair(NamedTuple):
    left: int
    right: datetime.date


@dataclasses.dataclass(frozen=True)
class Inner:
    when: datetime.datetime
    ident: uuid.UUID


class Money(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    amount: Decimal
    currency: str


@dataclasses.dataclass
class Outer:
    inner: Inner
    colour: Colour
    money: Money
    counts: dict[int, list[Inner]]
    tags: frozenset[str]
    pair: Pair
    maybe: Optional[Inner] = None  # noqa: UP045 - the typing spelling is decoded too
    either: Union[int, str] = 0  # noqa: UP007
    blob: bytes = b""
    path: pathlib.PurePosixPath = dataclasses.field(default_factory=lambda: pathlib.PurePosixPath("/"))
    kind: Literal["a", "b"] = "a"
    derived: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        self.derived = len(self.tags)


def sample() -> Outer:
    now = datetime.datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=datetime.UTC)
    inner = Inner(now, uuid.UUID(int=7))
    return Outer(
        inner=inner,
        colour=Colour.BLUE,
        money=Money(amount=Decimal("12.30"), currency="EUR"),
        counts={1: [inner], 2: []},
        tags=frozenset({"b", "a"}),
        pair=Pair(3, datetime.date(2026, 1, 1)),
        maybe=inner,
        either="x",
        blob=b"\x00\xff",
        path=pathlib.PurePosixPath("/tmp/x"),
        kind="b",
    )


@pytest.mark.parametrize("serializer", [JSONSerializer(), PickleSerializer()], ids=["json", "pickle"])
def test_nested_values_round_trip_to_equal_values_of_the_same_types(serializer: Serializer) -> None:
    """Nested dataclasses, pydantic models, enums, dates, UUIDs, decimals, bytes, sets and tuples round-trip."""
    value = sample()
    back = serializer.loads(serializer.dumps(value), Outer)
    assert back == value
    assert type(back.counts[1][0]) is Inner
    assert type(back.money) is Money
    assert type(back.pair) is Pair
    assert back.derived == 2


def test_json_form_is_plain_json() -> None:
    """The JSON form uses JSON types only; sets are sorted, so the form is stable."""
    form = json_form(sample())
    assert form["tags"] == ["a", "b"]
    assert form["counts"] == {"1": [form["inner"]], "2": []}
    assert form["inner"] == {"when": "2026-03-04T05:06:07.000890+00:00", "ident": str(uuid.UUID(int=7))}
    assert form["money"] == {"amount": "12.30", "currency": "EUR"}
    assert form["blob"] == "AP8="


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (list[int], [1, 2]),
        (tuple[int, str], (1, "a")),
        (tuple[float, ...], (1.0, 2.5)),
        (set[Colour], {Colour.RED}),
        (dict[str, Any], {"a": [1, {"b": None}]}),
        (Optional[datetime.date], None),  # noqa: UP045
        (int | None, 3),
        (float, 2.0),
        (Any, {"x": [1, "2"]}),
    ],
)
def test_annotations_rebuild_their_types(annotation: Any, value: Any) -> None:
    """Each supported annotation rebuilds an equal value of its type."""
    back = from_json_form(annotation, json_form(value))
    assert back == value
    assert type(back) is type(value)


def test_data_that_does_not_fit_raises_value_error() -> None:
    """A stored value that no longer fits the annotation raises ValueError."""
    with pytest.raises(ValueError, match="expected"):
        from_json_form(Inner, "text")
    with pytest.raises(ValueError, match="fits no member"):
        from_json_form(int | datetime.date, "not a date")


def test_values_without_json_form_raise_type_error() -> None:
    """An object with no JSON form raises TypeError naming its type."""
    with pytest.raises(TypeError, match="object has no JSON form"):
        json_form({"x": object()})
    with pytest.raises(TypeError, match="dict key"):
        json_form({(1, 2): "tuple key"})
