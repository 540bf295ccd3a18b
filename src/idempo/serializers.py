"""Serialisers and value forms: how ``@idempotent`` fingerprints arguments and keeps results.

**Results.** A store keeps responses (status, headers, body bytes), so a result
is stored as a response: status 200, a ``content-type`` header naming the
serialiser (its :attr:`Serializer.media_type`) and the serialised bytes as the
body. Every store holds such a record unchanged. A replay is decoded only by
the serialiser named in the record: data written by another serialiser is
refused, and pickled data is never unpickled unless pickle was asked for.

:class:`JSONSerializer` is the default. It writes the **typed form** of a
result: JSON in which every value that JSON has no type for is a one-key
object naming its type (``{"$uuid": "..."}``, ``{"$tuple": [...]}``,
``{"$dataclass": ["module:Class", {...}]}``), so a replay rebuilds the same
types as the first call returned, with or without a return annotation (see
:meth:`JSONSerializer.dumps` for the table). A value it cannot rebuild with its
type is refused rather than stored in a lossy form; a return annotation that
names such a type is refused when decorating (:func:`check_return_type`).
Records written before typed results (``content-type: application/json``,
plain JSON of :func:`json_form`) still replay where the return annotation
says what every part of them was, and raise ``ValueError`` otherwise
(:meth:`JSONSerializer.loads_legacy`).

:class:`PickleSerializer` keeps any picklable value exactly, for trusted
stores only: unpickling data an attacker wrote to the store runs their code.

**Fingerprints.** :func:`fingerprint_form` is the canonical form of an
argument value that ``@idempotent`` and the consumers hash (in its RFC 8785
canonical JSON): one form for values that are equal, a different one for
values that are not. The equalities it keeps are listed there and in
docs/decorator.md.
"""

from __future__ import annotations

import base64
import collections.abc as abc
import dataclasses
import datetime
import decimal
import enum
import functools
import inspect
import json
import math
import pathlib
import pickle
import sys
import types
import typing
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ._core.fingerprint import canonical_json

__all__ = [
    "JSONSerializer",
    "PickleSerializer",
    "Serializer",
    "check_return_type",
    "fingerprint_form",
    "from_json_form",
    "json_form",
]


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
    """JSON (RFC 8259) that keeps the types of a result: a replay returns the types the first call returned.

    The bytes are UTF-8 JSON of the result's typed form. JSON's own values
    (None, bool, int, float, str, list, dict with str keys) are written as
    themselves; every other supported value is a one-key object naming its
    type, and a dict key starting with ``$`` is written with one more ``$``,
    so the two never meet:

    ==========================================  ==========================================
    value (exact type)                          typed form
    ==========================================  ==========================================
    None, bool, int, str, list                  itself
    float                                       itself; NaN, inf: ``{"$float": "nan"}``
    dict with str keys                          object
    dict with other keys                        ``{"$map": [[key, value], ...]}``
    tuple, set, frozenset                       ``{"$tuple": [...]}``, ``{"$set": ...}``, ...
    bytes, bytearray                            ``{"$bytes": base64}``, ``{"$bytearray": ...}``
    datetime, date, time                        ``{"$datetime": [iso, zone?]}``, ...; a
                                                ``zoneinfo`` zone by its key
    timedelta                                   ``{"$timedelta": [days, s, us]}``
    UUID, Decimal                               ``{"$uuid": str}``, ``{"$decimal": str}``
                                                (the Decimal exactly: ``"10.50"``)
    pathlib paths                               ``{"$path": [class name, str]}``
    Enum member                                 ``{"$enum": ["module:Class", value]}``
    NamedTuple                                  ``{"$namedtuple": ["module:Class", [...]]}``
    dataclass                                   ``{"$dataclass": ["module:Class", fields]}``
    pydantic model                              ``{"$model": ["module:Class", fields,
                                                fields set]}``
    ==========================================  ==========================================

    A replay rebuilds a class only from the classes the return annotation
    names or a class found by its name in a module that is already imported
    (never an import the store's data asks for; so not a class defined inside
    a function, unless the annotation names it), and only a class of the kind
    the record says (a dataclass, a pydantic model, an Enum, a NamedTuple). A dataclass is
    rebuilt by calling it with its ``init`` fields, then setting the others as
    stored; a pydantic model with ``model_validate`` (not strict) of its fields,
    then its ``model_fields_set`` as stored. A pydantic field of a type only
    pydantic knows (``HttpUrl``, ``SecretStr``, ...) is stored as pydantic's
    JSON of it (a secret with its value, as an HTTP response body would hold it)
    and rebuilt by that validation.

    Before a result is stored it is rebuilt that way and written again; a
    result whose rebuilt form differs (a ``__post_init__`` or a validator that
    changes the values, a class a replay could not find) raises ``TypeError``,
    as does anything else outside the table (a ``str`` or ``dict`` subclass
    that is not an Enum, an object, a datetime whose class is a subclass): it
    would come back as another type or value.
    """

    media_type = "application/vnd.idempo+json"
    #: The media type of records written before typed results; read by :meth:`loads_legacy`.
    legacy_media_type = "application/json"

    def dumps(self, value: Any, annotation: Any = Any) -> bytes:
        """Return the typed form of ``value`` as UTF-8 JSON.

        Args:
            value: the result.
            annotation: the function's return annotation; the value must fit
                it (so a replay, checked against it, does too).

        Raises:
            TypeError: the value, or something inside it, cannot be stored with
                its type, or does not fit ``annotation``.
        """
        if not _conforms(annotation, value):
            raise TypeError(f"the result {_describe(value)} does not fit the return annotation {annotation!r}")
        form = _Encoder().encode(value)
        # Rebuild it as a replay in another process would, and compare: a
        # result that would not come back the same is refused now, before
        # anything is stored, not found out on a replay.
        try:
            rebuilt = _Decoder(_annotation_classes(annotation)).decode(form)
        except ValueError as exc:
            raise TypeError(f"the result could not be rebuilt on a replay: {exc}") from exc
        if not _same_form(form, _Encoder().encode(rebuilt)):
            raise TypeError(
                f"the result {_describe(value)} would not come back equal on a replay "
                "(a __post_init__ or a validator that changes the values it is given, "
                "or a type only pydantic knows in a field typed Any?)"
            )
        return json.dumps(form, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")

    def loads(self, data: bytes, annotation: Any) -> Any:
        """Rebuild the value :meth:`dumps` wrote.

        Raises:
            ValueError: the data is not a typed form this version reads, names
                a class that cannot be found (or is of another kind), or the
                value does not fit ``annotation`` (the function's return type
                changed since the record was written).
        """
        value = _Decoder(_annotation_classes(annotation)).decode(json.loads(data))
        if not _conforms(annotation, value):
            raise ValueError(
                f"the stored result {_describe(value)} does not fit the return annotation {annotation!r} "
                "(did the function's return type change since it was stored?)"
            )
        return value

    def loads_legacy(self, data: bytes, annotation: Any) -> Any:
        """Rebuild a result stored as plain JSON (:func:`json_form`) by idempo before typed results.

        Plain JSON lost the types, so only the return annotation can give them
        back: it must say what each part was. Where it does not (``Any``, no
        annotation, an unknown class), only a number, a bool or null is
        accepted there; a string could have been a datetime, a UUID or bytes,
        and a list a tuple or a set.

        Raises:
            ValueError: the data does not fit the annotation, or a part of it
                cannot be rebuilt with certainty.
        """
        return _LegacyDecoder(strict=True).decode(annotation, json.loads(data))

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


# --- the fingerprint form ----------------------------------------------------------------------


def fingerprint_form(value: Any) -> Any:
    """Return the canonical form of an argument value, as JSON types: the input of its fingerprint.

    ``@idempotent`` and the consumers hash this form in its canonical JSON
    (:func:`idempo._core.fingerprint.canonical_json`: RFC 8785's key order and
    escapes, numbers by exact decimal value), so dict key order
    does not matter, and two values get one form exactly when they are equal
    as Python's ``==`` has it, with these decisions:

    - ints and floats compare by exact value, as Python's ``==``: a float
      that holds an integer is that integer at any size (``2 == 2.0``,
      ``float(2**60) == 2**60``, ``1e22 == 10**22``; ``1e23`` is not
      ``10**23``: the double holds 99999999999999991611392), integers of any
      size stay exact, and ``True`` is not ``1`` (JSON keeps booleans apart);
    - a ``Decimal`` compares by value with Decimals (``Decimal("10.5")`` is
      ``Decimal("10.50")``) and never equals an int or a float;
    - a tuple equals the list of its items (a NamedTuple too): one sequence,
      as JSON has one array and a message that crossed JSON comes back a list;
      a set equals the frozenset of its items, never a list;
    - sets are ordered by the canonical form of their elements, so their
      iteration order never matters (``{("EUR", 2)}`` is ``{("EUR", 2.0)}``);
    - timezone-aware datetimes compare by instant (12:00+02:00 is 10:00 UTC),
      a naive datetime never equals an aware one; a date is not a datetime;
    - ``bytes`` are never a ``str`` with the same characters (bytearray is bytes);
    - a plain Enum member is neither its value nor a member of another Enum
      with that value; ``IntEnum``/``StrEnum`` members equal their int/str, as
      in Python;
    - a UUID is not its string;
    - a dataclass is its class and every field (``compare=False`` ones too);
      a pydantic model its class (a generic's origin) and every field, its
      extra fields included; so changing any one field changes the form.

    Inside a pydantic model a value of a type only pydantic knows (``HttpUrl``,
    ``IPv4Address``, ...) is pydantic's JSON of it with its type's name, and a
    ``SecretStr``/``SecretBytes`` its secret (hashed, never stored).

    Raises:
        TypeError: the value, or something inside it, has no canonical form
            (an object of another class, or a value nested too deep).
    """
    try:
        return _fingerprint(value, False)
    except RecursionError as exc:
        raise TypeError("the value nests too deep (or contains itself)") from exc


def _float_form(value: float) -> int | float:
    """A float's form: the int of its exact value when it holds an integer, so it is what ``==`` says.

    ``float(2**60) == 2**60`` in Python, but the float's shortest repr
    (``1.152921504606847e+18``) spells another integer, which the canonical
    JSON would take as its value; and a float of 10**21 or more would stay a
    float there while an int prints in full. The exact integer agrees with
    Python at every size. Other floats keep their shortest repr, whose exact
    decimal value no other float and no int has.
    """
    return int(value) if value.is_integer() else value


def _fingerprint(value: Any, pydantic_owned: bool) -> Any:
    if value is None or type(value) in (str, int, bool):
        return value
    # Subclasses of str, int and float (IntEnum, StrEnum, ...) equal their
    # plain value in Python, so they share its form.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return _float_form(float.__float__(value))
    if isinstance(value, list | tuple):
        return [_fingerprint(item, pydantic_owned) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {_escape(str.__str__(key)): _fingerprint(item, pydantic_owned) for key, item in value.items()}
        pairs = [[_fingerprint(key, pydantic_owned), _fingerprint(item, pydantic_owned)] for key, item in value.items()]
        return {"$map": sorted(pairs, key=_sort_key)}
    if isinstance(value, set | frozenset):
        return {"$set": sorted((_fingerprint(item, pydantic_owned) for item in value), key=_sort_key)}
    if isinstance(value, enum.Enum):
        return {"$enum": [_class_name(type(value)), _fingerprint(value.value, pydantic_owned)]}
    if isinstance(value, datetime.datetime):
        if value.utcoffset() is None:
            return {"$datetime": value.isoformat()}
        return {"$datetime": value.astimezone(datetime.UTC).isoformat()}
    if isinstance(value, datetime.date):
        return {"$date": value.isoformat()}
    if isinstance(value, datetime.time):
        offset = value.utcoffset()
        if offset is None:
            return {"$time": value.isoformat()}
        # Python compares aware times by their time minus the offset, without wrapping.
        since_midnight = datetime.timedelta(
            hours=value.hour, minutes=value.minute, seconds=value.second, microseconds=value.microsecond
        )
        return {"$time": ["utc", (since_midnight - offset) // datetime.timedelta(microseconds=1)]}
    if isinstance(value, datetime.timedelta):
        return {"$timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": _decimal_value(value)}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, pathlib.PurePath):
        if isinstance(value, pathlib.PureWindowsPath):  # Windows paths compare without case
            return {"$path": ["windows", str(value).lower()]}
        return {"$path": ["posix", str(value)]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        owned = _is_pydantic_dataclass(type(value))
        fields = {field.name: _fingerprint(getattr(value, field.name), owned) for field in dataclasses.fields(value)}
        return {"$dataclass": [_class_name(type(value)), fields]}
    base_model = _pydantic_model()
    if base_model is not None and isinstance(value, base_model):
        cls = _model_origin(type(value))
        form = {name: _fingerprint(getattr(value, name), True) for name in cls.model_fields}
        for name, item in (value.__pydantic_extra__ or {}).items():
            form[_escape(name)] = _fingerprint(item, True)
        return {"$model": [_class_name(cls), form]}
    if pydantic_owned:
        return _pydantic_leaf(value)
    raise TypeError(f"{_type_name(value)} has no fingerprint form")


def _decimal_value(value: decimal.Decimal) -> str:
    """One spelling per numeric value: Decimal("10.50") and Decimal("1.05E+1") give "105e-1"."""
    if not value.is_finite():
        return str(value).lstrip("+")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)).lstrip("0")
    if not text:
        return "0"  # 0, -0, 0E+5 and 0.00 are all equal
    stripped = text.rstrip("0")
    exponent += len(text) - len(stripped)
    return f"{'-' if sign else ''}{stripped}e{exponent}"


def _sort_key(form: Any) -> tuple[int, bytes]:
    """Order of canonical forms: by their RFC 8785 text (NaN, which it cannot write, by repr after)."""
    try:
        text = json.dumps(form, ensure_ascii=False, allow_nan=False)
        return 0, canonical_json(text.encode("utf-8", "surrogatepass"))
    except (ValueError, TypeError):
        return 1, repr(form).encode("utf-8", "surrogatepass")


def _escape(key: str) -> str:
    """A dict key starting with ``$`` gets one more, so it never reads as a type tag."""
    return "$" + key if key.startswith("$") else key


def _unescape(key: str) -> str:
    return key[1:] if key.startswith("$$") else key


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _describe(value: Any) -> str:
    return f"of type {_type_name(value)}"


def _pydantic_model() -> type[Any] | None:
    """pydantic's BaseModel when pydantic is already imported (a model instance implies it is)."""
    module = sys.modules.get("pydantic")
    return getattr(module, "BaseModel", None) if module is not None else None


def _model_origin(cls: Any) -> Any:
    """A generic model's origin class (``Page`` for ``Page[int]``), as pydantic's ``==`` compares them."""
    metadata = getattr(cls, "__pydantic_generic_metadata__", None) or {}
    return metadata.get("origin") or cls


def _is_pydantic_dataclass(cls: type) -> bool:
    return "__pydantic_validator__" in vars(cls)


def _pydantic_leaf(value: Any) -> Any:
    """A value of a type only pydantic knows, inside a model: pydantic's JSON of it, named by its type."""
    secret = getattr(value, "get_secret_value", None)
    if callable(secret):
        return {"$secret": _fingerprint(secret(), True)}
    import pydantic_core  # present wherever a pydantic model is

    try:
        jsonable = pydantic_core.to_jsonable_python(value)
    except (ValueError, TypeError) as exc:  # PydanticSerializationError is a ValueError
        raise TypeError(f"{_type_name(value)} has no form: {exc}") from exc
    return {"$pydantic": [_class_name(type(value)), jsonable]}


# --- the typed form of results -----------------------------------------------------------------

# The pathlib classes a replay may build, by name.
_PATHS: dict[str, type[pathlib.PurePath]] = {
    cls.__name__: cls
    for cls in (
        pathlib.PurePath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.Path,
        pathlib.PosixPath,
        pathlib.WindowsPath,
    )
}


class _Encoder:
    """Writes the typed form (see :class:`JSONSerializer`); raises TypeError for what it cannot keep."""

    def encode(self, value: Any) -> Any:
        try:
            return self._encode(value, False)
        except RecursionError as exc:
            raise TypeError("the result nests too deep (or contains itself)") from exc

    def _encode(self, value: Any, pydantic_owned: bool) -> Any:
        cls = type(value)
        if value is None or cls in (bool, int, str):
            return value
        if cls is float:
            return value if math.isfinite(value) else {"$float": repr(value)}
        if cls is list:
            return [self._encode(item, pydantic_owned) for item in value]
        if cls is dict:
            if all(type(key) is str for key in value):
                return {_escape(key): self._encode(item, pydantic_owned) for key, item in value.items()}
            pairs = [
                [self._encode(key, pydantic_owned), self._encode(item, pydantic_owned)] for key, item in value.items()
            ]
            return {"$map": pairs}
        if cls in (tuple, set, frozenset):
            return {f"${cls.__name__}": [self._encode(item, pydantic_owned) for item in value]}
        if cls in (bytes, bytearray):
            return {f"${cls.__name__}": base64.b64encode(value).decode("ascii")}
        if cls in (datetime.datetime, datetime.time):
            zone = value.tzinfo.key if isinstance(value.tzinfo, zoneinfo.ZoneInfo) else None
            return {f"${cls.__name__}": [value.isoformat()] if zone is None else [value.isoformat(), zone]}
        if cls is datetime.date:
            return {"$date": value.isoformat()}
        if cls is datetime.timedelta:
            return {"$timedelta": [value.days, value.seconds, value.microseconds]}
        if cls is uuid.UUID:
            return {"$uuid": str(value)}
        if cls is decimal.Decimal:
            return {"$decimal": str(value)}
        if _PATHS.get(cls.__name__) is cls:
            return {"$path": [cls.__name__, str(value)]}
        if isinstance(value, enum.Enum):
            return {"$enum": [_class_name(cls), self._encode(value.value, pydantic_owned)]}
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):
            return {"$namedtuple": [_class_name(cls), [self._encode(item, pydantic_owned) for item in value]]}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            owned = _is_pydantic_dataclass(cls)
            fields = {f.name: self._encode(getattr(value, f.name), owned) for f in dataclasses.fields(value)}
            return {"$dataclass": [_class_name(cls), fields]}
        base_model = _pydantic_model()
        if base_model is not None and isinstance(value, base_model):
            fields = {name: self._encode(getattr(value, name), True) for name in cls.model_fields}
            extra = {_escape(k): self._encode(v, True) for k, v in (value.__pydantic_extra__ or {}).items()}
            return {"$model": [_class_name(cls), {**fields, **extra}, sorted(value.model_fields_set)]}
        if pydantic_owned:
            return self._pydantic_leaf(value)
        raise TypeError(f"a {_type_name(value)} cannot be stored with its type")

    def _pydantic_leaf(self, value: Any) -> Any:
        """A value of a type only pydantic knows, in a model's field: pydantic's JSON of it, which it validates back."""
        secret = getattr(value, "get_secret_value", None)
        if callable(secret):  # SecretStr, SecretBytes: the str or bytes, which pydantic validates back
            return self._encode(secret(), True)
        import pydantic_core  # present wherever a pydantic model is

        try:
            return {"$json": pydantic_core.to_jsonable_python(value)}
        except (ValueError, TypeError) as exc:  # PydanticSerializationError is a ValueError
            raise TypeError(f"a {_type_name(value)} cannot be stored: {exc}") from exc


_KINDS: dict[str, Callable[[type], bool]] = {
    "$dataclass": dataclasses.is_dataclass,
    "$model": lambda cls: (base := _pydantic_model()) is not None and issubclass(cls, base),
    "$enum": lambda cls: issubclass(cls, enum.Enum),
    "$namedtuple": lambda cls: issubclass(cls, tuple) and hasattr(cls, "_fields"),
}


class _Decoder:
    """Reads the typed form back; raises ValueError for what it cannot rebuild."""

    def __init__(self, named: dict[str, type]) -> None:
        self.named = named

    def decode(self, data: Any) -> Any:
        try:
            return self._decode(data)
        except Exception as exc:  # a malformed form, or what a class's own __init__ or validator raised
            raise ValueError(str(exc) or type(exc).__name__) from exc

    def _decode(self, data: Any) -> Any:
        if isinstance(data, list):
            return [self._decode(item) for item in data]
        if not isinstance(data, dict):
            return data
        if len(data) == 1:
            ((tag, payload),) = data.items()
            if tag.startswith("$") and not tag.startswith("$$"):
                return self._untag(tag, payload)
        return {_unescape(key): self._decode(item) for key, item in data.items()}

    def _untag(self, tag: str, payload: Any) -> Any:
        if tag == "$float":
            return float(payload)
        if tag == "$map":
            return {self._decode(key): self._decode(item) for key, item in payload}
        if tag == "$tuple":
            return tuple(self._decode(item) for item in payload)
        if tag == "$set":
            return {self._decode(item) for item in payload}
        if tag == "$frozenset":
            return frozenset(self._decode(item) for item in payload)
        if tag == "$bytes":
            return base64.b64decode(payload, validate=True)
        if tag == "$bytearray":
            return bytearray(base64.b64decode(payload, validate=True))
        if tag in ("$datetime", "$time"):
            parse = datetime.datetime if tag == "$datetime" else datetime.time
            value = parse.fromisoformat(payload[0])
            if len(payload) == 1:
                return value
            zone = zoneinfo.ZoneInfo(payload[1])
            # The stored offset picks the fold of an ambiguous local time.
            return value.astimezone(zone) if isinstance(value, datetime.datetime) else value.replace(tzinfo=zone)
        if tag == "$date":
            return datetime.date.fromisoformat(payload)
        if tag == "$timedelta":
            days, seconds, microseconds = payload
            return datetime.timedelta(days=days, seconds=seconds, microseconds=microseconds)
        if tag == "$uuid":
            return uuid.UUID(payload)
        if tag == "$decimal":
            return decimal.Decimal(payload)
        if tag == "$path":
            return _PATHS[payload[0]](payload[1])
        if tag == "$json":
            return payload
        cls = self._find(tag, payload[0])
        if tag == "$enum":
            return cls(self._decode(payload[1]))
        if tag == "$namedtuple":
            return cls(*(self._decode(item) for item in payload[1]))
        if tag == "$dataclass":
            return self._dataclass(cls, payload[1])
        if tag == "$model":
            return self._model(cls, payload[1], payload[2])
        raise ValueError(f"unknown type tag {tag!r} (written by a newer idempo?)")

    def _find(self, tag: str, name: str) -> Any:
        """The class a record names: from the annotation, this process's results, or an imported module."""
        kind = _KINDS.get(tag)
        if kind is None:
            raise ValueError(f"unknown type tag {tag!r} (written by a newer idempo?)")
        cls = self.named.get(name) or _imported_class(name)
        if cls is None:
            raise ValueError(
                f"the stored result holds a {name.replace(':', '.')}, which is not in the return annotation "
                "and not found in the imported modules"
            )
        if not kind(cls):
            raise ValueError(f"{name.replace(':', '.')} is not a {tag[1:]} any more")
        return cls

    def _dataclass(self, cls: Any, stored: dict[str, Any]) -> Any:
        init: dict[str, Any] = {}
        late: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in stored:
                (init if field.init else late)[field.name] = self._decode(stored[field.name])
        instance = cls(**init)
        for name, value in late.items():
            # Fields outside __init__ are restored as they were stored (frozen
            # dataclasses too), so the replay equals the original.
            object.__setattr__(instance, name, value)
        return instance

    def _model(self, cls: Any, stored: dict[str, Any], fields_set: list[str]) -> Any:
        fields = {_unescape(key): self._decode(item) for key, item in stored.items()}
        if getattr(cls, "__pydantic_root_model__", False):
            instance = cls.model_validate(fields["root"], strict=False)
        elif _validates_by_name():
            instance = cls.model_validate(fields, strict=False, by_name=True)
        else:  # pydantic before 2.11 validates by alias only
            instance = cls.model_validate(_by_alias(cls, fields), strict=False)
        object.__setattr__(instance, "__pydantic_fields_set__", set(fields_set))
        return instance


@functools.cache
def _validates_by_name() -> bool:
    base_model = _pydantic_model()
    return base_model is not None and "by_name" in inspect.signature(base_model.model_validate).parameters


def _by_alias(cls: Any, fields: dict[str, Any]) -> dict[str, Any]:
    keyed = dict(fields)
    for name, info in cls.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
        if isinstance(alias, str) and name in keyed:
            keyed[alias] = keyed.pop(name)
    return keyed


def _same_form(a: Any, b: Any) -> bool:
    """Two typed forms hold the same value: equal, a set's items in any order."""
    return bool(_ordered(a) == _ordered(b))


def _ordered(form: Any) -> Any:
    """A typed form with each set's items in one order, and each number tagged with its type."""
    if isinstance(form, list):
        return [_ordered(item) for item in form]
    if isinstance(form, dict):
        ordered = {key: _ordered(item) for key, item in form.items()}
        if len(form) == 1 and next(iter(form)) in ("$set", "$frozenset"):
            ((tag, items),) = ordered.items()
            return {tag: sorted(items, key=lambda item: json.dumps(item, sort_keys=True))}
        return ordered
    return (type(form).__name__, form)  # 1 == 1.0 == True for ==, not here


def _imported_class(name: str) -> type | None:
    """The class ``module:qualname`` names, if its module is imported already (never imported here).

    A parametrised pydantic model (``Page[int]``) is not a module attribute:
    its origin class (``Page``) stands for it, which a model field of the
    parametrised type validates back into it.
    """
    module_name, _, qualname = name.partition(":")
    qualname = qualname.split("[", 1)[0]
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if found is None or part == "<locals>":
            return None
        found = getattr(found, part, None)
    return found if isinstance(found, type) and _class_name(found) == f"{module_name}:{qualname}" else None


# --- return annotations: what a replay may build, and what it must fit ------------------------

_TYPED_CLASSES: tuple[type, ...] = (
    type(None),
    bool,
    int,
    float,
    str,
    bytes,
    bytearray,
    list,
    tuple,
    set,
    frozenset,
    dict,
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    uuid.UUID,
    decimal.Decimal,
    *_PATHS.values(),
)

# Generic origins whose arguments are checked; any other origin (Callable,
# Iterator, Generator, type[...], ...) cannot be stored.
_COLLECTIONS: tuple[Any, ...] = (
    list,
    tuple,
    set,
    frozenset,
    dict,
    abc.Collection,
    abc.Iterable,
    abc.Sequence,
    abc.MutableSequence,
    abc.Set,
    abc.MutableSet,
    abc.Mapping,
    abc.MutableMapping,
)


def check_return_type(annotation: Any) -> None:
    """Refuse a return annotation naming a type :class:`JSONSerializer` cannot rebuild.

    Accepted: ``Any``/``object`` and type variables (checked per value), the
    types in :class:`JSONSerializer`'s table, Enums, NamedTuples, dataclasses
    (their field annotations checked in turn), pydantic models and
    TypedDicts, and ``Optional``/``Union``/``Literal``/``Annotated`` and the
    ``list``/``tuple``/``set``/``frozenset``/``dict`` generics (and their
    ``collections.abc`` spellings) of accepted types.

    Raises:
        TypeError: naming the part that cannot be stored (an iterator, a
            callable, a class of its own, ...).
    """
    part = _unstorable(annotation, set())
    if part is annotation:
        raise TypeError(f"the return type {annotation!r} cannot be stored with its type")
    if part is not None:
        shown = part.__qualname__ if isinstance(part, type) else repr(part)
        raise TypeError(f"the return type {annotation!r} holds {shown}, which cannot be stored with its type")


def _unstorable(tp: Any, seen: set[Any]) -> Any:
    """The part of an annotation a replay could not rebuild, or None."""
    if _open(tp):
        return None
    if isinstance(tp, typing.NewType):
        return _unstorable(tp.__supertype__, seen)
    origin = typing.get_origin(tp)
    if origin is not None:
        if origin in (typing.Union, types.UnionType, typing.Annotated, *_COLLECTIONS):
            args = typing.get_args(tp)[:1] if origin is typing.Annotated else typing.get_args(tp)
            return next((part for arg in args if arg is not Ellipsis and (part := _unstorable(arg, seen))), None)
        return None if origin is typing.Literal else tp
    if not isinstance(tp, type):
        return tp
    if tp in _TYPED_CLASSES or issubclass(tp, enum.Enum):
        return None
    base_model = _pydantic_model()
    if base_model is not None and issubclass(tp, base_model):
        return None  # pydantic rebuilds its fields; a field it cannot serialise fails per value
    if not (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp) or _is_namedtuple(tp)):
        return tp
    if tp in seen:
        return None
    seen.add(tp)
    hints = _hints(tp)
    return next((part for hint in hints.values() if (part := _unstorable(hint, seen))), None)


def _open(tp: Any) -> bool:
    """An annotation that says nothing to check: Any, object, a type variable, an unresolved name, None."""
    return (
        tp is Any
        or tp is object
        or tp is None
        or tp is typing.NoReturn
        or tp is typing.Never
        or isinstance(tp, typing.TypeVar | typing.ForwardRef | str)
        or tp is dataclasses.MISSING
    )


def _is_namedtuple(tp: type) -> bool:
    return issubclass(tp, tuple) and hasattr(tp, "_fields")


@functools.lru_cache(maxsize=256)
def _annotation_classes_cached(annotation: Any) -> dict[str, type]:
    found: dict[str, type] = {}
    _collect(annotation, found)
    return found


def _annotation_classes(annotation: Any) -> dict[str, type]:
    """The classes an annotation names (through generics and dataclass fields), by ``module:qualname``."""
    try:
        return _annotation_classes_cached(annotation)
    except TypeError:  # an unhashable annotation (Literal of a list, ...)
        found: dict[str, type] = {}
        _collect(annotation, found)
        return found


def _collect(tp: Any, found: dict[str, type]) -> None:
    if isinstance(tp, typing.NewType):
        _collect(tp.__supertype__, found)
        return
    origin = typing.get_origin(tp)
    if origin is not None:
        if origin is not typing.Literal:
            for arg in typing.get_args(tp):
                _collect(arg, found)
        return
    if not isinstance(tp, type) or tp in _TYPED_CLASSES or _class_name(tp) in found:
        return
    found[_class_name(tp)] = tp
    if dataclasses.is_dataclass(tp) or _is_namedtuple(tp) or typing.is_typeddict(tp):
        for hint in _hints(tp).values():
            _collect(hint, found)
    base_model = _pydantic_model()
    if base_model is not None and issubclass(tp, base_model):
        fields: dict[str, Any] = getattr(tp, "model_fields", {})
        for info in fields.values():
            _collect(info.annotation, found)


def _conforms(tp: Any, value: Any) -> bool:
    """True when ``value`` fits the annotation ``tp`` (PEP 484's numeric tower: an int is a float)."""
    if _open(tp):
        return tp is not None or value is None
    if tp is type(None):
        return value is None
    if isinstance(tp, typing.NewType):
        return _conforms(tp.__supertype__, value)
    origin = typing.get_origin(tp)
    if origin is not None:
        args = typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            return any(_conforms(arg, value) for arg in args)
        if origin is typing.Literal:
            return any(value == arg and type(value) is type(arg) for arg in args)
        if origin is typing.Annotated:
            return _conforms(args[0], value)
        if origin is tuple:
            if not isinstance(value, tuple):
                return False
            if len(args) == 2 and args[1] is Ellipsis:
                return all(_conforms(args[0], item) for item in value)
            if not args:
                return True
            return len(args) == len(value) and all(map(_conforms, args, value))
        if origin in _COLLECTIONS:
            if not isinstance(value, origin):
                return False
            if isinstance(value, abc.Mapping):
                key_type, value_type = args if len(args) == 2 else (Any, Any)
                return all(_conforms(key_type, k) and _conforms(value_type, v) for k, v in value.items())
            return not args or all(_conforms(args[0], item) for item in value)
        return isinstance(origin, type) and isinstance(value, origin)
    if not isinstance(tp, type):
        return True
    if tp is float:
        return isinstance(value, int | float)
    if tp is bytes:
        return isinstance(value, bytes | bytearray)
    if typing.is_typeddict(tp):
        return isinstance(value, dict)
    try:
        return isinstance(value, _model_origin(tp))
    except TypeError:  # a Protocol that is not runtime-checkable: nothing to check
        return True


# --- the plain JSON form (results before typed results) ----------------------------------------


def json_form(value: Any) -> Any:
    """Return ``value`` as plain JSON types (dict with str keys, list, str, int, float, bool, None).

    The form results were stored in before typed results (read back by
    :meth:`JSONSerializer.loads_legacy`); it loses types (a UUID becomes a
    str, a tuple a list). Fingerprints use :func:`fingerprint_form`.

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
    return _LegacyDecoder(strict=False).decode(annotation, data)


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    datetime.datetime: datetime.datetime.fromisoformat,
    datetime.date: datetime.date.fromisoformat,
    datetime.time: datetime.time.fromisoformat,
    uuid.UUID: uuid.UUID,
    decimal.Decimal: decimal.Decimal,
    bytes: lambda text: base64.b64decode(text, validate=True),
    bytearray: lambda text: bytearray(base64.b64decode(text, validate=True)),
}


class _LegacyDecoder:
    """Plain JSON back to the annotation's types.

    Args:
        strict: where the annotation does not say the type (``Any``, an
            unknown class), accept only numbers, bools and null, whose JSON
            type is their Python type; anything else raises :class:`_NoFit`.
    """

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict

    def decode(self, tp: Any, data: Any) -> Any:
        if tp is Any or tp is object or isinstance(tp, typing.TypeVar) or tp is dataclasses.MISSING:
            return self._untyped(data)
        if tp is None or tp is type(None):
            if data is not None:
                raise _NoFit("expected null")
            return None
        if isinstance(tp, typing.NewType):
            return self.decode(tp.__supertype__, data)
        origin = typing.get_origin(tp)
        if origin is not None:
            return self._generic(tp, origin, typing.get_args(tp), data)
        if not isinstance(tp, type):
            return self._untyped(data)  # a ForwardRef left unresolved, ...: nothing to rebuild with
        return self._class(tp, data)

    def _untyped(self, data: Any) -> Any:
        if self.strict and not (data is None or isinstance(data, bool | int | float)):
            raise _NoFit(
                f"a {type(data).__name__} where the return annotation does not say its type "
                "(it was stored without its type: a str could have been a datetime, a UUID or bytes)"
            )
        return data

    def _class(self, tp: Any, data: Any) -> Any:
        base_model = _pydantic_model()
        if base_model is not None and issubclass(tp, base_model):
            try:
                return tp.model_validate_json(json.dumps(data))
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise _NoFit(str(exc)) from exc
        if dataclasses.is_dataclass(tp):
            return self._dataclass(tp, data)
        if issubclass(tp, enum.Enum):
            try:
                return tp(data)
            except ValueError as exc:
                raise _NoFit(str(exc)) from exc
        if _is_namedtuple(tp):
            hints = _hints(tp)
            if not isinstance(data, list):
                raise _NoFit(f"expected an array for {tp.__qualname__}")
            return tp(*(self.decode(hints.get(name, Any), item) for name, item in zip(tp._fields, data, strict=False)))
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
            return self._generic(tp, tp, (), data)
        return self._untyped(data)

    def _generic(self, tp: Any, origin: Any, args: tuple[Any, ...], data: Any) -> Any:
        if origin is typing.Union or origin is types.UnionType:
            if data is None and type(None) in args:
                return None
            errors = []
            for member in args:
                if member is type(None):
                    continue
                try:
                    return self.decode(member, data)
                except _NoFit as exc:
                    errors.append(str(exc))
            raise _NoFit(f"fits no member of {tp}: {'; '.join(errors)}")
        if origin is typing.Literal:
            if data not in args:
                raise _NoFit(f"{data!r} is not one of {args}")
            return data
        if origin is typing.Annotated:
            return self.decode(args[0], data)
        if origin in (dict, abc.Mapping, abc.MutableMapping):
            if not isinstance(data, dict):
                raise _NoFit("expected an object")
            key_type, value_type = args if len(args) == 2 else (Any, Any)
            return {self._key(key_type, k): self.decode(value_type, v) for k, v in data.items()}
        if not isinstance(data, list):
            if origin in (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Set, abc.Iterable):
                raise _NoFit("expected an array")
            return self._untyped(data)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.decode(args[0], item) for item in data)
            if args and args != ((),):
                if len(args) != len(data):
                    raise _NoFit(f"expected {len(args)} items")
                return tuple(self.decode(member, item) for member, item in zip(args, data, strict=True))
            return tuple(self._untyped_items(data))
        item_type = args[0] if args else Any
        if origin in (set, abc.Set, abc.MutableSet):
            return {self.decode(item_type, item) for item in data}
        if origin is frozenset:
            return frozenset(self.decode(item_type, item) for item in data)
        if origin in (list, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection):
            return [self.decode(item_type, item) for item in data]
        return self._untyped(data)

    def _untyped_items(self, data: list[Any]) -> list[Any]:
        return [self._untyped(item) for item in data]

    def _key(self, key_type: Any, key: str) -> Any:
        if key_type is str or (key_type is Any and not self.strict):
            return key
        try:
            return self.decode(key_type, json.loads(key))
        except (ValueError, _NoFit):
            return self.decode(key_type, key)

    def _dataclass(self, tp: Any, data: Any) -> Any:
        if not isinstance(data, dict):
            raise _NoFit(f"expected an object for {tp.__qualname__}")
        hints = _hints(tp)
        init: dict[str, Any] = {}
        late: dict[str, Any] = {}
        for field in dataclasses.fields(tp):
            if field.name not in data:
                continue
            value = self.decode(hints.get(field.name, Any), data[field.name])
            (init if field.init else late)[field.name] = value
        try:
            instance = tp(**init)
        except TypeError as exc:
            raise _NoFit(f"cannot build {tp.__qualname__}: {exc}") from exc
        for name, value in late.items():
            object.__setattr__(instance, name, value)
        return instance


def _hints(tp: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(tp)
    except Exception:  # unresolvable forward references: decode those fields as plain JSON
        return {}
