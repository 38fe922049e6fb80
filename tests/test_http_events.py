"""The raw events over HTTP (``GET /api/events``) and in the blocking client
(``SyncClient.raw_events``), against live servers, compared with ``Engine.raw_events``."""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from engine import Engine, Event, Meter
from engine.auth import parse_keys
from engine.sync_client import SyncClient
from tests.conftest import HOST
from tests.http_support import NOW, http, open_http, url

KEYS = parse_keys({"keys": [
    {"key": "reader-key", "scopes": ["query"]},
    {"key": "ingest-key", "scopes": ["ingest"]},
    {"key": "acme-key", "scopes": ["query"], "customer_id": "acme"},
]})
END_MS = NOW + 60_000


async def load(engine: Engine) -> list[Event]:
    await engine.define_meter(Meter(name="calls"))
    await engine.define_meter(Meter(name="tokens", aggregation="max"))
    events = [Event(meter_api_name="tokens" if i % 3 == 0 else "calls",
                    customer_id=("acme", "beta", "gamma")[i % 3 if i % 2 else 0],
                    meter_value=i, meter_time_in_millis=NOW - 1_000 * (i + 1),
                    dimensions={"region": "eu"} if i % 2 else {},
                    unique_id=f"e-{i}") for i in range(13)]
    for start in range(0, len(events), 4):
        await engine.ingest(events[start:start + 4])
    await engine.ingest(events[:2])  # duplicates: never listed twice
    return events


def wire(events: list[Event]) -> list[Any]:
    return msgspec.json.decode(msgspec.json.encode(events))


async def read_all(server: Any, key: str, **params: Any) -> list[Any]:
    """Every page of /api/events with ``params``, following nextCursor."""
    found: list[Any] = []
    cursor = None
    for _ in range(100):
        query = {"endMs": END_MS, **params, **({} if cursor is None else {"cursor": cursor})}
        response = await http("GET", url(server, "/api/events"), params=query,
                              headers={"X-API-KEY": key})
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["events"]) <= int(params.get("limit", 10_000))
        found.extend(body["events"])
        cursor = body["nextCursor"]
        if cursor is None:
            return found
    raise AssertionError("nextCursor never became null")


async def test_pages_filters_and_customer_bound_keys(engine: Engine) -> None:
    events = await load(engine)
    start_ms = NOW - 100_000
    async with open_http(engine, keys=KEYS) as server:
        everything = await read_all(server, "reader-key", startMs=start_ms, limit=3)
        assert everything == wire(events)  # logged order, duplicates left out
        assert await read_all(server, "reader-key", startMs=start_ms) == wire(events)
        # The range is half-open in event time: [NOW - 5 s, NOW) holds events 0 to 4.
        assert await read_all(server, "reader-key", startMs=NOW - 5_000, endMs=NOW) == wire(
            events[:5])
        tokens = await read_all(server, "reader-key", startMs=start_ms, meterApiName="tokens",
                                limit=2)
        assert tokens == wire([e for e in events if e.meter_api_name == "tokens"])
        beta = await read_all(server, "reader-key", startMs=start_ms, customerId="beta")
        assert beta == wire([e for e in events if e.customer_id == "beta"]) != []
        # A customer-bound key reads its own customer's events, asked for or not.
        acme = wire([e for e in events if e.customer_id == "acme"])
        assert await read_all(server, "acme-key", startMs=start_ms, limit=2) == acme
        assert await read_all(server, "acme-key", startMs=start_ms, customerId="acme") == acme

        async def status(key: str | None, **params: Any) -> tuple[int, str]:
            headers = {} if key is None else {"X-API-KEY": key}
            response = await http("GET", url(server, "/api/events"), params=params,
                                  headers=headers)
            return response.status_code, response.json()["code"]

        assert await status("acme-key", endMs=END_MS, customerId="beta") == (403, "forbidden")
        assert await status("ingest-key", endMs=END_MS) == (403, "forbidden")
        assert (await status(None, endMs=END_MS))[0] == 401
        assert await status("reader-key") == (400, "invalid_query")  # endMs is required
        for cursor in ("12", "a-1", "-1-2", "1-", "1-2-3"):
            assert await status("reader-key", endMs=END_MS, cursor=cursor) == (
                400, "invalid_query"), cursor
        assert await status("reader-key", endMs=END_MS, limit=0) == (400, "invalid_query")
        assert await status("reader-key", endMs=END_MS, meterApiName="nope") == (
            404, "unknown_meter")
        assert (await status("reader-key", startMs=END_MS, endMs=NOW))[0] == 400


async def test_the_sync_client_reads_raw_events_like_the_async_one(
        engine: Engine, serving: Any) -> None:
    events = await load(engine)
    start_ms = NOW - 100_000
    async with serving(engine, keys=KEYS) as server:
        def use() -> tuple[Any, ...]:
            with SyncClient(HOST, server.port, "reader-key") as client:
                first = client.raw_events(start_ms, END_MS, limit=5)
                rest = client.raw_events(start_ms, END_MS, from_lsn=first.next_lsn,
                                         from_index=first.next_index)
                pages = list(client.iter_raw_events(start_ms, END_MS, meter_api_name="calls",
                                                    page_events=3))
            with SyncClient(HOST, server.port, "acme-key") as bound:
                own = [e for page in bound.iter_raw_events(start_ms, END_MS) for e in page]
            return first, rest, pages, own

        first, rest, pages, own = await trio.to_thread.run_sync(use)
    assert len(first.events) == 5 and not first.done
    assert first.events + rest.events == events and rest.done
    assert all(1 <= len(page) <= 3 for page in pages)
    assert [e for page in pages for e in page] == [e for e in events
                                                   if e.meter_api_name == "calls"]
    assert own == [e for e in events if e.customer_id == "acme"]
    expected = await engine.raw_events(start_ms, END_MS, limit=5)
    assert (first.next_lsn, first.next_index) == (expected.next_lsn, expected.next_index)


def test_the_route_pages_by_the_engine_limits() -> None:
    from engine.http import events as route
    from engine.runtime import raw_events

    assert (route.DEFAULT_PAGE_EVENTS, route.MAX_PAGE_EVENTS) == (
        raw_events.DEFAULT_PAGE_EVENTS, raw_events.MAX_PAGE_EVENTS)
