"""Django specifics (idempo.django): settings, per-view decorators resolved in process_view, the user principal."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponse
from django.urls import path
from django.utils.decorators import method_decorator
from django.views import View

from idempo import Policy
from idempo.django import IdempotencyMiddleware, idempotency, idempotency_exempt, idempotency_required
from idempo.stores import MemoryStore
from tests.adapters.conftest import JSON, B
from tests.support.clock import FakeClock
from tests.support.orders import configure_django, django_handler
from tests.support.servers import running_wsgi

CALLS: dict[str, int] = {}


def counted(name: str) -> HttpResponse:
    CALLS[name] = CALLS.get(name, 0) + 1
    return HttpResponse(b'{"n":%d}' % CALLS[name], status=201, content_type="application/json")


@idempotency_required(record_ttl=60)
def pay(request: Any) -> HttpResponse:
    return counted("pay")


@idempotency_exempt
def webhook(request: Any) -> HttpResponse:
    return counted("webhook")


def order(request: Any) -> HttpResponse:
    return counted("order")


@idempotency(methods=["POST", "PUT"])
def put_too(request: Any) -> HttpResponse:
    return counted("put_too")


@method_decorator(idempotency_required, name="dispatch")
class ChargeView(View):
    def post(self, request: Any) -> HttpResponse:
        return counted("charge")


def fake_auth(get_response: Any) -> Any:
    """Stands in for AuthenticationMiddleware: ``X-User: name`` makes an authenticated user."""

    def middleware(request: Any) -> Any:
        name = request.headers.get("X-User")
        request.user = SimpleNamespace(is_authenticated=bool(name), pk=name)
        return get_response(request)

    return middleware


PATTERNS = [
    path("pay", pay),
    path("webhooks/in", webhook),
    path("orders", order),
    path("put-too", put_too),
    path("charges", ChargeView.as_view()),
]


class Client:
    def __init__(self, client: httpx.Client, clock: FakeClock) -> None:
        self.client = client
        self.clock = clock

    def send(self, where: str, key: str | None, method: str = "POST", **headers: str) -> httpx.Response:
        all_headers = {**JSON, **headers}
        if key is not None:
            all_headers["Idempotency-Key"] = key
        return self.client.request(method, where, content=B, headers=all_headers)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """The decorated views behind idempo under waitress; ROUTES require a key on /webhooks/* and exempt /pay."""
    clock = FakeClock()
    idempo = {
        "STORE": MemoryStore(clock=clock),
        "POLICY": {"lease_ttl": 30},
        "ROUTES": {"/webhooks/*": {"require_key": True}, "/pay": None},
    }
    handler = django_handler(
        PATTERNS, idempo, middleware=["tests.adapters.test_django.fake_auth", "idempo.django.IdempotencyMiddleware"]
    )
    with running_wsgi(handler) as url, httpx.Client(base_url=url, timeout=10) as http:
        yield Client(http, clock)


def fresh() -> str:
    return str(uuid.uuid4())


def test_required_view_needs_a_key_even_where_routes_exempt_its_path(client: Client) -> None:
    """@idempotency_required is resolved per view in process_view: it wins over ROUTES exempting /pay."""
    missing = client.send("/pay", None)
    assert missing.status_code == 400
    assert missing.json()["type"] == "https://idempo.dev/problems/missing-key"
    key = fresh()
    client.send("/pay", key)
    assert client.send("/pay", key).headers["idempotent-replayed"] == "true"


def test_exempt_view_wins_over_a_path_pattern(client: Client) -> None:
    """@idempotency_exempt on the view beats ROUTES requiring a key on /webhooks/*: same key runs twice."""
    key = fresh()
    before = CALLS.get("webhook", 0)
    assert client.send("/webhooks/in", None).status_code == 201
    client.send("/webhooks/in", key)
    assert "idempotent-replayed" not in client.send("/webhooks/in", key).headers
    assert CALLS["webhook"] == before + 3


def test_view_ttl_overrides_the_default(client: Client) -> None:
    """record_ttl=60 on the view: the key is new after 61 s, while the default (24 h) view still replays."""
    pay_key, order_key = fresh(), fresh()
    client.send("/pay", pay_key)
    client.send("/orders", order_key)
    client.clock.advance(61)
    assert "idempotent-replayed" not in client.send("/pay", pay_key).headers
    assert client.send("/orders", order_key).headers["idempotent-replayed"] == "true"


def test_view_options_can_change_the_methods(client: Client) -> None:
    """@idempotency(methods=[...]) makes PUT idempotent on that view only."""
    key = fresh()
    client.send("/put-too", key, method="PUT")
    assert client.send("/put-too", key, method="PUT").headers["idempotent-replayed"] == "true"


def test_class_based_view_decorated_on_dispatch(client: Client) -> None:
    """method_decorator(idempotency_required, name="dispatch") on a class-based view is honoured."""
    assert client.send("/charges", None).status_code == 400
    key = fresh()
    client.send("/charges", key)
    assert client.send("/charges", key).headers["idempotent-replayed"] == "true"


def test_authenticated_user_is_the_principal(client: Client) -> None:
    """B11 on Django: the default principal is request.user; two users with one key never share a record."""
    key = fresh()
    alice = client.send("/orders", key, **{"X-User": "alice"})
    bob = client.send("/orders", key, **{"X-User": "bob"})
    assert alice.content != bob.content
    assert "idempotent-replayed" not in bob.headers
    # Alice again, now with an Authorization header: still Alice's record.
    again = client.send("/orders", key, **{"X-User": "alice", "Authorization": "Bearer other"})
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == alice.content


def build(idempo: Any) -> IdempotencyMiddleware:
    configure_django()
    from django.test import override_settings

    with override_settings(IDEMPO=idempo):
        return IdempotencyMiddleware(lambda request: HttpResponse())


def test_settings_are_validated_at_startup() -> None:
    """A missing STORE, an unknown key or a bad POLICY is ImproperlyConfigured when the middleware is built."""
    for bad in [
        None,
        {},
        {"STORE": "memory://", "POLICEY": {}},
        {"STORE": "nope://"},
        {"STORE": "memory://", "POLICY": 3},
    ]:
        with pytest.raises(ImproperlyConfigured):
            build(bad)
    with pytest.raises(ImproperlyConfigured):
        build({"STORE": "memory://", "POLICY": {"record_ttl": 0}})


def test_settings_accept_urls_dicts_and_dotted_paths() -> None:
    """STORE as a URL, POLICY and ROUTES as dicts of Policy arguments, PRINCIPAL as a dotted path."""
    middleware = build(
        {
            "STORE": "memory://",
            "POLICY": {"record_ttl": 60},
            "ROUTES": {"/payments*": {"require_key": True}, "/health": None},
            "PRINCIPAL": "tests.adapters.test_django.fake_principal",
            "KEY_HEADER": "X-Idempotency-Key",
        }
    )
    assert isinstance(middleware.store, MemoryStore)
    assert middleware.policy == Policy(record_ttl=60)
    assert middleware.policy_for_view("/payments/1", order) == Policy(require_key=True)
    assert middleware.policy_for_view("/health", order) is None
    assert middleware.principal is fake_principal
    assert middleware.key_header == "X-Idempotency-Key"


def fake_principal(request: Any) -> str:
    return "tenant:1"
