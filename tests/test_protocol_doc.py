"""docs/protocol.md is enough to write a client, and it does not rot.

The conversation tests below are a client written from docs/protocol.md alone,
the way a Go, Java or JS team would write one: a TCP socket, ``struct`` for
the 4-byte big-endian length prefix, and ``msgspec.msgpack`` on plain dicts
(no engine structs, no ``engine.client``). The engine and server run in
process on a loopback port.

The doc tests check that the hex dumps in docs/protocol.md are the bytes
msgspec and the server produce today, and that every message type, field,
and error code of the implementation is documented.
"""

from __future__ import annotations

import json
import re
import struct
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import trio

from engine import open_engine
from engine.auth import parse_keys
from engine.server import MeterServer, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "protocol.md"

NOW = 1_790_000_000_000  # the engine's (fixed) clock
HOUR = 3_600_000
T0 = NOW - NOW % HOUR  # 1_789_999_200_000: the hour holding NOW, on whole minutes
DAY0 = NOW - NOW % 86_400_000  # 1_789_948_800_000: the UTC day holding NOW
TIMEOUT_S = 10
HEADER = struct.Struct(">I")  # docs/protocol.md section 2: uint32, big-endian


# ------------------------------------------------- a client from the doc alone


def frame(message: dict[str, Any]) -> bytes:
    payload = msgspec.msgpack.encode(message)
    return HEADER.pack(len(payload)) + payload


class WireClient:
    """Length-prefixed msgpack maps over a byte stream (docs/protocol.md 2-3)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, *messages: dict[str, Any]) -> None:
        await self.send_raw(b"".join(frame(m) for m in messages))

    async def send_raw(self, data: bytes) -> None:
        with trio.fail_after(TIMEOUT_S):
            await self.stream.send_all(data)

    async def _exactly(self, count: int) -> bytes | None:
        while len(self.buffer) < count:
            with trio.fail_after(TIMEOUT_S):
                data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        chunk = bytes(self.buffer[:count])
        del self.buffer[:count]
        return chunk

    async def receive_frame(self) -> bytes | None:
        """One whole frame (header included), or ``None`` at a clean end of stream."""
        header = await self._exactly(HEADER.size)
        if header is None:
            return None
        (length,) = HEADER.unpack(header)
        payload = await self._exactly(length)
        assert payload is not None, "connection closed in the middle of a frame"
        return header + payload

    async def receive(self) -> dict[str, Any] | None:
        raw = await self.receive_frame()
        if raw is None:
            return None
        message = msgspec.msgpack.decode(raw[HEADER.size:])
        assert isinstance(message, dict) and "type" in message
        return message

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(message)
        reply = await self.receive()
        assert reply is not None, f"connection closed instead of answering {message['type']}"
        return reply

    async def handshake(self, **fields: Any) -> dict[str, Any]:
        return await self.request({"type": "hello", "version": 1, **fields})

    async def assert_closed(self) -> None:
        assert await self.receive() is None


@asynccontextmanager
async def running_server(tmp_path: Path, **config: Any) -> AsyncIterator[int]:
    """An engine with a fixed clock and a server on 127.0.0.1; yields the port."""
    async with open_engine(tmp_path / "data", shards=4, clock_ms=lambda: NOW) as eng:
        server = MeterServer(eng, ServerConfig(port=0, **config))
        stopped = trio.Event()

        async def serve(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await server.serve(task_status=task_status)
            finally:
                stopped.set()

        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve)
            try:
                yield port
            finally:
                # Let serve() return by itself (it closes its listeners only then), even
                # when the test body failed, so a failure is not buried in ResourceWarnings.
                server.shutdown()
                with trio.CancelScope(shield=True), trio.move_on_after(TIMEOUT_S):
                    await stopped.wait()


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[WireClient]:
    with trio.fail_after(TIMEOUT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield WireClient(stream)


def event(value: Any, unique_id: str | None, *, customer: str = "acme", minute: int = 1,
          region: str = "eu", meter: str = "gb_transferred") -> dict[str, Any]:
    message: dict[str, Any] = {
        "meterApiName": meter, "customerId": customer, "meterValue": value,
        "meterTimeInMillis": T0 + minute * 60_000, "dimensions": {"region": region},
    }
    if unique_id is not None:
        message["uniqueId"] = unique_id
    return message


def hour_query(request_id: int, **fields: Any) -> dict[str, Any]:
    query = {"meterApiName": "gb_transferred", "startMs": T0, "endMs": T0 + HOUR, **fields}
    return {"type": "query", "id": request_id, "query": query}


def alert(seq: int, limit_id: str, customer: str, threshold: Any, value: Any, *,
          period_start: int = DAY0) -> dict[str, Any]:
    """An alert as it travels (docs/protocol.md 8.8): every field present."""
    return {"seq": seq, "limitId": limit_id, "customerId": customer,
            "meterApiName": "gb_transferred", "threshold": threshold, "value": value,
            "periodStartMs": period_start, "crossedAtMs": NOW}


async def collect(client: WireClient, reply_ids: set[int], alert_count: int,
                  subscription: int) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Read until the replies to ``reply_ids`` and ``alert_count`` pushed alerts arrived.

    Pushes carry ``subscription``, not ``id``, and arrive in any order relative to
    replies, even before the ``subscribed`` reply (docs/protocol.md 9.1).
    """
    replies: dict[int, dict[str, Any]] = {}
    pushed: list[dict[str, Any]] = []
    while set(replies) != reply_ids or len(pushed) < alert_count:
        message = await client.receive()
        assert message is not None, "connection closed"
        if message["type"] == "alerts":
            assert "id" not in message and message["subscription"] == subscription, message
            assert message["alerts"], "a push carries at least one alert"
            pushed.extend(message["alerts"])
        else:
            assert message.get("id") in reply_ids - set(replies), message
            replies[message["id"]] = message
    assert len(pushed) == alert_count, pushed
    return replies, pushed


# ----------------------------------------------------------------- conversations


async def test_handshake(tmp_path: Path) -> None:
    async with running_server(tmp_path) as port:
        async with connect(port) as client:
            await client.send({"type": "hello", "version": 1, "client": "doc-test/1"})
            raw = await client.receive_frame()
            assert raw is not None
            # The server's real welcome is byte for byte the dump in the doc.
            assert raw == doc_frames()["welcome"][1]
            assert msgspec.msgpack.decode(raw[4:]) == {
                "type": "welcome", "version": 1, "server": "metering-engine",
                "maxFrameBytes": 16 * 1024 * 1024, "maxInFlight": 16,
            }
            assert await client.request({"type": "ping", "id": 0}) == {"type": "pong", "id": 0}
            # A second hello: bad_message without id, and the connection stays open.
            again = await client.handshake()
            assert again["type"] == "error" and again["code"] == "bad_message"
            assert "id" not in again
            assert await client.request({"type": "ping", "id": 1}) == {"type": "pong", "id": 1}

        async with connect(port) as client:
            reply = await client.handshake(version=2)
            assert reply["type"] == "error" and reply["code"] == "unsupported_version"
            assert "id" not in reply
            await client.assert_closed()

        async with connect(port) as client:  # the first frame must be hello
            reply = await client.request({"type": "ping", "id": 7})
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "protocol_error", 7)
            await client.assert_closed()


async def test_define_ingest_query(tmp_path: Path) -> None:
    async with running_server(tmp_path) as port, connect(port) as client:
        assert (await client.handshake())["type"] == "welcome"

        reply = await client.request({"type": "define_meter", "id": 1,
                                      "meter": {"name": "gb_transferred", "aggregation": "sum"}})
        # Defaults are omitted: "sum" is the default aggregation.
        assert reply == {"type": "meter", "id": 1, "meter": {"name": "gb_transferred"}}

        # Two events, the second a retry of the first (same uniqueId); decimal-string value.
        reply = await client.request({"type": "ingest", "id": 2, "events": [
            event("0.1", "u-1"), event("0.1", "u-1"),
        ]})
        assert reply["type"] == "ingest_ack" and reply["id"] == 2
        assert (reply["accepted"], reply["duplicates"]) == (1, 1)
        assert type(reply["lsn"]) is int and reply["lsn"] >= 1
        first_lsn = reply["lsn"]

        reply = await client.request(hour_query(3, window="hour",
                                                groupBy=["customer_id", "region"]))
        assert reply == {"type": "query_result", "id": 3, "result": {
            "meterApiName": "gb_transferred", "aggregation": "sum",
            "startMs": T0, "endMs": T0 + HOUR, "window": "hour", "timezone": "UTC",
            "rows": [{"windowStartMs": T0, "group": {"customer_id": "acme", "region": "eu"},
                      "value": "0.1"}],  # a decimal string decodes as str in plain msgpack
        }}

        # A float input is the decimal of its shortest repr (2.9, so 0.1 + 2.9 is exactly
        # 3.0, still a decimal string); a result of integral inputs travels as an int.
        reply = await client.request({"type": "ingest", "id": 4, "events": [
            event(2.9, "u-2", minute=2), event(7, "u-3", customer="globex", region="us"),
        ]})
        assert (reply["type"], reply["accepted"], reply["duplicates"]) == ("ingest_ack", 2, 0)
        assert reply["lsn"] > first_lsn
        reply = await client.request(hour_query(5, groupBy=["customer_id"]))
        rows = reply["result"]["rows"]
        assert reply["result"]["window"] is None  # nil: one total per group over the range
        assert rows == [
            {"windowStartMs": T0, "group": {"customer_id": "acme"}, "value": "3.0"},
            {"windowStartMs": T0, "group": {"customer_id": "globex"}, "value": 7},
        ]


async def test_pipelined_requests_are_matched_by_id(tmp_path: Path) -> None:
    async with running_server(tmp_path) as port, connect(port) as client:
        assert (await client.handshake())["type"] == "welcome"
        await client.request({"type": "define_meter", "id": 1,
                              "meter": {"name": "gb_transferred"}})
        ack = await client.request({"type": "ingest", "id": 2, "events": [
            event("1.25", "p-1", minute=0), event(2, "p-2", minute=1, region="us"),
        ]})
        assert ack["accepted"] == 2

        # Four requests in one write, before reading any reply.
        await client.send(
            hour_query(101, groupBy=["region"]),
            {"type": "ping", "id": 102},
            {"type": "list_meters", "id": 103},
            hour_query(104, window="minute", groupBy=["region"], take={"limit": 1}),
        )
        replies: dict[int, dict[str, Any]] = {}
        for _ in range(4):
            reply = await client.receive()
            assert reply is not None
            assert reply["id"] not in replies
            replies[reply["id"]] = reply
        assert sorted(replies) == [101, 102, 103, 104]  # arrival order is not specified
        assert replies[101]["type"] == "query_result"
        assert [(r["group"], r["value"]) for r in replies[101]["result"]["rows"]] == [
            ({"region": "eu"}, "1.25"), ({"region": "us"}, 2),
        ]
        assert replies[102] == {"type": "pong", "id": 102}
        assert replies[103] == {"type": "meters", "id": 103,
                                "meters": [{"name": "gb_transferred"}]}
        # take keeps the top group by value over the range (2 > 1.25): region us only.
        assert replies[104]["result"]["rows"] == [
            {"windowStartMs": T0 + 60_000, "group": {"region": "us"}, "value": 2},
        ]


async def test_errors_with_problems_keep_the_connection(tmp_path: Path) -> None:
    async with running_server(tmp_path) as port, connect(port) as client:
        assert (await client.handshake())["type"] == "welcome"
        await client.request({"type": "define_meter", "id": 1,
                              "meter": {"name": "gb_transferred"}})

        good = event("5", "g-1")
        too_old = {**event(1, "g-2"), "meterTimeInMillis": 1}
        not_finite = event("NaN", "g-3")
        reply = await client.request({"type": "ingest", "id": 2,
                                      "events": [good, too_old, not_finite]})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "batch_rejected", 2)
        assert [index for index, _ in reply["problems"]] == [1, 2]
        assert all(type(reason) is str and reason for _, reason in reply["problems"])
        assert "older" in reply["problems"][0][1]
        assert "finite" in reply["problems"][1][1]

        # Nothing of the batch was applied, not even the good event.
        reply = await client.request(hour_query(3))
        assert reply["result"]["rows"] == []
        # ... and its uniqueId was not consumed.
        reply = await client.request({"type": "ingest", "id": 4, "events": [good]})
        assert (reply["accepted"], reply["duplicates"]) == (1, 0)

        # A type error is a bad_message for the whole frame: with the id, without problems.
        reply = await client.request({"type": "ingest", "id": 5, "events": [event(True, "b")]})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "bad_message", 5)
        assert "problems" not in reply
        reply = await client.request({"type": "frobnicate", "id": 6})
        assert (reply["code"], reply["id"]) == ("bad_message", 6)
        reply = await client.request(hour_query(7, window="fortnight"))
        assert (reply["code"], reply["id"]) == ("bad_message", 7)
        reply = await client.request({"type": "query", "id": 8, "query": {
            "meterApiName": "nope", "startMs": T0, "endMs": T0 + HOUR}})
        assert (reply["code"], reply["id"]) == ("unknown_meter", 8)
        reply = await client.request({"type": "define_meter", "id": 9,
                                      "meter": {"name": "gb_transferred", "aggregation": "max"}})
        assert (reply["code"], reply["id"]) == ("meter_conflict", 9)

        assert await client.request({"type": "ping", "id": 10}) == {"type": "pong", "id": 10}


async def test_frame_errors_close_the_connection(tmp_path: Path) -> None:
    async with running_server(tmp_path) as port:
        async with connect(port) as client:
            assert (await client.handshake())["type"] == "welcome"
            await client.send_raw(b"\x00\x00\x00\x00")  # a zero-length frame
            reply = await client.receive()
            assert reply is not None
            assert (reply["type"], reply["code"]) == ("error", "frame_error")
            assert "id" not in reply
            await client.assert_closed()

        async with connect(port) as client:
            welcome = await client.handshake()
            # One byte over the announced maximum: refused from the header alone.
            await client.send_raw(HEADER.pack(welcome["maxFrameBytes"] + 1))
            reply = await client.receive()
            assert reply is not None
            assert (reply["code"], "id" in reply) == ("frame_error", False)
            await client.assert_closed()


async def test_scopes_and_customer_bound_keys(tmp_path: Path) -> None:
    keys = parse_keys({"keys": [
        {"key": "admin-key", "scopes": ["admin", "ingest", "query"]},
        {"key": "acme-key", "scopes": ["ingest", "query"], "customer_id": "acme"},
    ]})
    async with running_server(tmp_path, keys=keys) as port:
        async with connect(port) as client:
            reply = await client.handshake(apiKey="wrong")
            assert (reply["type"], reply["code"], "id" in reply) == ("error", "unauthorized", False)
            await client.assert_closed()

        async with connect(port) as admin:
            assert (await admin.handshake(apiKey="admin-key"))["type"] == "welcome"
            await admin.request({"type": "define_meter", "id": 1,
                                 "meter": {"name": "gb_transferred"}})
            reply = await admin.request({"type": "ingest", "id": 2, "events": [
                event(1, "a-1"), event(10, "o-1", customer="other")]})
            assert reply["accepted"] == 2

        async with connect(port) as acme:
            assert (await acme.handshake(apiKey="acme-key"))["type"] == "welcome"
            reply = await acme.request({"type": "define_meter", "id": 1,
                                        "meter": {"name": "x"}})
            assert (reply["code"], reply["id"]) == ("forbidden", 1)
            reply = await acme.request({"type": "ingest", "id": 2, "events": [
                event(1, "a-2"), event(1, "o-2", customer="other")]})
            assert (reply["code"], reply["id"], "problems" in reply) == ("forbidden", 2, False)
            reply = await acme.request(hour_query(3, groupBy=["customer_id"]))
            assert reply["result"]["rows"] == [
                {"windowStartMs": T0, "group": {"customer_id": "acme"}, "value": 1}]
            reply = await acme.request(hour_query(4, filter={"customer_id": ["other"]}))
            assert (reply["code"], reply["id"]) == ("forbidden", 4)
            assert await acme.request({"type": "ping", "id": 5}) == {"type": "pong", "id": 5}


async def test_limits_and_alert_subscription(tmp_path: Path) -> None:
    async with running_server(tmp_path) as port:
        async with connect(port) as client:
            assert (await client.handshake())["type"] == "welcome"
            await client.request({"type": "define_meter", "id": 1,
                                  "meter": {"name": "gb_transferred"}})
            limit = {"id": "acme-daily", "meterApiName": "gb_transferred",
                     "thresholds": [5, "7.5"], "customerId": "acme"}
            # Defaults (period "day", timezone "UTC", filter {}) are omitted; thresholds
            # come back as sent.
            reply = await client.request({"type": "add_limit", "id": 2, "limit": limit})
            assert reply == {"type": "limit", "id": 2, "limit": limit}

            bad = {"id": "x", "meterApiName": "gb_transferred", "thresholds": [1]}
            reply = await client.request({"type": "add_limit", "id": 3,
                                          "limit": {**bad, "meterApiName": "nope"}})
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "invalid_request", 3)
            reply = await client.request({"type": "add_limit", "id": 4,
                                          "limit": {**bad, "timezone": "Mars/Olympus"}})
            assert (reply["code"], reply["id"]) == ("invalid_request", 4)
            reply = await client.request({"type": "add_limit", "id": 5,
                                          "limit": {**bad, "period": "year"}})
            assert (reply["code"], reply["id"]) == ("bad_message", 5)  # an unknown enum value
            reply = await client.request({"type": "list_limits", "id": 6})
            assert reply == {"type": "limits", "id": 6, "limits": [limit]}

            reply = await client.request({"type": "subscribe", "id": 10, "fromSeq": 0})
            assert reply == {"type": "subscribed", "id": 10, "nextSeq": 0}  # no alert yet
            reply = await client.request({"type": "subscribe", "id": 10})
            assert (reply["code"], reply["id"]) == ("invalid_request", 10)  # already open

            # 4 + 4.5 = 8.5 reaches both thresholds: one alert each, in threshold order.
            await client.send({"type": "ingest", "id": 11, "reportAlerts": True, "events": [
                event(4, "u-1"), event("4.5", "u-2", minute=2)]})
            replies, pushed = await collect(client, {11}, 2, subscription=10)
            ack = replies[11]
            assert (ack["type"], ack["accepted"], ack["duplicates"]) == ("ingest_ack", 2, 0)
            expected = [alert(0, "acme-daily", "acme", 5, "8.5"),
                        alert(1, "acme-daily", "acme", "7.5", "8.5")]
            assert ack["alerts"] == expected
            assert pushed == expected  # the same alerts, same seqs
            last_seen = pushed[-1]["seq"]

            reply = await client.request({"type": "unsubscribe", "id": 12, "subscription": 10})
            assert reply == {"type": "unsubscribed", "id": 12, "subscription": 10}

            # A second limit, over all time and every customer: acme's total 8.5 is below
            # 10, so adding it fires nothing; 2 more cross it (seq 2). Without reportAlerts
            # the ack has no alerts, and the closed subscription gets no push.
            reply = await client.request({"type": "add_limit", "id": 13, "limit": {
                "id": "total-10", "meterApiName": "gb_transferred", "thresholds": [10],
                "period": "total"}})
            assert reply["type"] == "limit"
            reply = await client.request({"type": "ingest", "id": 14,
                                          "events": [event(2, "u-3", minute=3)]})
            assert reply["type"] == "ingest_ack" and "alerts" not in reply
            assert await client.request({"type": "ping", "id": 15}) == {"type": "pong", "id": 15}

        # Resuming on a new connection: from the last seen seq + 1, only what was missed.
        async with connect(port) as client:
            assert (await client.handshake())["type"] == "welcome"
            await client.send({"type": "subscribe", "id": 1, "fromSeq": last_seen + 1})
            replies, pushed = await collect(client, {1}, 1, subscription=1)
            assert replies[1] == {"type": "subscribed", "id": 1, "nextSeq": 3}
            assert pushed == [alert(2, "total-10", "acme", 10, "10.5", period_start=0)]
            reply = await client.request({"type": "unsubscribe", "id": 2, "subscription": 1})
            assert reply == {"type": "unsubscribed", "id": 2, "subscription": 1}


async def test_customer_bound_key_receives_only_its_alerts(tmp_path: Path) -> None:
    keys = parse_keys({"keys": [
        {"key": "admin-key", "scopes": ["admin", "ingest", "query"]},
        {"key": "acme-key", "scopes": ["ingest", "query"], "customer_id": "acme"},
    ]})
    every_customer = {"id": "every-customer", "meterApiName": "gb_transferred",
                      "thresholds": [3, 6]}
    globex_only = {"id": "globex-only", "meterApiName": "gb_transferred", "thresholds": [1],
                   "customerId": "globex"}
    async with running_server(tmp_path, keys=keys) as port, \
            connect(port) as admin, connect(port) as acme:
        assert (await admin.handshake(apiKey="admin-key"))["type"] == "welcome"
        assert (await acme.handshake(apiKey="acme-key"))["type"] == "welcome"
        await admin.request({"type": "define_meter", "id": 1, "meter": {"name": "gb_transferred"}})
        for request_id, limit in ((2, every_customer), (3, globex_only)):
            reply = await admin.request({"type": "add_limit", "id": request_id, "limit": limit})
            assert reply["type"] == "limit"
        reply = await acme.request({"type": "add_limit", "id": 1, "limit": every_customer})
        assert (reply["code"], reply["id"]) == ("forbidden", 1)  # admin scope needed
        # Only limits for every customer or for acme itself.
        reply = await acme.request({"type": "list_limits", "id": 2})
        assert reply == {"type": "limits", "id": 2, "limits": [every_customer]}

        assert (await admin.request({"type": "subscribe", "id": 7}))["type"] == "subscribed"
        assert (await acme.request({"type": "subscribe", "id": 3}))["type"] == "subscribed"

        # globex reaches 3 (every-customer) and 1 (globex-only): seqs 0 and 1; then acme
        # reaches 3: seq 2. The admin key's subscription gets all three.
        await admin.send({"type": "ingest", "id": 4,
                          "events": [event(5, "g-1", customer="globex")]})
        replies, pushed = await collect(admin, {4}, 2, subscription=7)
        assert [a["seq"] for a in pushed] == [0, 1]
        assert sorted((a["limitId"], a["customerId"], a["threshold"]) for a in pushed) == [
            ("every-customer", "globex", 3), ("globex-only", "globex", 1)]
        await admin.send({"type": "ingest", "id": 5, "events": [event(4, "a-1")]})
        replies, pushed = await collect(admin, {5}, 1, subscription=7)
        assert pushed == [alert(2, "every-customer", "acme", 3, 4)]

        # acme's subscription skipped seqs 0 and 1: its first push is seq 2.
        replies, pushed = await collect(acme, set(), 1, subscription=3)
        assert pushed == [alert(2, "every-customer", "acme", 3, 4)]
        # Its own batch, with the alerts in the ack: 4 + 2 reaches 6 (seq 3).
        await acme.send({"type": "ingest", "id": 4, "reportAlerts": True,
                         "events": [event(2, "a-2", minute=2)]})
        replies, pushed = await collect(acme, {4}, 1, subscription=3)
        assert replies[4]["alerts"] == pushed == [alert(3, "every-customer", "acme", 6, 6)]
        # Nothing else is pending for acme: the next frame is the pong.
        assert await acme.request({"type": "ping", "id": 5}) == {"type": "pong", "id": 5}

        # Replaying the stored alerts from 0 gives acme only its own (seqs 2 and 3).
        await acme.send({"type": "subscribe", "id": 6, "fromSeq": 0})
        replies, pushed = await collect(acme, {6}, 2, subscription=6)
        assert replies[6] == {"type": "subscribed", "id": 6, "nextSeq": 4}
        assert [(a["seq"], a["customerId"]) for a in pushed] == [(2, "acme"), (3, "acme")]
        assert await acme.request({"type": "ping", "id": 7}) == {"type": "pong", "id": 7}


# ---------------------------------------------------------- the doc does not rot


HEXDUMP_LINE = re.compile(r"([0-9a-f]{8})  (.{48})  \|(.*)\|")


def parse_hexdump(text: str) -> bytes:
    """The bytes of a ``hexdump -C`` listing, checking offsets, columns and length."""
    lines = text.strip("\n").split("\n")
    data = bytearray()
    for line in lines[:-1]:
        match = HEXDUMP_LINE.fullmatch(line)
        assert match, f"malformed hexdump line: {line!r}"
        offset, hex_part, printable = match.groups()
        assert int(offset, 16) == len(data), line
        chunk = bytes.fromhex(hex_part.replace(" ", ""))
        assert 0 < len(chunk) <= 16 and (len(chunk) == 16 or line is lines[-2]), line
        assert printable == "".join(chr(b) if 32 <= b < 127 else "." for b in chunk), line
        data += chunk
    assert re.fullmatch(r"[0-9a-f]{8}", lines[-1]) and int(lines[-1], 16) == len(data)
    return bytes(data)


def doc_frames() -> dict[str, tuple[dict[str, Any], bytes]]:
    """``name -> (message as shown in JSON, frame bytes from the hex dump)``."""
    pattern = re.compile(
        r"<!-- frame: (\w+) -->\s*```json\n(.*?)\n```\s*```text\n(.*?)\n```", re.S
    )
    frames = {}
    for name, shown, dump in pattern.findall(DOC.read_text()):
        frames[name] = (json.loads(shown), parse_hexdump(dump))
    return frames


def test_doc_hex_dumps_are_what_msgspec_produces() -> None:
    from engine.protocol.messages import (
        decode_client_message,
        decode_server_message,
        encode_message,
    )

    frames = doc_frames()
    assert set(frames) == {"hello", "welcome", "ingest", "ingest_ack", "subscribe", "alerts"}
    for name, (message, dumped) in frames.items():
        payload = msgspec.msgpack.encode(message)
        assert dumped == HEADER.pack(len(payload)) + payload, f"{name}: dump != JSON shown"
        # And the implementation's own structs write exactly these bytes (field order,
        # omitted defaults, integer widths): decode with them, encode again.
        client_side = name in ("hello", "ingest", "subscribe")
        decode = decode_client_message if client_side else decode_server_message
        assert encode_message(decode(payload)) == payload, name


def test_doc_names_every_message_field_and_error_code() -> None:
    from engine.errors import ERRORS_BY_CODE
    from engine.protocol import messages
    from engine.schema import Alert, Event, Limit, Meter, Query, QueryResult, Row, Take

    text = DOC.read_text()
    for union in (messages.ClientMessage, messages.ServerMessage):
        for struct_type in typing.get_args(union):
            info = msgspec.inspect.type_info(struct_type)
            assert isinstance(info, msgspec.inspect.StructType)
            heading = f"#### `{info.tag}`"
            assert heading in text, f"message {info.tag!r} is not documented"
            # "stats" names a request and its reply: a field may be in either section.
            sections = [s.split("####")[0] for s in text.split(heading)[1:]]
            for struct_field in info.fields:
                assert any(f"| `{struct_field.encode_name}` |" in s for s in sections), (
                    f"{info.tag}.{struct_field.encode_name} is not documented"
                )
    for nested in (Meter, Event, Query, Take, QueryResult, Row, Limit, Alert):
        info = msgspec.inspect.type_info(nested)
        assert isinstance(info, msgspec.inspect.StructType)
        sections = [s.split("\n## ")[0] for s in text.split("\n### 8.")[1:]]
        section_text = next(s for s in sections if s.split("\n")[0].endswith(nested.__name__))
        for struct_field in info.fields:
            assert f"| `{struct_field.encode_name}` |" in section_text, (
                f"{nested.__name__}.{struct_field.encode_name} is not documented"
            )

    # Every code the server sends has a class (the server sends ``SomeError.code``, no
    # literals), so the class tree is the list of codes.
    assert {"frame_error", "bad_message", "timeout", "protocol_error", "busy",
            "too_large"} <= set(ERRORS_BY_CODE)
    table = text.split("### 11.2 Error codes")[1].split("\n## ")[0]
    reserved = {"connection_lost", "insecure_bind"}  # never sent by the server
    for code in set(ERRORS_BY_CODE) - reserved:
        assert f"| `{code}` |" in table, f"error code {code!r} is not in the table"
    for code in reserved:
        assert f"`{code}`" in table, f"reserved code {code!r} is not named"
