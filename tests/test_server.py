"""The TCP server end to end over loopback: round trips, typed errors, pipelining,
isolation of slow or hostile connections, protocol errors, the batcher, the sync
client and graceful shutdown."""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import socket
import struct
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from engine import (
    BatchRejected,
    Engine,
    Event,
    InvalidQuery,
    InvalidRequest,
    Meter,
    MeterConflict,
    Query,
    Take,
    UnknownMeter,
    open_engine,
)
from engine.client import SyncClient, error_from_reply, open_batcher, open_client
from engine.errors import ERRORS_BY_CODE, ConnectionLost, ProtocolError, ServerBusy
from engine.protocol.framing import HEADER, FrameDecoder, encode_frame
from engine.protocol.messages import (
    PROTOCOL_VERSION,
    ErrorReply,
    Hello,
    Ingest,
    Ping,
    Pong,
    QueryReply,
    QueryRequest,
    Welcome,
    decode_server_message,
    encode_message,
)
from engine.server import MeterServer, ServerConfig
from engine.storage import MemoryStore
from tests.conftest import HOST, NOW, GatedEngine
from tests.helpers.events import DAY, HOUR, event

FAR = Query(meter_api_name="calls", start_ms=NOW - 40 * DAY, end_ms=NOW + DAY)


def query(meter: str = "calls", **fields: Any) -> Query:
    return msgspec.structs.replace(FAR, meter_api_name=meter, **fields)


async def total(eng: Engine, meter: str = "calls", **fields: Any) -> Any:
    result = await eng.query(query(meter, **fields))
    return result.rows[0].value if result.rows else None


async def state(eng: Engine) -> tuple[Any, ...]:
    """Everything a request could change: meters, every series' total, the last lsn."""
    rows = {}
    for meter in eng.meters():
        result = await eng.query(query(meter.name, group_by=["customer_id"]))
        rows[meter.name] = [(row.group, row.value) for row in result.rows]
    return eng.meters(), rows, eng.statistics().last_lsn


def frame(message: msgspec.Struct | dict[str, Any] | list[Any]) -> bytes:
    payload = (encode_message(message) if isinstance(message, msgspec.Struct)
               else msgspec.msgpack.encode(message))
    return encode_frame(payload)


HELLO = frame(Hello(version=PROTOCOL_VERSION, client="raw-test"))


class Raw:
    """A raw connection: send any bytes, read server frames until EOF."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.reset = False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self, timeout: float = 5.0) -> Any:
        """The next server message, or ``None`` once the server closed the connection."""
        with trio.fail_after(timeout):
            while True:
                payload = self.decoder.next_frame()
                if payload is not None:
                    return decode_server_message(payload)
                try:
                    data = await self.stream.receive_some(1 << 16)
                except trio.BrokenResourceError:  # connection reset: closed as well
                    self.reset = True
                    return None
                if not data:
                    return None
                self.decoder.feed(data)

    async def until_closed(self, timeout: float = 5.0, limit: int = 1000) -> list[Any]:
        """Every message until EOF (fails if the server keeps the connection open)."""
        messages = []
        with trio.fail_after(timeout):
            for _ in range(limit):
                message = await self.receive(timeout)
                if message is None:
                    return messages
                messages.append(message)
        raise AssertionError(f"more than {limit} messages and still open")

    async def hello(self) -> Welcome:
        await self.send(HELLO)
        welcome = await self.receive()
        assert isinstance(welcome, Welcome), welcome
        return welcome


@asynccontextmanager
async def raw_connection(port: int, rcvbuf: int | None = None) -> AsyncIterator[Raw]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        with trio.fail_after(5):
            await sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    async with trio.SocketStream(sock) as stream:
        yield Raw(stream)


async def ping_quickly(port: int, within_s: float = 1.0) -> float:
    """A fresh client connects and pings; returns the latency. Fails if slower."""
    started = trio.current_time()
    with trio.fail_after(within_s):
        async with open_client(HOST, port) as client:
            await client.ping()
    return trio.current_time() - started


async def define_standard_meters(define: Callable[[Meter], Any]) -> None:
    await define(Meter(name="calls", aggregation="sum"))
    await define(Meter(name="peak", aggregation="max"))
    await define(Meter(name="users", aggregation="unique_count", unique_dimension="user"))


# ------------------------------------------------------------------ round trips


def random_batches(seed: int, batches: int, size: int) -> list[list[Event]]:
    rng = random.Random(seed)
    out = []
    for _ in range(batches):
        batch = []
        for _ in range(size):
            meter = rng.choice(["calls", "calls", "peak", "users"])
            value: Any = rng.choice([rng.randrange(1000),
                                     f"{rng.randrange(10**6)}.{rng.randrange(100):02d}",
                                     rng.randrange(100) / 8, 9 * 10**18])
            if meter == "users":
                dims = {"user": f"u{rng.randrange(20)}"}
            else:
                dims = {"region": rng.choice(["eu", "us"])} if rng.random() < 0.7 else {}
            batch.append(Event(
                meter_api_name=meter,
                customer_id=f"c{rng.randrange(6)}",
                meter_value=value,
                meter_time_in_millis=NOW - rng.randrange(3 * DAY),
                dimensions=dims,
                # repeated unique ids across batches: duplicates the server must catch
                unique_id=f"u-{rng.randrange(size * batches // 2)}" if rng.random() < 0.5 else None,
            ))
        out.append(batch)
    return out


ROUND_TRIP_QUERIES = [
    query("calls"),
    query("calls", group_by=["customer_id"]),
    query("calls", group_by=["region", "customer_id"]),
    query("calls", window="day", timezone="Europe/Paris", group_by=["region"]),
    query("calls", window="hour", start_ms=NOW - 5 * HOUR, end_ms=NOW + HOUR,
          filter={"customer_id": ["c1", "c2"]}),
    query("peak", group_by=["customer_id"], window="day"),
    query("users", group_by=["customer_id"]),
    query("users", window="day", filter={"customer_id": ["c3"]}),
    query("calls", group_by=["customer_id"], take=Take(limit=2)),
    query("peak", group_by=["customer_id"], take=Take(limit=3, ascending=True)),
]


async def test_round_trip_equals_the_embedded_engine(engine: Engine, serving: Any) -> None:
    async with (
        serving(engine) as server,
        open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: NOW) as reference,
        open_client(HOST, server.port) as client,
    ):
        await define_standard_meters(client.define_meter)
        await define_standard_meters(reference.define_meter)
        assert await client.list_meters() == reference.meters() == engine.meters()
        for batch in random_batches(seed=7, batches=8, size=40):
            assert await client.ingest(batch) == await reference.ingest(batch)
        for q in ROUND_TRIP_QUERIES:
            over_wire, embedded = await client.query(q), await reference.query(q)
            assert over_wire == embedded, q
            assert over_wire.rows, f"query returned nothing, so it tests nothing: {q}"
        stats = await client.stats()
        assert stats["events_accepted"] == reference.statistics().events_accepted
        assert stats["server_connections"] == 1


async def test_values_beyond_64_bits_travel_exactly(engine: Engine, serving: Any) -> None:
    async with serving(engine) as server, open_client(HOST, server.port) as client:
        await client.define_meter(Meter(name="calls"))
        big = 9 * 10**18
        await client.ingest([event(meter_value=big), event(meter_value=big),
                             event(meter_value=big), event(meter_value=10**20),
                             event(meter_value="0.25")])
        value = (await client.query(FAR)).rows[0].value
        assert value == 3 * big + 10**20 + Decimal("0.25") == await total(engine)


async def test_duplicates_are_caught_across_the_wire(engine: Engine, serving: Any) -> None:
    async with serving(engine) as server, open_client(HOST, server.port) as client:
        await client.define_meter(Meter(name="calls"))
        first = await client.ingest([event(unique_id="a", meter_value=5),
                                     event(unique_id="b", meter_value=7)])
        assert (first.accepted, first.duplicates) == (2, 0)
        again = await client.ingest([event(unique_id="a", meter_value=100),
                                     event(unique_id="a", customer_id="globex", meter_value=3),
                                     event(unique_id="c", meter_value=1),
                                     event(unique_id="c", meter_value=1)])
        assert (again.accepted, again.duplicates) == (2, 2)
        assert again.lsn == first.lsn + 1
        assert await total(engine) == 5 + 7 + 3 + 1


async def test_batch_rejected_arrives_typed_with_problems(engine: Engine, serving: Any) -> None:
    async with serving(engine) as server, open_client(HOST, server.port) as client:
        await client.define_meter(Meter(name="calls"))
        await client.ingest([event(meter_value=2)])
        before = await state(engine)
        batch = [event(unique_id="fresh"), event(meter_api_name="nope"), event(),
                 event(customer_id=""), event(meter_time_in_millis=NOW + DAY)]
        with pytest.raises(BatchRejected) as caught:
            await client.ingest(batch)
        problems = caught.value.problems
        assert [p.index for p in problems] == [1, 3, 4]
        assert "unknown meter 'nope'" in problems[0].reason
        assert "customer_id" in problems[1].reason
        assert "later than the newest accepted" in problems[2].reason
        assert caught.value.code == "batch_rejected"
        assert await state(engine) == before  # nothing applied
        ack = await client.ingest([event(unique_id="fresh")])  # its unique id is still free
        assert (ack.accepted, ack.duplicates) == (1, 0)


async def test_other_errors_arrive_typed_and_the_connection_stays_usable(
    engine: Engine, serving: Any
) -> None:
    async with serving(engine) as server, open_client(HOST, server.port) as client:
        await client.define_meter(Meter(name="calls", aggregation="sum"))
        with pytest.raises(UnknownMeter, match="unknown meter 'nope'"):
            await client.query(query("nope"))
        with pytest.raises(InvalidQuery, match="after end_ms"):
            await client.query(query(start_ms=5, end_ms=1))
        with pytest.raises(InvalidQuery, match="time zone"):
            await client.query(query(timezone="Mars/Base"))
        with pytest.raises(MeterConflict, match="already defined with aggregation 'sum'"):
            await client.define_meter(Meter(name="calls", aggregation="max"))
        with pytest.raises(InvalidRequest, match="needs unique_dimension") as caught:
            await client.define_meter(Meter(name="u", aggregation="unique_count"))
        assert type(caught.value) is InvalidRequest
        assert await client.define_meter(Meter(name="calls")) == Meter(name="calls")
        await client.ping()
        assert [m.name for m in await client.list_meters()] == ["calls"]


def test_error_from_reply_maps_every_wire_code_to_its_type() -> None:
    for code, error_type in ERRORS_BY_CODE.items():
        if error_type is BatchRejected:
            continue
        error = error_from_reply(ErrorReply(code=code, detail="why", id=1))
        assert type(error) is error_type and error.detail == "why" and error.code == code
    rejected = error_from_reply(ErrorReply(code="batch_rejected", detail="x", id=1,
                                           problems=[(0, "bad"), (3, "worse")]))
    assert isinstance(rejected, BatchRejected)
    assert [(p.index, p.reason) for p in rejected.problems] == [(0, "bad"), (3, "worse")]
    # Connection-level codes are protocol errors (each with its own class now)...
    for code in ("bad_message", "frame_error", "timeout", "too_large"):
        error = error_from_reply(ErrorReply(code=code, detail="d"))
        assert isinstance(error, ProtocolError) and type(error) is ERRORS_BY_CODE[code]
        assert error.code == code
    # ... and a code this client does not know is one too, carrying the server's code.
    error = error_from_reply(ErrorReply(code="something_new", detail="d"))
    assert type(error) is ProtocolError and error.code == "something_new"
    assert "something_new" in str(error)
    # A batch_rejected without its problems cannot be rebuilt faithfully.
    assert type(error_from_reply(ErrorReply(code="batch_rejected", detail="d"))) is ProtocolError


# ------------------------------------------------------------------- pipelining


async def test_many_requests_in_flight_on_one_client(engine: Engine, serving: Any) -> None:
    tasks, rounds, size = 50, 4, 5
    async with serving(engine, max_in_flight=8) as server, \
            open_client(HOST, server.port) as client:
        await client.define_meter(Meter(name="calls"))
        acks: list[tuple[int, Any]] = []
        pongs = 0

        async def worker(number: int) -> None:
            nonlocal pongs
            for r in range(rounds):
                batch = [event(customer_id=f"c{number % 7}", meter_value=number + 1,
                               unique_id=f"{number}-{r}-{i}") for i in range(size)]
                acks.append((number, await client.ingest(batch)))
                await client.ping()
                pongs += 1

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for number in range(tasks):
                    nursery.start_soon(worker, number)
        assert len(acks) == tasks * rounds and pongs == tasks * rounds
        assert all((a.accepted, a.duplicates) == (size, 0) for _, a in acks)
        assert sorted(a.lsn for _, a in acks) == list(range(1, tasks * rounds + 1))
        expected = sum((n + 1) * size * rounds for n in range(tasks))
        assert await total(engine) == expected
        assert (await client.query(FAR)).rows[0].value == expected

        # The same batches again, all at once: every event is a duplicate.
        async def resend(number: int) -> None:
            batch = [event(customer_id=f"c{number % 7}", meter_value=number + 1,
                           unique_id=f"{number}-{r}-{i}")
                     for r in range(rounds) for i in range(size)]
            ack = await client.ingest(batch)
            assert (ack.accepted, ack.duplicates) == (0, rounds * size)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for number in range(tasks):
                    nursery.start_soon(resend, number)
        assert await total(engine) == expected


# ------------------------------------------------------ isolation and timeouts


async def test_a_stalled_partial_frame_does_not_block_others_and_times_out(
    engine: Engine, serving: Any
) -> None:
    async with serving(engine, frame_timeout_s=0.5) as server, \
            raw_connection(server.port) as raw:
        await raw.hello()
        await raw.send(frame(Ping(id=1))[:5])  # header and one byte, then nothing
        started = trio.current_time()
        for _ in range(3):
            assert await ping_quickly(server.port) < 1.0
        error = await raw.receive(timeout=5)
        assert isinstance(error, ErrorReply) and error.code == "timeout", error
        assert await raw.until_closed() == []
        assert trio.current_time() - started >= 0.4


async def test_a_slow_sender_is_closed_after_frame_timeout_even_while_trickling(
    engine: Engine, serving: Any
) -> None:
    async with serving(engine, frame_timeout_s=0.5) as server, \
            raw_connection(server.port) as raw:
        await raw.hello()
        await raw.send(HEADER.pack(200))
        started = trio.current_time()
        with trio.fail_after(5):
            for _ in range(40):  # a byte every 50 ms: the frame never completes in 0.5 s
                try:
                    await raw.send(b"\x00")
                except trio.BrokenResourceError:
                    break
                if server.statistics().connections == 0:
                    break
                await trio.sleep(0.05)
        closed_after = trio.current_time() - started
        assert server.statistics().connections == 0, "slow sender still connected after 2 s"
        assert 0.4 <= closed_after < 1.5


async def test_handshake_timeout(engine: Engine, serving: Any) -> None:
    async with serving(engine, handshake_timeout_s=0.3) as server, \
            raw_connection(server.port) as raw:
        started = trio.current_time()
        messages = await raw.until_closed(timeout=5)
        assert [(m.code, m.id) for m in messages] == [("timeout", None)]
        assert trio.current_time() - started >= 0.25


async def test_idle_connection_is_closed(engine: Engine, serving: Any) -> None:
    async with serving(engine, idle_timeout_s=0.3) as server, raw_connection(server.port) as raw:
        await raw.hello()
        messages = await raw.until_closed(timeout=5)
        assert [m.code for m in messages] == ["timeout"]


async def test_idle_timeout_applies_after_requests_too(engine: Engine, serving: Any) -> None:
    async with serving(engine, idle_timeout_s=0.3) as server, raw_connection(server.port) as raw:
        await engine.define_meter(Meter(name="calls"))
        await raw.hello()
        await raw.send(frame(Ingest(id=1, events=[event()])))  # takes an fsync to answer
        reply = await raw.receive()
        assert (reply.id, reply.accepted) == (1, 1)
        # Nothing in flight now: the connection is idle and must be closed.
        messages = await raw.until_closed(timeout=1.5)
        assert [m.code for m in messages] == ["timeout"]


async def big_result_meter(client: Any, customers: int) -> QueryRequest:
    """A meter whose grouped query answers with a large reply (~70 bytes per customer)."""
    await client.define_meter(Meter(name="calls"))
    await client.ingest([event(customer_id=f"customer-{i:06d}-" + "x" * 30, meter_value=i)
                         for i in range(customers)])
    return QueryRequest(id=0, query=query(group_by=["customer_id"]))


async def test_a_client_that_never_reads_does_not_stall_others_and_is_disconnected(
    engine: Engine, serving: Any
) -> None:
    async with serving(engine, send_timeout_s=0.5, max_in_flight=4) as server:
        async with open_client(HOST, server.port) as setup:
            request = await big_result_meter(setup, 3000)
        async with raw_connection(server.port, rcvbuf=16384) as raw:
            await raw.hello()
            requests = b"".join(frame(msgspec.structs.replace(request, id=i))
                                for i in range(1, 61))
            with trio.fail_after(5):
                await raw.send(requests)  # and never read the replies
            for _ in range(3):
                assert await ping_quickly(server.port) < 1.0
            with trio.fail_after(10):
                while server.statistics().connections > 0:
                    await trio.sleep(0.05)
            # Now read what was buffered: the connection ends (EOF or reset) rather than hangs.
            await raw.until_closed(timeout=10, limit=100)
        assert await ping_quickly(server.port) < 1.0


async def test_a_client_that_never_reads_holds_bounded_server_memory(
    engine: Engine, serving: Any
) -> None:
    """``max_in_flight`` bounds what the server holds for a connection (module docstring):
    a client that sends requests but reads no replies must make the server stop reading,
    not make it answer every request into an ever longer queue of blocked tasks."""
    sent, max_in_flight = 80, 4
    async with serving(engine, send_timeout_s=3.0, max_in_flight=max_in_flight) as server:
        async with open_client(HOST, server.port) as setup:
            request = await big_result_meter(setup, 5000)
            reply_bytes = len(encode_message(QueryReply(id=1, result=await setup.query(
                request.query))))  # ~350 kB
        # What the kernel can hold: the server's send buffer grows up to tcp_wmem's maximum
        # (4 MiB by default); the client's receive buffer is pinned small below.
        try:
            kernel_bytes = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
        except (OSError, ValueError, IndexError):
            kernel_bytes = 4 << 20
        bound = (kernel_bytes + 65536) // reply_bytes + 2 * max_in_flight + 4
        if bound >= sent // 2:
            pytest.skip(f"kernel buffers too large ({kernel_bytes} bytes) to tell")
        answered_before = server.statistics().requests
        async with raw_connection(server.port, rcvbuf=16384) as raw:
            await raw.hello()
            with trio.fail_after(5):
                await raw.send(b"".join(frame(msgspec.structs.replace(request, id=i))
                                        for i in range(1, sent + 1)))
            await trio.sleep(1.5)  # the server computes ~10 ms per query
            answered = server.statistics().requests - answered_before
        # Beyond what the kernel buffers hold: the reply queue and the running requests.
        assert answered <= bound, (
            f"the server answered {answered} of {sent} requests for a client that reads nothing "
            f"(at most {bound} expected)"
        )


# ------------------------------------------------------------- protocol errors

BEFORE_HELLO = [
    # (name, bytes, expected error code, expected id)
    ("request before hello", frame(Ping(id=5)), "protocol_error", 5),
    ("wrong version", frame(Hello(version=PROTOCOL_VERSION + 1)), "unsupported_version", None),
    ("not msgpack", encode_frame(b"\xc1"), "protocol_error", None),
    ("garbage", b"\xff\xfe\xfd\xfc" + bytes(range(64)), "frame_error", None),
    ("http request", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n", "frame_error",
     None),
    ("zero-length frame", HEADER.pack(0) + HELLO, "frame_error", None),
    ("oversized frame", HEADER.pack(4097) + b"\x00" * 100, "frame_error", None),
]

AFTER_HELLO_CLOSING = [
    ("zero-length frame", HEADER.pack(0) + frame(Ping(id=2)), "frame_error"),
    ("oversized frame", HEADER.pack(4097) + b"\x00" * 4097, "frame_error"),
    ("oversized frame (header only)", HEADER.pack(2**32 - 1), "frame_error"),
    ("http request", b"POST /v1/ingest HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", "frame_error"),
]

AFTER_HELLO_STAYING_OPEN = [
    # (name, frame, expected id in the error)
    ("unknown type", frame({"type": "frobnicate", "id": 7}), 7),
    ("wrong field type", frame({"type": "ingest", "id": 8, "events": "lots"}), 8),
    ("wrong event field type", frame({"type": "ingest", "id": 9, "events": [
        {"meterApiName": "calls", "customerId": "acme", "meterValue": [1],
         "meterTimeInMillis": NOW}]}), 9),
    ("ingest of a mistyped query", frame({"type": "query", "id": 10, "query": {"startMs": 1}}), 10),
    ("id of the wrong type", frame({"type": "ping", "id": "eleven"}), None),
    ("no type", frame({"id": 12}), 12),
    ("not a map", frame([1, 2, 3]), None),
    ("not msgpack", encode_frame(b"\xc1"), None),
    ("truncated msgpack", encode_frame(b"\x82\xa4t"), None),
    ("hello again", HELLO, None),
]


@pytest.fixture
async def calls_engine(engine: Engine) -> Engine:
    await engine.define_meter(Meter(name="calls"))
    await engine.ingest([event(meter_value=3), event(customer_id="globex", meter_value=4)])
    return engine


@pytest.mark.parametrize(("name", "data", "code", "request_id"), BEFORE_HELLO,
                         ids=[case[0] for case in BEFORE_HELLO])
async def test_protocol_errors_before_hello_close_the_connection(
    calls_engine: Engine, serving: Any, name: str, data: bytes, code: str, request_id: int | None
) -> None:
    before = await state(calls_engine)
    async with serving(calls_engine, max_frame_bytes=4096) as server, \
            raw_connection(server.port) as raw:
        await raw.send(data)
        messages = await raw.until_closed()
        assert [(m.code, m.id) for m in messages] == [(code, request_id)], (name, messages)
        assert await ping_quickly(server.port) < 1.0
        assert server.statistics().protocol_errors == 1
    assert await state(calls_engine) == before


@pytest.mark.parametrize(("name", "data", "code"), AFTER_HELLO_CLOSING,
                         ids=[case[0] for case in AFTER_HELLO_CLOSING])
async def test_bad_frames_after_hello_close_the_connection(
    calls_engine: Engine, serving: Any, name: str, data: bytes, code: str
) -> None:
    before = await state(calls_engine)
    async with serving(calls_engine, max_frame_bytes=4096) as server, \
            raw_connection(server.port) as raw:
        await raw.hello()
        await raw.send(data)
        messages = await raw.until_closed()
        assert [(m.code, m.id) for m in messages] == [(code, None)], (name, messages)
        assert await ping_quickly(server.port) < 1.0
    assert await state(calls_engine) == before


@pytest.mark.parametrize(("name", "data", "request_id"), AFTER_HELLO_STAYING_OPEN,
                         ids=[case[0] for case in AFTER_HELLO_STAYING_OPEN])
async def test_invalid_messages_get_an_error_and_the_connection_stays_open(
    calls_engine: Engine, serving: Any, name: str, data: bytes, request_id: int | None
) -> None:
    before = await state(calls_engine)
    async with serving(calls_engine, max_frame_bytes=4096) as server, \
            raw_connection(server.port) as raw:
        await raw.hello()
        await raw.send(data)
        error = await raw.receive()
        assert isinstance(error, ErrorReply), error
        assert (error.code, error.id) == ("bad_message", request_id)
        await raw.send(frame(Ping(id=99)))
        assert await raw.receive() == Pong(id=99)
        assert await ping_quickly(server.port) < 1.0
    assert await state(calls_engine) == before


async def test_a_bad_message_among_pipelined_requests_fails_only_itself(
    calls_engine: Engine, serving: Any
) -> None:
    async with serving(calls_engine) as server, raw_connection(server.port) as raw:
        await raw.hello()
        good = Ingest(id=1, events=[event(meter_value=10, unique_id="p1")])
        await raw.send(frame(good) + frame({"type": "ingest", "id": 2, "events": 5})
                       + frame(msgspec.structs.replace(good, id=3)) + frame(Ping(id=4)))
        replies = {}
        for _ in range(4):
            reply = await raw.receive()
            replies[reply.id] = reply
        assert (replies[1].accepted + replies[3].accepted, replies[3].duplicates
                + replies[1].duplicates) == (1, 1)
        assert replies[2].code == "bad_message" and replies[4] == Pong(id=4)
    assert await total(calls_engine) == 3 + 4 + 10


async def test_too_many_connections_are_refused_with_busy(engine: Engine, serving: Any) -> None:
    async with serving(engine, max_connections=1) as server, \
            open_client(HOST, server.port) as first:
        with pytest.raises(ServerBusy, match="too many connections"):
            async with open_client(HOST, server.port):
                pass
        await first.ping()
        assert server.statistics().refused_connections == 1


# ---------------------------------------------------------- batcher and sync


async def test_batcher_flushes_by_size_interval_and_on_exit(engine: Engine, serving: Any) -> None:
    await engine.define_meter(Meter(name="calls"))
    async with serving(engine) as server:
        async with open_batcher(HOST, server.port, max_events=10, flush_interval_s=60) as batcher:
            for _ in range(9):
                await batcher.add(event(meter_value=1))
            assert await total(engine) is None  # buffered
            await batcher.add(event(meter_value=1))  # the tenth: flushed by size
            assert await total(engine) == 10
            for _ in range(3):
                await batcher.add(event(meter_value=100))
        assert await total(engine) == 310  # flushed on exit
        assert batcher.statistics().batches_sent == 2 and batcher.statistics().accepted == 13

        async with open_batcher(HOST, server.port, max_events=1000,
                                flush_interval_s=0.1) as batcher:
            await batcher.add(event(meter_value=1000, unique_id="given"))
            await batcher.add(event(meter_value=1000, unique_id="given"))
            with trio.fail_after(10):  # only bounds the wait
                # Flushed by the interval. The engine applies the batch before the ack
                # reaches the batcher, so wait for the ack too before reading its counts.
                while await total(engine) != 1310 or batcher.statistics().batches_sent < 1:
                    await trio.sleep(0.05)
            assert batcher.statistics().duplicates == 1
        assert await total(engine) == 1310


async def test_sync_client_round_trip(engine: Engine, serving: Any) -> None:
    async with serving(engine) as server:
        port = server.port

        def blocking_program() -> tuple[Any, ...]:
            with SyncClient(HOST, port) as client:
                client.ping()
                client.define_meter(Meter(name="calls"))
                ack = client.ingest([event(meter_value=4, unique_id="s1"),
                                     event(meter_value=4, unique_id="s1"), event(meter_value=1)])
                result = client.query(FAR)
                try:
                    client.query(query("nope"))
                except UnknownMeter as exc:
                    error: Exception = exc
                return ack, result, client.list_meters(), error

        with trio.fail_after(20):
            ack, result, meters, error = await trio.to_thread.run_sync(blocking_program)
        assert (ack.accepted, ack.duplicates) == (2, 1)
        assert result.rows[0].value == 5 == await total(engine)
        assert meters == [Meter(name="calls")]
        assert isinstance(error, UnknownMeter)

        def refused() -> Exception:
            try:
                SyncClient(HOST, 1)  # nothing listens on port 1
            except Exception as exc:
                return exc
            raise AssertionError("connected to port 1?")

        assert isinstance(await trio.to_thread.run_sync(refused), OSError)


class Proxy:
    """A TCP proxy on 127.0.0.1 that can sever its connections or eat the next reply."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.scopes: set[trio.CancelScope] = set()
        self.connections = 0
        self.eat_replies = 0  # sever instead of forwarding the next N server→client chunks
        self.eat_requests = 0  # forward half of the next client→server chunk, then sever
        self.severed = 0
        self.reset_connections = 0  # reset the next N connections as soon as accepted

    async def handle(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        if self.reset_connections:
            self.reset_connections -= 1
            downstream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
            await downstream.aclose()  # RST
            return
        async with downstream:
            try:
                upstream = await trio.open_tcp_stream(HOST, self.target_port)
            except OSError:
                return
            async with upstream:
                with trio.CancelScope() as scope:
                    self.scopes.add(scope)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self.pump, downstream, upstream, False, scope)
                        nursery.start_soon(self.pump, upstream, downstream, True, scope)
                self.scopes.discard(scope)

    async def pump(self, source: trio.SocketStream, sink: trio.SocketStream, replies: bool,
                   scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await source.receive_some(1 << 16)
                if not data:
                    break
                if replies and self.eat_replies:
                    self.eat_replies -= 1
                    self.severed += 1
                    break
                if not replies and self.eat_requests:
                    self.eat_requests -= 1
                    self.severed += 1
                    await sink.send_all(data[: len(data) // 2])
                    break
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def sever(self) -> None:
        for scope in self.scopes:
            scope.cancel()
        self.severed += len(self.scopes)


@asynccontextmanager
async def proxy_to(port: int) -> AsyncIterator[tuple[Proxy, int]]:
    proxy = Proxy(port)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, proxy.handle, 0)
        try:
            yield proxy, listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


async def test_batcher_retries_without_double_counting(engine: Engine, serving: Any) -> None:
    await engine.define_meter(Meter(name="calls"))
    added = 0
    async with serving(engine) as server, proxy_to(server.port) as (proxy, port):
        async with open_batcher(HOST, port, max_events=1000, flush_interval_s=60,
                                retry_backoff_s=0.01, max_retries=8) as batcher:

            async def add_batch(value: int, n: int = 5) -> Any:
                nonlocal added
                for _ in range(n):
                    await batcher.add(event(meter_value=value))
                added += value * n
                with trio.fail_after(10):
                    return await batcher.flush()

            first = await add_batch(1)
            assert (first.accepted, first.duplicates) == (5, 0)

            # The ack is lost: the server applied the batch, the batcher retries it.
            proxy.eat_replies = 1
            ack = await add_batch(10)
            assert (ack.accepted, ack.duplicates) == (0, 5), "the retry must be deduplicated"
            assert await total(engine) == added

            # The connection drops between batches.
            proxy.sever()
            ack = await add_batch(100)
            assert (ack.accepted, ack.duplicates) == (5, 0)

            # The request is cut in the middle of its frame: nothing applied, then retried.
            proxy.eat_requests = 1
            ack = await add_batch(1000)
            assert (ack.accepted, ack.duplicates) == (5, 0)

            # Several losses in a row.
            proxy.eat_replies = 3
            ack = await add_batch(10000)
            assert (ack.accepted, ack.duplicates) == (0, 5)
        assert batcher.statistics().retries >= 6
        assert proxy.connections >= 7
    assert await total(engine) == added == 5 * 11111


async def test_batcher_gives_up_after_max_retries(engine: Engine, serving: Any) -> None:
    await engine.define_meter(Meter(name="calls"))
    async with serving(engine) as server, proxy_to(server.port) as (proxy, port):
        async with open_batcher(HOST, port, flush_interval_s=60, retry_backoff_s=0.01,
                                max_retries=2) as batcher:
            await batcher.add(event(unique_id="first"))
            await batcher.flush()  # connected
            await batcher.add(event(unique_id="once"))
            proxy.eat_replies = 3  # the ack, then the welcome of each reconnection
            with trio.fail_after(10), pytest.raises(ConnectionLost, match="gave up after 3"):
                await batcher.flush()
            assert batcher.statistics().retries == 2
        # The server applied it (only the ack was lost), once.
        assert await total(engine) == 2


async def test_batcher_retries_when_the_connection_is_reset_during_the_handshake(
    engine: Engine, serving: Any
) -> None:
    """A server restarting resets connections; the batcher must retry, not crash."""
    await engine.define_meter(Meter(name="calls"))
    async with serving(engine) as server, proxy_to(server.port) as (proxy, port):
        async with open_batcher(HOST, port, flush_interval_s=60, retry_backoff_s=0.01,
                                max_retries=8) as batcher:
            await batcher.add(event(unique_id="r1"))
            proxy.reset_connections = 3  # the next three connections are reset at once
            with trio.fail_after(10):
                try:
                    ack = await batcher.flush()
                except trio.BrokenResourceError as exc:
                    pytest.fail(f"the batcher did not retry: {exc!r}")
            assert (ack.accepted, ack.duplicates) == (1, 0)
    assert await total(engine) == 1


# ------------------------------------------------------------ graceful shutdown


async def test_shutdown_with_ingests_in_flight(engine: Engine) -> None:
    await engine.define_meter(Meter(name="calls"))
    server_done = trio.Event()
    acked: list[str] = []
    failed: list[str] = []

    async with trio.open_nursery() as nursery:
        server = MeterServer(engine, ServerConfig(host=HOST, port=0, drain_timeout_s=5))

        async def run_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            await server.serve(task_status=task_status)
            server_done.set()

        port = await nursery.start(run_server)

        async def sender(client: Any, number: int) -> None:
            for r in range(200):
                name = f"t{number}-{r}"
                try:
                    ack = await client.ingest([event(customer_id=name, unique_id=f"{name}-{i}")
                                               for i in range(10)])
                except ConnectionLost:
                    failed.append(name)
                    return
                assert (ack.accepted, ack.duplicates) == (10, 0)
                acked.append(name)

        async with open_client(HOST, port) as one, open_client(HOST, port) as two:
            with trio.fail_after(20):
                async with trio.open_nursery() as senders:
                    for number in range(12):
                        senders.start_soon(sender, one if number % 2 else two, number)
                    while len(acked) < 40:
                        await trio.sleep(0.005)
                    server.shutdown()
                    await server_done.wait()  # the server task returns
    assert failed, "the senders should have seen the server go away"
    result = await engine.query(query(group_by=["customer_id"]))
    present = {row.group["customer_id"]: row.value for row in result.rows}
    assert set(acked) <= set(present), "an acknowledged batch is missing"
    assert all(value == 10 for value in present.values()), "half a batch was applied"


async def test_shutdown_acknowledges_what_was_in_flight(engine: Engine) -> None:
    """Shutdown lets in-flight requests "finish and be acknowledged" (server.py docstring):
    a batch sent before shutdown and applied must also reach its client as an ack."""
    await engine.define_meter(Meter(name="calls"))
    gated = GatedEngine(engine)
    gated.gate = trio.Event()  # every ingest waits here: all twelve are surely in flight
    server = MeterServer(gated, ServerConfig(host=HOST, port=0, drain_timeout_s=5))
    outcomes: dict[int, str] = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        async with open_client(HOST, port) as client:

            async def send(number: int) -> None:
                try:
                    await client.ingest([event(customer_id=f"c{number}")])
                    outcomes[number] = "acked"
                except ConnectionLost:
                    outcomes[number] = "lost"

            with trio.fail_after(10):
                async with trio.open_nursery() as senders:
                    for number in range(12):
                        senders.start_soon(send, number)
                    while gated.started < 12:  # the server is running all twelve
                        await trio.sleep(0.001)
                    server.shutdown()
                    await trio.sleep(0.05)
                    gated.gate.set()
    result = await engine.query(query(group_by=["customer_id"]))
    applied = {int(row.group["customer_id"][1:]) for row in result.rows}
    assert applied == set(range(12)), "requests in flight at shutdown should complete"
    assert outcomes == {n: "acked" for n in range(12)}, (
        "applied but not acknowledged: "
        + str(sorted(n for n, o in outcomes.items() if o != "acked"))
    )


async def test_cancelling_serve_closes_the_listening_socket(engine: Engine) -> None:
    """``serve`` runs "until cancelled or shutdown is called": both must close the listener."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server = MeterServer(engine, ServerConfig(host=HOST, port=0))
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                nursery.cancel_scope.cancel()
        del server, nursery
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []


# ------------------------------------------------------------- client robustness


async def test_typed_errors_leave_open_client_unwrapped(engine: Engine, serving: Any) -> None:
    """The client promises the engine's typed exceptions; an ``except UnknownMeter`` around
    ``async with open_client(...)`` must catch one raised in its body."""
    await engine.define_meter(Meter(name="calls"))
    async with serving(engine) as server:
        with pytest.raises(UnknownMeter):
            async with open_client(HOST, server.port) as client:
                await client.query(query("nope"))
        with pytest.raises(ConnectionLost):
            async with open_batcher(HOST, 1, max_retries=0) as batcher:
                await batcher.add(event())
                await batcher.flush()


async def test_a_request_cancelled_while_sending_does_not_corrupt_the_stream() -> None:
    """Cancelling one task's large ingest in the middle of ``send_all`` must not leave half
    a frame on the shared connection, where it would swallow other tasks' requests.

    A fake server with a tiny receive window answers the hello and then reads nothing, so
    the big ingest blocks mid-send; it is cancelled, another task pings, and then the fake
    server reads what arrived: the ping must still be a frame of its own, or the client must
    refuse to send it because it closed the connection the interrupted send broke."""
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    listener = listeners[0]
    listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    port = listener.socket.getsockname()[1]
    received = bytearray()
    async with listener:
        async with trio.open_nursery() as nursery:
            accepted: list[trio.SocketStream] = []

            async def fake_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                task_status.started()
                stream = await listener.accept()
                accepted.append(stream)
                decoder = FrameDecoder()
                while decoder.next_frame() is None:
                    decoder.feed(await stream.receive_some(1 << 16))
                received.extend(bytes(decoder._buffer))  # anything after the hello
                await stream.send_all(frame(Welcome(version=PROTOCOL_VERSION, server="fake",
                                                    max_frame_bytes=1 << 24, max_in_flight=16)))

            await nursery.start(fake_server)
            big = [event(unique_id=f"big-{i}", dimensions={"pad": "x" * 200})
                   for i in range(30_000)]  # ~7.5 MB, far beyond the socket buffers
            async with open_client(HOST, port) as client:
                with trio.move_on_after(1) as cancelled:
                    await client.ingest(big)
                assert cancelled.cancelled_caught
                stream = accepted[0]

                async def drain() -> None:
                    while data := await stream.receive_some(1 << 20):
                        received.extend(data)

                async with stream, trio.open_nursery() as readers:
                    readers.start_soon(drain)  # the fake server reads everything from now on
                    ping_refused = False
                    with trio.move_on_after(0.5):
                        try:
                            await client.ping()  # no reply will come: just put it on the wire
                        except ConnectionLost:
                            ping_refused = True  # the client gave up the broken connection
                    await trio.sleep(0.2)
                    readers.cancel_scope.cancel()
    decoder = FrameDecoder()
    decoder.feed(received)
    types = []
    with contextlib.suppress(Exception):
        while (payload := decoder.next_frame()) is not None:
            types.append(msgspec.msgpack.decode(payload).get("type"))
    assert "ping" in types or ping_refused, (
        f"the ping was swallowed by a half-sent ingest frame ({len(received)} bytes arrived, "
        f"frames decoded: {types}, {decoder.buffered_bytes} bytes left mid-frame, ending with "
        f"the ping's frame: {bytes(received).endswith(frame(Ping(id=2)))})"
    )


async def test_garbage_larger_than_a_receive_chunk_still_gets_the_error_frame(
    calls_engine: Engine, serving: Any
) -> None:
    before = await state(calls_engine)
    async with serving(calls_engine) as server, raw_connection(server.port) as raw:
        await raw.hello()

        async def flood() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await raw.send(b"POST / HTTP/1.1\r\n" + b"x" * (2 << 20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            messages = await raw.until_closed()
            nursery.cancel_scope.cancel()
        assert [m.code for m in messages] == ["frame_error"]
        assert await ping_quickly(server.port) < 1.0
    assert await state(calls_engine) == before


async def test_every_request_is_answered_when_the_client_half_closes(
    engine: Engine, serving: Any
) -> None:
    """A client may send its requests, shut down its sending side and read the replies:
    EOF between frames is a clean end, and every request read must still be answered."""
    await engine.define_meter(Meter(name="calls"))
    await engine.ingest([event(customer_id=f"c{i}") for i in range(1000)])
    async with serving(engine, max_in_flight=1) as server, \
            raw_connection(server.port, rcvbuf=16384) as raw:
        await raw.hello()
        # Replies of ~35 kB: more than the kernel buffers hold, so the server's writer waits.
        requests = [frame(QueryRequest(id=i, query=query(group_by=["customer_id"])))
                    for i in range(1, 301)]
        await raw.send(b"".join(requests))
        await raw.stream.send_eof()
        await trio.sleep(0.5)  # a client a little slow to start reading
        replies = await raw.until_closed(timeout=10, limit=1000)
        missing = sorted(set(range(1, 301)) - {r.id for r in replies})
        assert missing == [], f"{len(missing)} requests were read but never answered"
        assert len(replies) == 300


async def test_invalid_utf8_in_a_request_is_a_bad_message(
    calls_engine: Engine, serving: Any
) -> None:
    """A frame that is msgpack but not a valid message (here: a string that is not UTF-8)
    gets ``bad_message`` and the connection stays open, like any other invalid message."""
    before = await state(calls_engine)
    bad_text = (b"\x83\xa4type\xa6ingest\xa2id\x05\xa6events\x91\x84\xacmeterApiName\xa5calls"
                b"\xaacustomerId\xa2\xff\xfe\xaameterValue\x01\xb1meterTimeInMillis"
                + msgspec.msgpack.encode(NOW))
    async with serving(calls_engine) as server, raw_connection(server.port) as raw:
        await raw.hello()
        await raw.send(frame(Ingest(id=4, events=[event(meter_value=10)]))
                       + encode_frame(bad_text) + frame(Ping(id=6)))
        replies = {}
        for _ in range(3):
            reply = await raw.receive()
            assert reply is not None, f"connection closed; got only {replies}"
            replies[reply.id] = reply
        assert replies[4].accepted == 1, "the ingest before the bad frame lost its ack"
        assert (replies[5].code, replies[6]) == ("bad_message", Pong(id=6))
    assert await total(calls_engine) == 3 + 4 + 10
    assert (await state(calls_engine))[0] == before[0]


async def test_a_request_cancelled_while_waiting_for_its_reply_does_not_break_the_client(
    engine: Engine, serving: Any
) -> None:
    """``with trio.move_on_after(...): await client.query(...)`` is the everyday way to put
    a timeout on a request; the reply that arrives after the caller gave up must be
    dropped, not treated as a protocol violation that fails every other request."""
    await engine.define_meter(Meter(name="calls"))
    gated = GatedEngine(engine)
    gated.gate = trio.Event()
    async with serving(gated) as server, open_client(HOST, server.port) as client:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def impatient() -> None:
                    with scope:
                        await client.ingest([event(unique_id=f"i-{i}") for i in range(2000)])

                nursery.start_soon(impatient)
                while gated.started == 0:  # the request is on the server now
                    await trio.sleep(0.001)
                scope.cancel()  # the caller gives up
            gated.gate.set()
            await gated.settled()  # the reply is on its way back
            await trio.sleep(0.1)
            await client.ping()
            assert (await client.query(FAR)).rows[0].value == 2000


async def test_a_client_resetting_its_connection_is_not_logged_as_a_server_failure(
    engine: Engine, serving: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that resets the connection is routine (the handler means to ignore
    BrokenResourceError); it must not be logged as "connection handler failed"."""
    async with serving(engine) as server:
        async with raw_connection(server.port) as raw:
            await raw.hello()
            raw.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
        with trio.fail_after(5):
            while server.statistics().connections:
                await trio.sleep(0.01)
        assert await ping_quickly(server.port) < 1.0
    failures = [r.getMessage() for r in caplog.records
                if r.name == "engine.server" and r.levelno >= logging.ERROR]
    assert failures == []


async def test_shutdown_stops_reading_new_requests(engine: Engine) -> None:
    """"On shutdown the server ... stops reading new requests" (server.py docstring): a
    request sent after ``shutdown()`` on a connection with one still in flight is not
    applied (the client sees the connection close and can retry it elsewhere)."""
    await engine.define_meter(Meter(name="calls"))
    gated = GatedEngine(engine)
    gated.gate = trio.Event()
    server = MeterServer(gated, ServerConfig(host=HOST, port=0, drain_timeout_s=5))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        async with raw_connection(port) as raw:
            await raw.hello()
            await raw.send(frame(Ingest(id=1, events=[event(unique_id="in-flight")])))
            with trio.fail_after(5):
                while gated.started == 0:
                    await trio.sleep(0.001)
            server.shutdown()
            with contextlib.suppress(trio.BrokenResourceError):
                await raw.send(frame(Ingest(id=2, events=[event(customer_id="after-shutdown")])))
            await trio.sleep(0.2)  # time enough for the server to read it, if it still reads
            gated.gate.set()
            replies = await raw.until_closed(timeout=10)
    result = await engine.query(query(group_by=["customer_id"]))
    customers = {row.group["customer_id"] for row in result.rows}
    assert "after-shutdown" not in customers, f"read and applied after shutdown: {replies}"


async def test_the_server_wide_request_budget_holds_back_other_connections(
    engine: Engine, serving: Any
) -> None:
    """With a budget for about one big ingest, a second connection's big ingest is not
    read (nor run) until the first is answered; both are then acknowledged."""
    await engine.define_meter(Meter(name="calls", aggregation="sum"))
    gated = GatedEngine(engine)
    gated.gate = trio.Event()
    big = [event(customer_id="c1", unique_id=f"b-{i}", dimensions={"pad": "p" * 200})
           for i in range(2000)]
    size = len(msgspec.msgpack.encode(big))
    async with serving(gated, max_request_bytes_in_flight=(size + size // 2) * 4) as server:
        acks: list[int] = []
        async with open_client(HOST, server.port) as first, \
                open_client(HOST, server.port) as second:

            async def send(client: Any, offset: int) -> None:
                batch = [msgspec.structs.replace(e, unique_id=f"{offset}-{e.unique_id}")
                         for e in big]
                acks.append((await client.ingest(batch)).accepted)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send, first, 1)
                    while gated.started == 0:
                        await trio.sleep(0.001)
                    nursery.start_soon(send, second, 2)
                    await trio.sleep(0.3)
                    assert gated.started == 1, "the budget should hold the second request"
                    assert server.request_budget.used_bytes <= (size + size // 2) * 4
                    gated.gate.set()
        assert acks == [2000, 2000]
        assert server.request_budget.used_bytes == 0


async def test_an_unauthenticated_client_cannot_hold_the_request_budget(
    engine: Engine, serving: Any
) -> None:
    """A first frame announcing megabytes is refused at its header (hellos are small)
    and charges nothing, so authenticated clients are never held up by it."""
    async with serving(engine) as server, raw_connection(server.port) as raw:
        await raw.send(HEADER.pack(16 * 2**20) + b"\x80")
        reply = await raw.receive()
        assert isinstance(reply, ErrorReply) and reply.code == "frame_error", reply
        with trio.fail_after(2):  # only the error reply was charged, until written
            while server.request_budget.used_bytes:
                await trio.sleep(0.001)
        assert await ping_quickly(server.port) < 1.0
