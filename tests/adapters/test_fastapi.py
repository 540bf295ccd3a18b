"""FastAPI route options (idempo.fastapi): per-route key requirement, TTL and exemption, and the OpenAPI schema."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel

from idempo import Policy
from idempo.asgi import IdempotencyMiddleware
from idempo.fastapi import document, idempotency, idempotency_exempt, install
from idempo.stores import AsyncMemoryStore
from tests.adapters.conftest import JSON
from tests.support.clock import FakeClock
from tests.support.servers import running_asgi


class Payment(BaseModel):
    """A request body, so FastAPI adds its own 422 (validation error) to the schema."""

    amount: int


@dataclass
class App:
    """The FastAPI app under test, its server's client, its clock and its handler counts."""

    app: FastAPI
    client: httpx.Client
    clock: FakeClock
    calls: dict[str, int]

    def post(self, path: str, key: str | None, body: bytes = b'{"amount":1}') -> httpx.Response:
        headers = dict(JSON)
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.client.post(path, content=body, headers=headers)


def build(calls: dict[str, int]) -> FastAPI:
    """Routes with every kind of option, at route and at router level."""
    app = FastAPI()

    def count(name: str) -> dict[str, int]:
        calls[name] = calls.get(name, 0) + 1
        return {"n": calls[name]}

    @app.post("/payments", status_code=201, dependencies=[Depends(idempotency(require_key=True, record_ttl=60))])
    async def pay(payment: Payment) -> dict[str, int]:
        return count("payments")

    @app.post("/items/{item_id}", status_code=201, dependencies=[Depends(idempotency(require_key=True))])
    async def item(item_id: int) -> dict[str, int]:
        return count(f"items/{item_id}")

    @app.post("/webhooks", status_code=201, dependencies=[Depends(idempotency_exempt)])
    async def webhook(payment: Payment) -> dict[str, int]:
        return count("webhooks")

    @app.post("/orders", status_code=201)
    async def order() -> dict[str, int]:
        return count("orders")

    internal = APIRouter(prefix="/internal", dependencies=[Depends(idempotency_exempt)])

    @internal.post("/jobs", status_code=201)
    async def job() -> dict[str, int]:
        return count("jobs")

    @internal.post("/charges", status_code=201, dependencies=[Depends(idempotency(require_key=True))])
    async def charge() -> dict[str, int]:
        return count("charges")

    app.include_router(internal)
    return app


@pytest.fixture(scope="module")
def served() -> Iterator[App]:
    """The app with idempo.fastapi.install, under uvicorn (one server for the module; each test uses fresh keys)."""
    calls: dict[str, int] = {}
    clock = FakeClock()
    app = build(calls)
    install(app, AsyncMemoryStore(clock=clock), policy=Policy())
    with running_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield App(app, client, clock, calls)


def fresh_key() -> str:
    return str(uuid.uuid4())


def test_route_can_require_a_key(served: App) -> None:
    """A route with idempotency(require_key=True) answers 400 problem+json without a key; others do not."""
    missing = served.post("/payments", None)
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["type"] == "https://idempo.dev/problems/missing-key"
    assert served.post("/orders", None).status_code == 201


def test_route_with_path_parameters_is_matched(served: App) -> None:
    """The middleware finds /items/{item_id} with Starlette's own matcher: its options apply."""
    assert served.post("/items/7", None).status_code == 400
    key = fresh_key()
    first = served.post("/items/7", key)
    assert first.status_code == 201
    assert served.post("/items/7", key).headers["idempotent-replayed"] == "true"
    assert served.calls["items/7"] == 1


def test_route_ttl_overrides_the_default(served: App) -> None:
    """record_ttl=60 on /payments: the key is new after 61 s, while /orders (24 h) still replays."""
    payment, order = fresh_key(), fresh_key()
    served.post("/payments", payment)
    served.post("/orders", order)
    before = (served.calls["payments"], served.calls["orders"])
    served.clock.advance(61)
    again = served.post("/payments", payment)
    assert "idempotent-replayed" not in again.headers
    assert served.post("/orders", order).headers["idempotent-replayed"] == "true"
    assert (served.calls["payments"], served.calls["orders"]) == (before[0] + 1, before[1])


def test_exempt_route_executes_every_time(served: App) -> None:
    """Depends(idempotency_exempt): the same key executes twice, nothing is replayed."""
    key = fresh_key()
    before = served.calls.get("webhooks", 0)
    first = served.post("/webhooks", key)
    second = served.post("/webhooks", key)
    assert first.status_code == second.status_code == 201
    assert "idempotent-replayed" not in second.headers
    assert served.calls["webhooks"] == before + 2


def test_router_options_apply_and_a_route_overrides_them(served: App) -> None:
    """A router's idempotency_exempt covers its routes; a route's own idempotency(...) wins over it."""
    key = fresh_key()
    served.post("/internal/jobs", key)
    assert "idempotent-replayed" not in served.post("/internal/jobs", key).headers
    assert served.post("/internal/charges", None).status_code == 400
    served.post("/internal/charges", key)
    assert served.post("/internal/charges", key).headers["idempotent-replayed"] == "true"


def test_options_work_when_the_middleware_wraps_the_app_from_outside() -> None:
    """IdempotencyMiddleware(app) around a FastAPI app (no scope["app"] yet) still finds the route's options."""
    calls: dict[str, int] = {}
    app = IdempotencyMiddleware(build(calls), AsyncMemoryStore())
    with running_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        missing = client.post("/payments", content=b'{"amount":1}', headers=JSON)
        key = {**JSON, "Idempotency-Key": fresh_key()}
        client.post("/webhooks", content=b'{"amount":1}', headers=key)
        client.post("/webhooks", content=b'{"amount":1}', headers=key)
    assert missing.status_code == 400
    assert calls["webhooks"] == 2


def operation(schema: dict[str, Any], path: str) -> dict[str, Any]:
    result: dict[str, Any] = schema["paths"][path]["post"]
    return result


def key_parameter(op: dict[str, Any]) -> dict[str, Any] | None:
    for parameter in op.get("parameters", []):
        if parameter["in"] == "header" and parameter["name"] == "Idempotency-Key":
            return dict(parameter)
    return None


def test_openapi_documents_the_key_header_and_problem_answers(served: App) -> None:
    """Covered routes show the Idempotency-Key header (required where the route requires it) and 400/409/422."""
    schema = served.client.get("/openapi.json").json()
    problem_ref = {"$ref": "#/components/schemas/IdempotencyProblem"}

    payments = operation(schema, "/payments")
    parameter = key_parameter(payments)
    assert parameter is not None
    assert parameter["required"] is True
    assert parameter["schema"]["type"] == "string"
    for status in ("400", "409", "422"):
        assert payments["responses"][status]["content"]["application/problem+json"]["schema"] == problem_ref
    assert "Retry-After" in payments["responses"]["409"]["headers"]
    # FastAPI's own validation error stays beside the mismatch.
    assert "application/json" in payments["responses"]["422"]["content"]

    orders = operation(schema, "/orders")
    parameter = key_parameter(orders)
    assert parameter is not None
    assert parameter["required"] is False
    assert "409" in orders["responses"]

    assert key_parameter(operation(schema, "/items/{item_id}"))["required"] is True  # type: ignore[index]
    assert key_parameter(operation(schema, "/internal/charges"))["required"] is True  # type: ignore[index]
    for exempt in ("/webhooks", "/internal/jobs"):
        assert key_parameter(operation(schema, exempt)) is None
        assert "409" not in operation(schema, exempt)["responses"]

    problem = schema["components"]["schemas"]["IdempotencyProblem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}


def test_openapi_lists_every_answer_idempo_gives(served: App) -> None:
    """Each answer DESIGN's HTTP table gives on a covered route is in its OpenAPI operation as
    application/problem+json: 400 (missing or malformed key), 409 (in progress), 410 (the first answer not
    kept), 413 (body too large), 422 (key reused) and 503 (store unavailable); 409 and 503 with Retry-After.
    Before, only 400, 409 and 422 were there."""
    problem = {"$ref": "#/components/schemas/IdempotencyProblem"}
    for path in ("/payments", "/orders"):
        responses = operation(served.app.openapi(), path)["responses"]
        for status in ("400", "409", "410", "413", "422", "503"):
            assert responses[status]["content"]["application/problem+json"]["schema"] == problem, (path, status)
        for status in ("409", "503"):
            assert "Retry-After" in responses[status]["headers"], (path, status)


def test_openapi_without_503_under_fail_open() -> None:
    """Under Policy(fail_open=True) a store outage runs the request without idempotency, never a 503: the
    schema does not promise one; the other answers stay."""
    app = build({})
    install(app, AsyncMemoryStore(), policy=Policy(fail_open=True))
    responses = operation(app.openapi(), "/orders")["responses"]
    assert "503" not in responses
    assert {"400", "409", "410", "413", "422"} <= set(responses)


def test_openapi_422_reads_as_one_sentence(served: App) -> None:
    """Where FastAPI documents its own 422 (a request body), the description says which body is which in one
    sentence, instead of "Validation Error Or: The Idempotency-Key ..." (FastAPI's text and ours run together)."""
    answer = operation(served.app.openapi(), "/payments")["responses"]["422"]
    assert answer["description"] == (
        "Validation Error (application/json), or the Idempotency-Key was already used with a different request"
        " (application/problem+json)."
    )


def test_openapi_documented_twice_says_it_once() -> None:
    """``document()`` called after ``install()`` (which documents already) adds nothing twice: the 422 still
    reads as one sentence."""
    app = build({})
    install(app, AsyncMemoryStore())
    document(app)
    answer = operation(app.openapi(), "/payments")["responses"]["422"]
    assert answer["description"].count("Idempotency-Key") == 1, answer["description"]


def test_openapi_is_generated_once_and_cached(served: App) -> None:
    """app.openapi() returns the cached schema: the additions are made once, not on every call."""
    first = served.app.openapi()
    assert served.app.openapi() is first
    assert len([p for p in operation(first, "/orders")["parameters"] if p["name"] == "Idempotency-Key"]) == 1


def test_idempotency_rejects_unknown_policy_arguments() -> None:
    """A misspelt option fails where the route is declared, not on its first request."""
    with pytest.raises(TypeError):
        idempotency(record_tll=60)


def count_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every route-options lookup (Starlette's matcher run by the middleware)."""
    import idempo._http.starlette

    seen: list[str] = []
    match = idempo._http.starlette.match_route

    def counting_match(routes: Any, scope: Any) -> Any:
        seen.append(scope["path"])
        return match(routes, scope)

    monkeypatch.setattr(idempo._http.starlette, "match_route", counting_match)
    return seen


def test_a_get_is_served_without_the_route_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """No route's options and no policy cover GET: a GET skips the lookup; a POST still makes it."""
    calls: dict[str, int] = {}
    app = build(calls)

    @app.get("/items/{item_id}")
    async def read_item(item_id: int) -> dict[str, int]:
        calls["read"] = calls.get("read", 0) + 1
        return {"id": item_id}

    install(app, AsyncMemoryStore())
    lookups = count_lookups(monkeypatch)
    with running_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        got = client.get("/items/7", headers={"Idempotency-Key": fresh_key()})
        assert lookups == []
        missing = client.post("/payments", content=b'{"amount":1}', headers=JSON)
    assert (got.status_code, got.json(), calls["read"]) == (200, {"id": 7}, 1)
    assert missing.status_code == 400
    assert lookups == ["/payments"]


@pytest.mark.parametrize("where", ["app", "mounted app", "included router"])
def test_a_route_added_after_the_first_request_gets_its_options(where: str) -> None:
    """A route added once the app serves, whose options cover a new method (PUT), is found and applied.

    Also inside a mounted app or an included router, whose route lists the
    top-level list does not show growing.
    """
    calls: dict[str, int] = {}
    app = build(calls)
    sub, router = FastAPI(), APIRouter()
    app.mount("/sub", sub)
    app.include_router(router, prefix="/r")
    install(app, AsyncMemoryStore())
    target: Any = {"app": app, "mounted app": sub, "included router": router}[where]
    path = {"app": "/late", "mounted app": "/sub/late", "included router": "/r/late"}[where]
    with running_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/payments", content=b'{"amount":1}', headers=JSON).status_code == 400

        @target.put("/late", dependencies=[Depends(idempotency(methods={"PUT"}, require_key=True))])
        async def late() -> dict[str, int]:
            calls["late"] = calls.get("late", 0) + 1
            return {"n": calls["late"]}

        missing = client.put(path)
        key = {"Idempotency-Key": fresh_key()}
        first, second = client.put(path, headers=key), client.put(path, headers=key)
    assert missing.status_code == 400
    assert first.json() == second.json() == {"n": 1}
    assert second.headers["idempotent-replayed"] == "true"
    assert calls["late"] == 1


def test_an_option_exempts_a_method_only_a_path_pattern_covers() -> None:
    """routes={"/admin/*": DELETE}: an exempt route there runs every DELETE; a plain one replays."""
    calls: dict[str, int] = {}
    app = FastAPI()

    @app.delete("/admin/cache", dependencies=[Depends(idempotency_exempt)])
    async def purge() -> dict[str, int]:
        calls["purge"] = calls.get("purge", 0) + 1
        return {"n": calls["purge"]}

    @app.delete("/admin/users")
    async def remove() -> dict[str, int]:
        calls["remove"] = calls.get("remove", 0) + 1
        return {"n": calls["remove"]}

    install(app, AsyncMemoryStore(), routes={"/admin/*": Policy(methods={"DELETE"})})
    with running_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        key = {"Idempotency-Key": fresh_key()}
        purged = [client.delete("/admin/cache", headers=key) for _ in range(2)]
        removed = [client.delete("/admin/users", headers=key) for _ in range(2)]
    assert "idempotent-replayed" not in purged[1].headers
    assert removed[1].headers["idempotent-replayed"] == "true"
    assert calls == {"purge": 2, "remove": 1}
