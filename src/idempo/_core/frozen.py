"""A faster constructor for the frozen, slotted dataclasses a request makes (commands, decisions, results).

A frozen dataclass's generated ``__init__`` sets each field with
``object.__setattr__(self, name, value)``, since its own ``__setattr__``
refuses: a generic call that looks the attribute up by name every time.
A unique-key request makes about a dozen such objects (the commands its
admission yields, the store's result, the decision, the settle), so the
stores cost as much as the fields' values.

:func:`fast_init` replaces that ``__init__`` with one that stores each value
through the field's slot descriptor (its ``__set__``, bound once), less than
half the cost. Nothing else changes: the instances stay frozen (assignment
still raises ``FrozenInstanceError``), equal and hashable as before, and the
signature (defaults included) is the dataclass's own, which type checkers
keep reading from the ``@dataclass`` declaration.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["fast_init"]

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Give a frozen, slotted dataclass an ``__init__`` that sets its slots directly (see the module docstring).

    Apply it above ``@dataclass(frozen=True, slots=True)``. Only for plain
    fields: no ``default_factory``, ``InitVar``, ``kw_only`` or ``__post_init__``.

    Raises:
        TypeError: ``cls`` is not such a dataclass.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in vars(cls):
        raise TypeError(f"{cls.__name__} is not a frozen, slotted dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__")
    namespace: dict[str, Any] = {}
    arguments = []
    body = []
    for i, field in enumerate(dataclasses.fields(cls)):  # type: ignore[arg-type]
        if not field.init or field.kw_only or field.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name} is not a plain field")
        namespace[f"_set{i}"] = vars(cls)[field.name].__set__
        if field.default is dataclasses.MISSING:
            arguments.append(field.name)
        else:
            namespace[f"_default{i}"] = field.default
            arguments.append(f"{field.name}=_default{i}")
        body.append(f"    _set{i}(self, {field.name})\n")
    source = "def __init__(self, " + ", ".join(arguments) + "):\n" + ("".join(body) or "    pass\n")
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
