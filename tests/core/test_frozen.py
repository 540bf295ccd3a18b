"""fast_init: the frozen dataclasses a request makes keep every dataclass behaviour but a slower constructor."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from idempo._core.flow import Complete, Proceed
from idempo._core.frozen import fast_init
from idempo._core.records import Marker, StoredResponse


@fast_init
@dataclasses.dataclass(frozen=True, slots=True)
class _Point:
    x: int
    y: int = 7


def test_the_fields_defaults_and_keywords_are_the_dataclass_s() -> None:
    assert _Point(1) == _Point(1, 7) == _Point(x=1, y=7)
    assert repr(_Point(1, 2)) == "_Point(x=1, y=2)"
    assert hash(_Point(1, 2)) == hash(_Point(1, 2))
    assert Proceed(3) == Proceed(token=3, takeover=False) != Proceed(3, takeover=True)


def test_instances_stay_frozen() -> None:
    point = _Point(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.x = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Proceed(1).token = 2  # type: ignore[misc]


def test_wrong_arguments_are_refused_as_before() -> None:
    with pytest.raises(TypeError):
        _Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Point(1, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Point(1, z=3)  # type: ignore[call-arg]


def test_a_settle_command_round_trips_through_pickle() -> None:
    command = Complete("rk", 4, StoredResponse(201, ((b"content-type", b"application/json"),), b"{}"), 1000)
    assert pickle.loads(pickle.dumps(command)) == command


def test_only_plain_frozen_slotted_dataclasses_are_taken() -> None:
    @dataclasses.dataclass(slots=True)
    class Mutable:
        x: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Factory:
        x: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    for cls in (Mutable, Factory, NoSlots):
        with pytest.raises(TypeError):
            fast_init(cls)
    # A class kept on the dataclass's own constructor (Marker has class constants) works as ever.
    assert Marker(Marker.HELD, "takeover").kind == "held"
