"""A process that holds a result through a store outage longer than its lease saves it, on PostgreSQL and Redis.

Issue 10 item 1, with the outage outlasting the lease: the handler's result is
held by its process (the save failed; the keeper renews and retries), the
store is unreachable for three leases (a relay of the test's own refuses, the
shared servers are never stopped), and meanwhile an operator's
``purge_expired`` runs on a connection of its own. Once the relay heals,
nobody having taken the lease over, the holder's same-token renewal and save
land, and a retry replays that result: the handler is never run again. Before,
purge deleted the expired in-progress record during the outage, the holder's
save was refused (lease lost) and the retry executed a second time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from tests.support.clock import eventually
from tests.support.relay import Relay

from idempo import Existing, StoredResponse
from idempo._core.flow import Complete
from idempo._core.records import Acquired, RecordState
from idempo._engine.lease import LeaseKeeper
from idempo.stores.postgres import PostgresStore
from idempo.stores.redis import RedisStore

LEASE_MS = 400
ANSWER = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"order_id":1}')


@pytest.fixture(
    params=[pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("redis", marks=pytest.mark.redis)]
)
def stores(request: pytest.FixtureRequest) -> Iterator[tuple[Relay, object, object]]:
    """(relay, the application's store through the relay, the operator's store on a connection of its own)."""
    url = request.getfixturevalue(f"{request.param}_store_url")
    parts = urlsplit(url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 0)
    through = relay.url_for(url)
    if request.param == "postgres":
        app, operator = PostgresStore(through, deadline=0.5, min_size=1, max_size=2), PostgresStore(url)
    else:
        app, operator = RedisStore(through, deadline=0.5), RedisStore(url)
    try:
        yield relay, app, operator
    finally:
        relay.close()
        app.close()
        operator.close()


def test_the_holder_saves_after_an_outage_longer_than_its_lease(stores: tuple[Relay, object, object]) -> None:
    """Outage of three leases, a purge during it: the held result lands under its token and replays."""
    relay, app, operator = stores
    key = f"held-{uuid.uuid4().hex}"
    acquired = app.begin(key, "fp", LEASE_MS)  # type: ignore[attr-defined]
    assert isinstance(acquired, Acquired)
    keeper = LeaseKeeper(app, key, acquired.token, LEASE_MS)  # type: ignore[arg-type]
    if isinstance(operator, RedisStore):
        # The hash outlives the lease by the grace (24 h), not the 60 s it had.
        assert operator.client.pttl(operator._codec.key(key)) > 3_600_000
    relay.refuse()
    saved = keeper.save(Complete(key, acquired.token, ANSWER, 60_000), None, 60.0)
    assert saved is False  # held: retried in the background
    time.sleep(3 * LEASE_MS / 1000)
    operator.purge_expired()  # type: ignore[attr-defined]
    relay.heal()

    def landed() -> bool:
        record = operator.get(key)  # type: ignore[attr-defined]
        return record is not None and record.state is RecordState.COMPLETED

    assert eventually(landed, timeout=30)
    record = operator.get(key)  # type: ignore[attr-defined]
    assert record.token == acquired.token
    assert record.response == ANSWER
    retry = operator.begin(key, "fp", LEASE_MS)  # type: ignore[attr-defined]
    assert isinstance(retry, Existing)
    assert retry.record.response == ANSWER
