"""Which policy applies to a request: path patterns, and options declared on a route or view.

:class:`RouteTable` maps glob patterns to policies (the middlewares'
``routes``); :class:`RouteOptions` are what a framework integration lets a
route or view declare (FastAPI's ``Depends(idempotency(...))``, Flask's and
Django's view decorators, Litestar's ``opt``), applied over the path's policy.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import ConfigurationError
from .policy import Policy

__all__ = ["RouteOptions", "RouteTable"]


class RouteTable:
    """Per-path policies: glob patterns (``fnmatch``) mapped to a Policy, or None to exempt.

    Args:
        routes: e.g. ``{"/payments*": Policy(require_key=True), "/webhooks/*": None}``;
            the first matching pattern wins.

    Raises:
        ConfigurationError: a value is neither a Policy nor None.
    """

    __slots__ = ("_routes",)

    def __init__(self, routes: Mapping[str, Policy | None] | None = None) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Policy | None]] = []
        for pattern, route_policy in (routes or {}).items():
            if route_policy is not None and not isinstance(route_policy, Policy):
                raise ConfigurationError(f"routes[{pattern!r}] must be a Policy or None")
            self._routes.append((pattern, re.compile(fnmatch.translate(pattern)), route_policy))

    def __bool__(self) -> bool:
        return bool(self._routes)

    def policies(self) -> list[Policy | None]:
        """Return the patterns' policies in order (None: a pattern that exempts its paths)."""
        return [route_policy for _, _, route_policy in self._routes]

    def policy_for(self, path: str, default: Policy) -> Policy | None:
        """Return the first matching pattern's policy (None: exempt), else ``default``."""
        return self.route_for(path, default)[1]

    def route_for(self, path: str, default: Policy) -> tuple[str, Policy | None]:
        """Return the route label of a path and its policy (None: exempt).

        The label is the pattern that matched, or ``"*"`` for ``default``:
        logs, metrics and spans name routes by it, never by raw path, so
        labels stay few.
        """
        for name, pattern, route_policy in self._routes:
            if pattern.match(path):
                return name, route_policy
        return "*", default


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """Idempotency options declared on one route or view (FastAPI dependency, Django decorator, ...).

    Attributes:
        policy: a whole policy replacing the one the middleware would use, or
            None to derive it from that policy with ``changes``.
        changes: Policy arguments to change, e.g. ``{"require_key": True,
            "record_ttl": 3600}``.
        exempt: the route takes no part in idempotency at all.
    """

    policy: Policy | None = None
    changes: Mapping[str, Any] = field(default_factory=dict)
    exempt: bool = False
    # apply()'s results per (base, default): a Policy is built once per pair, not per request.
    _derived: dict[tuple[int, int], tuple[Policy | None, Policy, Policy]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def declared(
        cls,
        policy: Policy | None,
        *,
        require_key: bool | None,
        record_ttl: Any,
        lease_ttl: Any,
        changes: dict[str, Any],
    ) -> RouteOptions:
        """The options of a front's ``idempotency(...)``: its named arguments join ``changes`` unless None.

        Raises:
            ConfigurationError: a change is not a valid Policy argument value.
            TypeError: a change is not a Policy argument.
        """
        named = {"require_key": require_key, "record_ttl": record_ttl, "lease_ttl": lease_ttl}
        changes.update({name: value for name, value in named.items() if value is not None})
        return cls(policy=policy, changes=changes)

    def __post_init__(self) -> None:
        if self.changes:
            # Fail when the route is declared, not on its first request.
            (self.policy or Policy()).replace(**self.changes)

    def apply(self, base: Policy | None, default: Policy) -> Policy | None:
        """Return the route's policy: None when exempt, else ``policy`` or ``base`` with ``changes``.

        Args:
            base: the policy the middleware would use for the path (None when
                its path patterns exempt the path).
            default: the middleware's default policy, used when ``base`` is None.
        """
        if self.exempt:
            return None
        policy = self.policy or base or default
        if not self.changes:
            return policy
        derived = self._derived.get((id(base), id(default)))
        if derived is not None and derived[0] is base and derived[1] is default:
            return derived[2]
        result = policy.replace(**self.changes)
        self._derived[(id(base), id(default))] = (base, default, result)
        return result
