"""Limits, alerts, a customer's limit status and the event streams over HTTP, against a
live server: answers compared with the engine's own calls; streams read from a raw
socket, ended by the client and by the server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import trio

from engine import Engine, Event, Limit, Meter, Query
from engine.auth import parse_keys
from engine.http import HttpServer
from tests.http_support import NOW, http, open_http, url

KEYS = parse_keys({"keys": [
    {"key": "admin-key", "scopes": ["admin", "query"]},
    {"key": "reader-key", "scopes": ["query"]},
    {"key": "acme-key", "scopes": ["query"], "customer_id": "acme"},
]})
ADMIN = {"X-API-KEY": "admin-key"}


@pytest.fixture
async def metered(engine: Engine) -> Engine:
    await engine.define_meter(Meter(name="api_calls"))
    return engine


def event(customer: str, value: Any, unique_id: str) -> Event:
    return Event(meter_api_name="api_calls", customer_id=customer, meter_value=value,
                 meter_time_in_millis=NOW, unique_id=unique_id)


async def test_limits_are_the_engines_with_exact_thresholds(metered: Engine) -> None:
    async with open_http(metered) as server:
        posted = await http("POST", url(server, "/limits/"), data=(  # raw: no float on the way
            '{"id": "daily", "meterApiName": "api_calls", "period": "DAY", '
            '"timezone": "Europe/Berlin", "thresholds": [0.1, 100000000000000000000.5, 3]}'))
        assert posted.status_code == 200, posted.text
        assert '"thresholds":[0.1,100000000000000000000.5,3]' in posted.text
        assert metered.limits()[0].thresholds == [Decimal("0.1"),
                                                  Decimal("100000000000000000000.5"), 3]
        assert metered.limits()[0].period == "day"
        listed = await http("GET", url(server, "/limits"))
        assert listed.json() == [posted.json()]
        for bad in ({"id": "x", "meterApiName": "api_calls", "thresholds": [1], "period": "year"},
                    {"id": "x", "meterApiName": "nope", "thresholds": [1]},
                    {"id": "x", "meterApiName": "api_calls", "thresholds": ["one"]},
                    {"id": "x", "meterApiName": "api_calls", "thresholds": [1],
                     "timezone": "Mars/Base"}):
            refused = await http("POST", url(server, "/limits"), json=bad)
            assert refused.status_code == 400, (bad, refused.text)
        deleted = await http("DELETE", url(server, "/limits/daily"))
        assert deleted.status_code == 200 and deleted.json()["id"] == "daily"
        assert metered.limits() == []
        gone = await http("DELETE", url(server, "/limits/daily"))
        assert gone.status_code == 404 and gone.json()["code"] == "unknown_limit"


async def test_alerts_by_page_and_customer_bound_keys(metered: Engine) -> None:
    await metered.add_limit(Limit(id="per-customer", meter_api_name="api_calls",
                                  thresholds=[1, 2, 3]))
    await metered.ingest([event("acme", 3, "a"), event("beta", 2, "b")])
    assert metered.next_alert_seq() == 5
    async with open_http(metered, keys=KEYS) as server:
        everything = await http("GET", url(server, "/alerts"), headers=ADMIN)
        assert everything.status_code == 200
        page = everything.json()
        assert [a["seq"] for a in page["alerts"]] == [0, 1, 2, 3, 4] and page["nextSeq"] == 5
        assert {(a["customerId"], a["threshold"]) for a in page["alerts"]} == {
            ("acme", 1), ("acme", 2), ("acme", 3), ("beta", 1), ("beta", 2)}
        second = (await http("GET", url(server, "/alerts?fromSeq=1&limit=2"),
                             headers=ADMIN)).json()
        assert [a["seq"] for a in second["alerts"]] == [1, 2] and second["nextSeq"] == 3
        beyond = (await http("GET", url(server, "/alerts?fromSeq=99"), headers=ADMIN)).json()
        assert beyond == {"alerts": [], "nextSeq": 99}
        acme = (await http("GET", url(server, "/alerts"),
                           headers={"X-API-KEY": "acme-key"})).json()
        assert {a["customerId"] for a in acme["alerts"]} == {"acme"}
        assert len(acme["alerts"]) == 3 and acme["nextSeq"] == 5
        for bad in ("fromSeq=-1", "fromSeq=x", "limit=0", "limit=100000"):
            refused = await http("GET", url(server, f"/alerts?{bad}"), headers=ADMIN)
            assert refused.status_code == 400, bad
        mine = await http("GET", url(server, "/limits"), headers={"X-API-KEY": "acme-key"})
        assert [limit["id"] for limit in mine.json()] == ["per-customer"]
        assert (await http("POST", url(server, "/limits"), headers={"X-API-KEY": "reader-key"},
                           json={})).status_code == 403


async def test_a_customers_limits_show_period_usage_and_thresholds(metered: Engine) -> None:
    await metered.add_limit(Limit(id="berlin-day", meter_api_name="api_calls",
                                  thresholds=[2, Decimal("2.5"), 10], timezone="Europe/Berlin"))
    await metered.add_limit(Limit(id="beta-only", meter_api_name="api_calls", thresholds=[1],
                                  customer_id="beta", period="total"))
    await metered.ingest([event("acme", Decimal("2.5"), "a1"), event("beta", 1, "b1")])
    async with open_http(metered, keys=KEYS) as server:
        answer = await http("GET", url(server, "/api/customers/acme/limits"),
                            headers={"X-API-KEY": "acme-key"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["customerId"] == "acme" and body["atMs"] == NOW
        (status,) = body["limits"]  # beta-only does not apply to acme
        berlin = ZoneInfo("Europe/Berlin")
        day = datetime.fromtimestamp(NOW / 1000, berlin).replace(hour=0, minute=0, second=0,
                                                                 microsecond=0)
        assert status["periodStartMs"] == int(day.timestamp() * 1000)
        assert status["periodEndMs"] - status["periodStartMs"] in (
            23 * 3_600_000, 24 * 3_600_000, 25 * 3_600_000)
        expected = await metered.query(Query(
            meter_api_name="api_calls", start_ms=status["periodStartMs"],
            end_ms=status["periodEndMs"], timezone="Europe/Berlin",
            filter={"customer_id": ["acme"]}))
        assert Decimal(str(status["usage"])) == expected.rows[0].value == Decimal("2.5")
        assert status["thresholds"] == [2, 2.5, 10] and status["reached"] == [2, 2.5]
        beta = (await http("GET", url(server, "/api/customers/beta/limits"),
                           headers={"X-API-KEY": "reader-key"})).json()
        assert [(s["limit"]["id"], s["usage"], s["reached"]) for s in beta["limits"]] == [
            ("berlin-day", 1, []), ("beta-only", 1, [1])]
        assert beta["limits"][1]["periodStartMs"] == 0
        forbidden = await http("GET", url(server, "/api/customers/beta/limits"),
                               headers={"X-API-KEY": "acme-key"})
        assert forbidden.status_code == 403


# ------------------------------------------------------------------ streams


class SseReader:
    """A raw HTTP/1.1 stream on a socket: the head, then the body as it comes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = b""

    async def read_until(self, needle: bytes) -> bytes:
        with trio.fail_after(15):
            while needle not in self.received:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(f"stream ended before {needle!r}: {self.received!r}")
                self.received += chunk
        return self.received

    async def read_until_event(self, predicate: Any) -> None:
        with trio.fail_after(15):
            while not any(predicate(e) for e in self.events()):
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(f"stream ended: {self.received!r}")
                self.received += chunk

    async def read_to_end(self) -> bytes:
        with trio.fail_after(15):
            while chunk := await self.stream.receive_some(65536):
                self.received += chunk
        return self.received

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line[len(b"data: "):]) for line in self.received.split(b"\n")
                if line.startswith(b"data: ")]


@asynccontextmanager
async def open_stream(server: HttpServer, path: str, **headers: str
                      ) -> AsyncIterator[SseReader]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port or 0)
    lines = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: test\r\n{lines}\r\n".encode())
    async with stream:
        yield SseReader(stream)


async def wait_for(condition: Any) -> None:
    with trio.fail_after(15):
        while not condition():
            await trio.sleep(0.01)


async def test_alert_stream_resumes_by_last_event_id_and_keeps_alive(metered: Engine) -> None:
    await metered.add_limit(Limit(id="calls", meter_api_name="api_calls",
                                  thresholds=[1, 2, 3, 4]))
    await metered.ingest([event("acme", 2, "a1")])  # alerts 0 and 1
    async with open_http(metered) as server:
        server.app.streams = replace(server.app.streams, keep_alive_s=0.2)
        async with open_stream(server, "/alerts/stream?fromSeq=0") as reader:
            head = await reader.read_until(b"id: 1\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert b"content-type: text/event-stream" in head.lower()
            await metered.ingest([event("acme", 1, "a2")])  # alert 2, live
            await reader.read_until(b"id: 2\n")
            assert [e["seq"] for e in reader.events()] == [0, 1, 2]
            assert reader.events()[2]["threshold"] == 3
            await reader.read_until(b": keep-alive\n\n")
        await wait_for(lambda: server.app.open_streams == 0)  # the client left: it ended
        async with open_stream(server, "/alerts/stream?fromSeq=0", last_event_id="1") as reader:
            await reader.read_until(b"id: 2\n")
            assert [e["seq"] for e in reader.events()] == [2]
        async with open_stream(server, "/alerts/stream") as reader:  # from the next alert
            await reader.read_until(b": alerts from seq 3")
            await metered.ingest([event("acme", 1, "a3")])
            await reader.read_until(b"id: 3\n")
            assert [e["seq"] for e in reader.events()] == [3]
        head = await http("HEAD", url(server, "/alerts/stream"))  # answered, not streamed
        assert head.status_code == 200 and head.headers["content-type"].startswith(
            "text/event-stream")
        refused = await http("GET", url(server, "/alerts/stream"),
                             headers={"Last-Event-ID": "x"})
        assert refused.status_code == 400


async def test_streams_end_promptly_when_the_server_shuts_down(metered: Engine) -> None:
    # A drain longer than the wait below (and within open_http's own 30 s bound, which
    # the drain's deadline must undercut to be seen): the streams must not hold it.
    async with open_http(metered, drain_timeout_s=25) as server:
        async with open_stream(server, "/alerts/stream") as alerts, open_stream(
                server, "/api/stats/stream") as stats:
            await alerts.read_until(b": alerts from seq")
            await stats.read_until(b": engine statistics")
            await wait_for(lambda: server.app.open_streams == 2)
            with trio.fail_after(15):
                server.shutdown()
                assert (await alerts.read_to_end()).endswith(b"0\r\n\r\n")  # chunked end
                assert (await stats.read_to_end()).endswith(b"0\r\n\r\n")
    assert server.app.open_streams == 0


async def test_stats_stream_reports_the_ingest_rate(metered: Engine) -> None:
    async with open_http(metered) as server:
        server.app.streams = replace(server.app.streams, stats_interval_s=0.05)
        async with open_stream(server, "/api/stats/stream/") as reader:
            await reader.read_until(b"event: stats")
            await metered.ingest([event("acme", 1, f"s{n}") for n in range(7)])
            await reader.read_until_event(lambda e: e["eventsAccepted"] == 7)
            events = reader.events()
            assert all(e["eventsPerSecond"] >= 0 for e in events)
            assert any(e["eventsPerSecond"] > 0 for e in events)
            assert events[-1]["batches"] == 1 and events[-1]["atMs"] == NOW


async def test_stream_tokens_are_bound_short_lived_and_only_for_streams(
        metered: Engine) -> None:
    clock = [NOW]
    await metered.add_limit(Limit(id="calls", meter_api_name="api_calls", thresholds=[1, 5]))
    await metered.ingest([event("acme", 1, "a")])  # alert 0
    await metered.ingest([event("beta", 1, "b")])  # alert 1
    async with open_http(metered, keys=KEYS, clock_ms=lambda: clock[0]) as server:
        assert (await http("POST", url(server, "/api/stream-token"))).status_code == 401
        issued = await http("POST", url(server, "/api/stream-token"),
                            headers={"X-API-KEY": "acme-key"})
        assert issued.status_code == 200
        token = issued.json()["token"]
        assert issued.json()["expiresAtMs"] == NOW + server.app.streams.token_ttl_ms
        async with open_stream(server, f"/alerts/stream?fromSeq=0&token={token}") as reader:
            await reader.read_until(b"id: 0\n")
            await metered.ingest([event("beta", 5, "b2")])
            await metered.ingest([event("acme", 5, "a2")])
            await reader.read_until(b"id: 3\n")  # alert 2 is beta's: not shown
            assert [(e["seq"], e["customerId"]) for e in reader.events()] == [
                (0, "acme"), (3, "acme")]
        stats = await http("GET", url(server, f"/api/stats/stream?token={token}"))
        assert stats.status_code == 403  # the token has the key's scopes: no admin
        assert (await http("GET", url(server, f"/limits?token={token}"))).status_code == 401
        forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        assert (await http("GET", url(server, f"/alerts/stream?token={forged}"))
                ).status_code == 401
        clock[0] += server.app.streams.token_ttl_ms
        expired = await http("GET", url(server, f"/alerts/stream?token={token}"))
        assert expired.status_code == 401
