"""Starlette and FastAPI: the options a route declares, found with the framework's own route matcher.

The ASGI middleware runs before routing, so it asks Starlette's matcher
(``route.matches(scope)``, in the router's order, into mounts and FastAPI's
included routers) which route a request goes to, as the router will a moment
later, and reads the options the route declares (FastAPI's
``Depends(idempotency(...))``, :mod:`idempo.fastapi`). :mod:`idempo.fastapi`
adds :class:`StarletteRouteOptions` to the ASGI middleware's finders when it
is imported: the generic front knows no framework.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Match

from .._core.policy import Policy
from .._core.routes import RouteOptions, RouteTable
from .asgi import Scope

__all__ = ["StarletteRouteOptions", "dependant_options", "flat_routes", "match_route"]


class StarletteRouteOptions:
    """Finds the :class:`RouteOptions` declared on the route a request goes to (Starlette, FastAPI).

    The middleware runs before routing, so it asks the framework's own
    matcher (``route.matches(scope)``, in the router's order, into mounts),
    as the router will a moment later. What a route declares is read once per
    route and cached; apps that declare nothing are not matched at all, and
    neither is a request whose method no route's options and no path's policy
    could make take part (a GET, usually).

    Args:
        table: the middleware's path patterns; their policies are the bases
            route options may derive from.
    """

    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._per_route: dict[int, tuple[object, RouteOptions | None]] = {}
        self._routes: object = None
        # Every route list the last read walked, nested ones included.
        self._lists: tuple[_RouteList, ...] = ()
        self._default: Policy | None = None
        self._any = False
        self._methods: frozenset[str] = frozenset()

    def find(self, scope: Scope, app: Any, policy: Policy | None, default: Policy) -> RouteOptions | None:
        """Return the options of the route ``scope`` goes to, or None where they cannot matter.

        Args:
            scope: the request's ASGI scope.
            app: the app the middleware wraps (the Starlette app when it wraps
                one from outside, so ``scope["app"]`` is not set yet).
            policy: the policy of the request's path (None: exempt by a pattern).
            default: the middleware's default policy.
        """
        # Added with app.add_middleware, the app is in the scope; wrapped
        # around the app from outside, it is the app itself.
        holder: Any = scope.get("app")
        if not isinstance(holder, Starlette):
            holder = app
            if not isinstance(holder, Starlette):
                return None
        routes: Sequence[Any] = holder.router.routes
        if routes is not self._routes or default is not self._default or _changed(self._lists):
            # Read once per route table: a route added later, at the top or
            # in a mounted app or an included router, changes some list.
            self._read(routes, default)
        if not self._any:
            return None
        # Upper case: a "post" is admitted too (idempo._core.http.takes_part).
        method: str = scope["method"].upper()
        if method not in self._methods and (policy is None or method not in policy.methods):
            # Whichever route the request goes to, its policy leaves the method
            # out, so the request passes through: the match would change nothing.
            return None
        route = match_route(routes, scope)
        return None if route is None else self._options(route)

    def _read(self, routes: Sequence[Any], default: Policy) -> None:
        lists: list[_RouteList] = []
        declared = [options for route in _all_routes(routes, lists) if (options := self._options(route)) is not None]
        # A route's options derive from its path's policy, which depends on
        # the request's path, so take every policy the path could have.
        bases = [default, *(base for base in self._table.policies() if base is not None)]
        methods: set[str] = set()
        for options in declared:
            for base in bases:
                derived = options.apply(base, default)
                if derived is not None:
                    methods.update(derived.methods)
        self._any = bool(declared)
        self._methods = frozenset(methods)
        self._routes, self._lists, self._default = routes, tuple(lists), default

    def _options(self, route: object) -> RouteOptions | None:
        cached = self._per_route.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        options = None
        dependant = getattr(route, "dependant", None)
        if dependant is not None:
            options = dependant_options(dependant)
        self._per_route[id(route)] = (route, options)
        return options


def flat_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Routes in the router's order, with FastAPI's included routers opened in place.

    FastAPI (0.120+) keeps an included router as one entry whose
    ``effective_candidates()`` are its routes with the include's prefix and
    dependencies applied; each candidate ``matches`` like a route and has the
    combined ``dependant``.
    """
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            yield from flat_routes(candidates())
        else:
            yield route


#: A route list as read, to tell later whether it changed: (the object that
#: holds it, None for the top level; its list now, fetched cheaply; the list
#: then; its length then). Checked on every request, so never anything that
#: walks routes: for a FastAPI included router, the router's own route list
#: (FastAPI rebuilds the include's candidates when that list changes).
_RouteList = tuple[Any, Callable[[Any], Any], Any, int]


def _own_routes(owner: Any) -> Any:
    return owner.routes


def _router_routes(owner: Any) -> Any:
    return owner.original_router.routes


def _changed(lists: tuple[_RouteList, ...]) -> bool:
    """True when a route list read before is another list now, or has another length."""
    for owner, fetch, seen, count in lists:
        current = seen if owner is None else fetch(owner)
        if (seen is not None and current is not seen) or len(current) != count:
            return True
    return False


def _all_routes(routes: Sequence[Any], lists: list[_RouteList], owner: Any = None, fetch: Any = None) -> Iterator[Any]:
    """Every route, nested ones included; records each route list walked in ``lists``.

    A list its owner makes afresh on each access (a property) is recorded by
    length only (``seen`` None), or the check would find it changed every time.
    """
    own = routes if owner is None else fetch(owner)
    stable = owner is None or fetch(owner) is own
    lists.append((owner, fetch, own if stable else None, len(own)))
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            fetch_included = _router_routes if hasattr(route, "original_router") else _candidates
            yield from _all_routes(candidates(), lists, route, fetch_included)
            continue
        yield route
        children = getattr(route, "routes", None)
        # An empty list counts when it is the mounted app's own (routes may
        # be added to it later), not a fresh [] made for an app without routes.
        if children is not None and not hasattr(route, "endpoint") and (children or route.routes is children):
            yield from _all_routes(children, lists, route, _own_routes)


def _candidates(owner: Any) -> Any:
    return owner.effective_candidates()


def match_route(routes: Iterable[Any], scope: Scope) -> Any:
    """The route the framework's router will pick for ``scope`` (first full match), or None."""
    for route in flat_routes(routes):
        match, child_scope = route.matches(scope)
        if match is not Match.FULL:
            continue
        children = getattr(route, "routes", None)
        if children is not None and not hasattr(route, "endpoint"):  # a Mount or Host
            return match_route(children, {**scope, **child_scope})
        return route
    return None


def dependant_options(dependant: Any) -> RouteOptions | None:
    """The options of the innermost idempotency dependency in a FastAPI dependency tree.

    Router dependencies come before the route's own in ``dependant.dependencies``,
    so the last one found (the route's) wins.
    """
    found: RouteOptions | None = getattr(dependant.call, "idempo_route_options", None)
    for sub in dependant.dependencies:
        options = dependant_options(sub)
        if options is not None:
            found = options
    return found
