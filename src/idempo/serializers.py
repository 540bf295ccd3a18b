"""Serialisers: how ``@idempotent`` keeps a function's result for replay.

A store keeps responses (status, headers, body bytes), so a result is stored
as a response: status 200, a ``content-type`` header naming the serialiser
(its :attr:`Serializer.media_type`) and the serialised bytes as the body. Every
store holds such a record unchanged. A replay is decoded only by the
serialiser named in the record: data written by another serialiser is
refused, and pickled data is never unpickled unless pickle was asked for.

:class:`JSONSerializer` is the default. Its JSON form of a value (see
:func:`json_form`) covers the JSON types plus dataclasses, pydantic models,
tuples, sets, ``datetime``/``date``/``time``, ``UUID``, ``Decimal``, ``Enum``,
``bytes`` and paths. Decoding is driven by the function's return annotation,
so ``-> Order`` (a dataclass or pydantic model) replays an ``Order``, not a
dict; without an annotation a replay is the plain JSON value.

:class:`PickleSerializer` keeps any picklable value exactly, for trusted
stores only: unpickling data an attacker wrote to the store runs their code.

The same JSON form, canonicalised with RFC 8785 (JSON Canonicalization
Scheme), is what ``@idempotent`` fingerprints the arguments with.
"""

from __future__ import annotations

import base64
import collections.abc as abc
import dataclasses
import datetime
import decimal
import enum
import json
import pathlib
import pickle
import sys
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["JSONSerializer", "PickleSerializer", "Serializer", "json_form", "from_json_form"]


@runtime_checkable
class Serializer(Protocol):
    """Turns a function's result into bytes for the store, and back.

    Attributes:
        media_type: names the format in the stored record (its ``content-type``);
            a replay is decoded only when the record names this serialiser.
    """

    media_type: str

    def dumps(self, value: Any) -> bytes:
        """Return ``value`` as bytes.

        Raises:
            TypeError: the value cannot be represented.
        """
        ...

    def loads(self, data: bytes, annotation: Any) -> Any:
        """Return the value ``data`` holds.

        Args:
            data: what :meth:`dumps` returned.
            annotation: the function's return annotation (``typing.Any`` when
                it has none); a serialiser that loses types uses it to rebuild them.

        Raises:
            ValueError: the data cannot be decoded as ``annotation``.
        """
        ...


class JSONSerializer:
    """JSON (RFC 8259), with dataclasses and pydantic models rebuilt from the return annotation.

    The bytes are UTF-8 JSON of :func:`json_form` of the value; decoding
    applies :func:`from_json_form` with the return annotation.
    """

    media_type = "application/json"

    def dumps(self, value: Any) -> bytes:
        """See :meth:`Serializer.dumps`."""
        return json.dumps(json_form(value), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def loads(self, data: bytes, annotation: Any) -> Any:
        """See :meth:`Serializer.loads`."""
        return from_json_form(annotation, json.loads(data))

    def __repr__(self) -> str:
        return "JSONSerializer()"


class PickleSerializer:
    """Python's pickle: any picklable value, returned exactly as it was.

    Only for stores nobody else can write to: unpickling runs code named in
    the data. Used only when asked for (``serializer="pickle"``).

    Args:
        protocol: the pickle protocol (default :data:`pickle.HIGHEST_PROTOCOL`).
    """

    media_type = "application/x-python-pickle"

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self.protocol = protocol

    def dumps(self, value: Any) -> bytes:
        """See :meth:`Serializer.dumps`."""
        try:
            return pickle.dumps(value, protocol=self.protocol)
        except (pickle.PicklingError, AttributeError) as exc:
            raise TypeError(f"cannot pickle {type(value).__name__}: {exc}") from exc

    def loads(self, data: bytes, annotation: Any) -> Any:
        """See :meth:`Serializer.loads`; ``annotation`` is not needed."""
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise ValueError(f"cannot unpickle the stored result: {exc}") from exc

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self.protocol})"


# --- the JSON form ---------------------------------------------------------------------------


def _pydantic_model() -> type[Any] | None:
    """pydantic's BaseModel when pydantic is already imported (a model instance implies it is)."""
    module = sys.modules.get("pydantic")
    return getattr(module, "BaseModel", None) if module is not None else None


def json_form(value: Any) -> Any:
    """Return ``value`` as JSON types (dict with str keys, list, str, int, float, bool, None).

    ==========================================  ==========================================
    value                                       JSON form
    ==========================================  ==========================================
    None, bool, int, float, str                 itself
    dataclass instance                          object of its fields
    pydantic model                              ``model_dump(mode="json")``
    list, tuple (incl. NamedTuple)              array
    set, frozenset                              array sorted by each element's JSON text
    dict                                        object; keys must be str, int, float,
                                                bool, None, Enum or UUID (as JSON does,
                                                non-str keys become strings)
    datetime, date, time                        ISO 8601 string (``isoformat()``)
    UUID, Decimal, pathlib paths                string
    Enum                                        its value's JSON form
    bytes, bytearray                            base64 string (RFC 4648)
    ==========================================  ==========================================

    Raises:
        TypeError: the value, or something inside it, has no JSON form.
    """
    if value is None or isinstance(value, bool | int | float | str):
        if isinstance(value, enum.Enum):  # IntEnum, StrEnum
            return json_form(value.value)
        return value
    if isinstance(value, list | tuple):
        return [json_form(item) for item in value]
    if isinstance(value, dict):
        return {_json_key(k): json_form(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_form(getattr(value, f.name)) for f in dataclasses.fields(value)}
    base_model = _pydantic_model()
    if base_model is not None and isinstance(value, base_model):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset):
        items = [json_form(item) for item in value]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    if isinstance(value, enum.Enum):
        return json_form(value.value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal | pathlib.PurePath):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__qualname__} has no JSON form")


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, enum.Enum):
        key = key.value
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)
    if isinstance(key, uuid.UUID | str):
        return str(key)
    raise TypeError(f"a dict key of type {type(key).__qualname__} has no JSON form")


class _NoFit(ValueError):
    """The data does not have the shape of the annotation (tried in turn for a Union)."""


def from_json_form(annotation: Any, data: Any) -> Any:
    """Rebuild a value of type ``annotation`` from its :func:`json_form`.

    Dataclasses (nested too, through their field annotations), pydantic
    models (``model_validate_json``), ``list``/``tuple``/``set``/``frozenset``/
    ``dict`` and their ``typing`` and ``collections.abc`` spellings,
    ``Optional``/``Union`` (the first member the data fits), ``Literal``,
    NamedTuple, Enum, ``datetime``/``date``/``time``, ``UUID``, ``Decimal``,
    ``bytes`` and paths. ``Any``, a missing annotation, a type variable or an
    unknown class give the JSON value as it is.

    Raises:
        ValueError: the data does not fit the annotation.
    """
    return _decode(annotation, data)


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    datetime.datetime: datetime.datetime.fromisoformat,
    datetime.date: datetime.date.fromisoformat,
    datetime.time: datetime.time.fromisoformat,
    uuid.UUID: uuid.UUID,
    decimal.Decimal: decimal.Decimal,
    bytes: lambda text: base64.b64decode(text, validate=True),
    bytearray: lambda text: bytearray(base64.b64decode(text, validate=True)),
}


def _decode(tp: Any, data: Any) -> Any:
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar) or tp is dataclasses.MISSING:
        return data
    if tp is None or tp is type(None):
        if data is not None:
            raise _NoFit("expected null")
        return None
    origin = typing.get_origin(tp)
    if origin is not None:
        return _decode_generic(tp, origin, typing.get_args(tp), data)
    if not isinstance(tp, type):
        return data  # NewType, ForwardRef left unresolved, ...: nothing to rebuild with
    return _decode_class(tp, data)


def _decode_class(tp: Any, data: Any) -> Any:
    base_model = _pydantic_model()
    if base_model is not None and issubclass(tp, base_model):
        try:
            return tp.model_validate_json(json.dumps(data))
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise _NoFit(str(exc)) from exc
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, data)
    if issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError as exc:
            raise _NoFit(str(exc)) from exc
    if issubclass(tp, tuple) and hasattr(tp, "_fields"):  # NamedTuple
        hints = _hints(tp)
        if not isinstance(data, list):
            raise _NoFit(f"expected an array for {tp.__qualname__}")
        return tp(*(_decode(hints.get(name, Any), item) for name, item in zip(tp._fields, data, strict=False)))
    for scalar, parse in _SCALARS.items():
        if issubclass(tp, scalar):
            if not isinstance(data, str):
                raise _NoFit(f"expected a string for {tp.__qualname__}")
            try:
                value = parse(data)
            except (ValueError, decimal.InvalidOperation, TypeError) as exc:
                raise _NoFit(str(exc)) from exc
            return value if tp is scalar else tp(value)
    if issubclass(tp, pathlib.PurePath):
        return tp(data)
    if tp is bool:
        if not isinstance(data, bool):
            raise _NoFit("expected a boolean")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise _NoFit("expected an integer")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise _NoFit("expected a number")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise _NoFit("expected a string")
        return data
    if tp in (list, tuple, set, frozenset, dict):
        return _decode_generic(tp, tp, (), data)
    return data


def _decode_generic(tp: Any, origin: Any, args: tuple[Any, ...], data: Any) -> Any:
    if origin is typing.Union or origin is types.UnionType:
        if data is None and type(None) in args:
            return None
        errors = []
        for member in args:
            if member is type(None):
                continue
            try:
                return _decode(member, data)
            except _NoFit as exc:
                errors.append(str(exc))
        raise _NoFit(f"fits no member of {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if data not in args:
            raise _NoFit(f"{data!r} is not one of {args}")
        return data
    if origin is typing.Annotated:
        return _decode(args[0], data)
    if origin in (dict, abc.Mapping, abc.MutableMapping):
        if not isinstance(data, dict):
            raise _NoFit("expected an object")
        key_type, value_type = args if len(args) == 2 else (Any, Any)
        return {_decode_key(key_type, k): _decode(value_type, v) for k, v in data.items()}
    if not isinstance(data, list):
        if origin in (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Set, abc.Iterable):
            raise _NoFit("expected an array")
        return data
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], item) for item in data)
        if args and args != ((),):
            if len(args) != len(data):
                raise _NoFit(f"expected {len(args)} items")
            return tuple(_decode(member, item) for member, item in zip(args, data, strict=True))
        return tuple(data)
    item_type = args[0] if args else Any
    items = [_decode(item_type, item) for item in data]
    if origin in (set, abc.Set, abc.MutableSet):
        return set(items)
    if origin is frozenset:
        return frozenset(items)
    return items


def _decode_key(key_type: Any, key: str) -> Any:
    if key_type is str or key_type is Any:
        return key
    try:
        return _decode(key_type, json.loads(key))
    except (ValueError, _NoFit):
        return _decode(key_type, key)


def _decode_dataclass(tp: Any, data: Any) -> Any:
    if not isinstance(data, dict):
        raise _NoFit(f"expected an object for {tp.__qualname__}")
    hints = _hints(tp)
    init: dict[str, Any] = {}
    late: dict[str, Any] = {}
    for field in dataclasses.fields(tp):
        if field.name not in data:
            continue
        value = _decode(hints.get(field.name, Any), data[field.name])
        (init if field.init else late)[field.name] = value
    try:
        instance = tp(**init)
    except TypeError as exc:
        raise _NoFit(f"cannot build {tp.__qualname__}: {exc}") from exc
    for name, value in late.items():
        # Fields outside __init__ are restored as they were stored (frozen
        # dataclasses too), so the replay equals the original.
        object.__setattr__(instance, name, value)
    return instance


def _hints(tp: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(tp)
    except Exception:  # unresolvable forward references: decode those fields as plain JSON
        return {}
