"""Hostile input against a ``meter serve`` subprocess: random and mutated frames of every
message type, while a clean client ingests and queries on its own connection.

What is shown:

- **No crash**: the server process is alive throughout, logs no failing handler, never
  answers ``internal``, and exits 0 on SIGTERM at the end.
- **No state change from an invalid frame**: the test keeps a model of exactly what the
  server acknowledged (``ingest_ack``, ``meter``, ``limit``, ``removed`` replies), built
  from the bytes it sent, and at the end compares the server's meters, limits, per-customer
  totals and ``events_accepted`` with it. A mutated frame may still be a valid request; it
  then counts in the model, and the ack's ``accepted``/``duplicates`` must match the
  model's dedup. Unique ids are random per frame, so concurrent connections never share
  one and the totals do not depend on the order in which the server ran them.
- **Every complete frame is answered exactly once** (or the stream ends with a
  ``frame_error`` where the test's own parse of the bytes says it must), so no frame is
  silently dropped or answered twice.
- **Valid traffic is unaffected**: a clean client ingests and reads back its exact total
  throughout, with its latency reported and bounded.

How: frames are generated with ``random`` (fast, not Hypothesis) from valid seeds of every
client message type, then mutated at three levels: the message (a field set to a hostile
value, dropped, an unknown field, another tag), the payload bytes (flips, sets, inserts,
deletes, truncation; header kept consistent) and the framing (zero, oversized, shorter or
longer length prefixes, a frame cut short), plus raw payloads (random bytes, deep nesting,
invalid UTF-8, huge ints, NaN, bin and ext types, huge container headers). Each
connection sends a window of frames after its ``hello``, half-closes and reads every reply
until the server closes; the next window uses a new connection.
"""

from __future__ import annotations

import collections
import os
import random
import struct
import time
from dataclasses import dataclass, field
from decimal import Context, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from engine.client import open_client
from engine.protocol.framing import HEADER, MAX_FRAME_BYTES, FrameDecoder
from engine.protocol.messages import (
    PROTOCOL_VERSION,
    AlertsPush,
    ErrorReply,
    IngestReply,
    Lagged,
    LimitReply,
    MeterReply,
    RemovedReply,
    Welcome,
    decode_server_message,
)
from engine.schema import Event, Meter, Query
from tests.helpers.events import DAY, MINUTE, now_ms
from tests.helpers.serve import HOST, serve_in
from tests.helpers.stats import percentile
from tests.helpers.wire import framed

FUZZ_METER = "fz"  # sum: what mutated ingests that stay valid add to
UNIQUE_METER = "users"  # unique_count over the "user" dimension
CLEAN_METER = "clean_meter_7"  # only the clean client writes it (no seed names it)
GHOST = "ghost"  # never defined: an ingest naming it is refused whole


def encode(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


HELLO = {"type": "hello", "version": PROTOCOL_VERSION, "client": "hostile-test"}


# ------------------------------------------------------------------- the seeds


def seed_messages(rng: random.Random, worker: int, request_id: int) -> list[dict[str, Any]]:
    """One valid message of every client type (and a few variants), as plain maps.

    Unique ids and limit ids are random: no two frames (nor workers) share one, and no
    single-byte mutation turns one into another."""
    now = now_ms()

    def uid() -> str:
        return f"{rng.getrandbits(64):016x}"

    def event(**fields: Any) -> dict[str, Any]:
        base = {"meterApiName": FUZZ_METER, "customerId": f"c{rng.randrange(8)}",
                "meterValue": rng.choice([1, 7, "2.5", 0.25, "1e2", -3, 10**6]),
                "meterTimeInMillis": now - rng.randrange(DAY)}
        base.update(fields)
        return base

    limit_id = f"lim-{worker}-{rng.getrandbits(40):010x}"
    repeated = uid()
    query = {"meterApiName": FUZZ_METER, "startMs": now // MINUTE * MINUTE - 2 * DAY,
             "endMs": now // MINUTE * MINUTE + MINUTE}
    return [
        {"type": "ping", "id": request_id},
        {"type": "list_meters", "id": request_id},
        {"type": "stats", "id": request_id},
        {"type": "list_limits", "id": request_id},
        {"type": "define_meter", "id": request_id, "meter": {"name": FUZZ_METER}},
        {"type": "define_meter", "id": request_id,
         "meter": {"name": UNIQUE_METER, "aggregation": "unique_count",
                   "uniqueDimension": "user", "description": "who"}},
        {"type": "ingest", "id": request_id, "events": [event(uniqueId=uid())]},
        {"type": "ingest", "id": request_id, "events": [
            event(dimensions={"region": "eu", "user": "u1"}, uniqueId=uid()),
            event(meterValue="0.125"), event(uniqueId=repeated),
            event(uniqueId=repeated, meterValue=99)]},  # a duplicate within the batch
        {"type": "ingest", "id": request_id, "reportAlerts": True,
         "events": [event(customerId="c-alert", meterValue=5, uniqueId=uid())]},
        {"type": "ingest", "id": request_id,
         "events": [event(meterApiName=GHOST, uniqueId=uid()), event(uniqueId=uid())]},
        {"type": "ingest", "id": request_id, "events": []},
        {"type": "query", "id": request_id, "query": query},
        {"type": "query", "id": request_id,
         "query": {**query, "window": "hour", "timezone": "Europe/Paris",
                   "groupBy": ["customer_id", "region"], "filter": {"region": ["eu"]},
                   "take": {"limit": 3, "ascending": True}}},
        {"type": "query", "id": request_id,
         "query": {**query, "meterApiName": UNIQUE_METER, "groupBy": ["customer_id"]}},
        {"type": "add_limit", "id": request_id,
         "limit": {"id": limit_id, "meterApiName": FUZZ_METER, "thresholds": [10**9, "2.5e9"],
                   "customerId": "c1", "period": "month", "timezone": "Asia/Tokyo",
                   "filter": {"region": ["eu"]}}},
        {"type": "remove_limit", "id": request_id, "limitId": limit_id},
        {"type": "subscribe", "id": request_id, "fromSeq": rng.choice([0, 5, 10**6])},
        {"type": "unsubscribe", "id": request_id, "subscription": request_id - 1},
    ]


SEED_TYPES = ["ping", "list_meters", "stats", "list_limits", "define_meter", "define_meter",
              "ingest", "ingest", "ingest", "ingest", "ingest", "query", "query", "query",
              "add_limit", "remove_limit", "subscribe", "unsubscribe"]


# ------------------------------------------------------------ hostile material

# Deeper than the interpreter's recursion limit (1000), which msgspec honours.
DEEP_ARRAY = b"\x91" * 20_000 + b"\x01"
DEEP_MAP = b"\x81\xa1k" * 5_000 + b"\x01"
HOSTILE_RAW_VALUES = [  # msgpack encodings of values msgspec.msgpack.encode would not make
    b"\xa3\xff\xfe\xfd",  # str with invalid UTF-8
    b"\xc4\x03abc",  # bin where a str is expected
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint64 max
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # int64 min
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # float64 NaN
    b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # float64 +inf
    b"\xca\x7f\xc0\x00\x00",  # float32 NaN
    b"\xca\x3d\xcc\xcc\xcd",  # float32 0.1
    b"\xd4\x01\x01",  # fixext 1
    b"\xd6\xff\x00\x00\x00\x01",  # timestamp ext
    b"\xdd\xff\xff\xff\xff",  # array32 of 4 billion elements, none present
    b"\xdf\xff\xff\xff\xff",  # map32 of 4 billion entries, none present
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB, none present
    b"\xc1",  # never used
    DEEP_ARRAY,
    DEEP_MAP,
]
HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**63 - 1, 2**64 - 1, -(2**63), 1.5, float("nan"),
    float("inf"), float("-inf"), -0.0, 1e308, 5e-324, "", "x" * 300, "x" * 70_000, "\x00",
    "ünïcödé ☃", "NaN", "Infinity", "1e400", "-0", "0.1", "1e-30", " 7 ", "1_000", b"bytes",
    [], [1, 2], ["customer_id"], {}, {"a": 1}, {"customer_id": ["c1"]}, [[[[[]]]]],
    msgspec.msgpack.Ext(1, b"x"), "customer_id", FUZZ_METER, GHOST, UNIQUE_METER, "UTC",
    "Europe/Paris", "hour", "total", "unique_count", "ingest", 1_790_000_000_000,
    now_ms(), now_ms() + 10 * MINUTE, now_ms() - 40 * DAY,
]
TAGS = ["hello", "ping", "define_meter", "list_meters", "ingest", "query", "stats",
        "add_limit", "remove_limit", "list_limits", "subscribe", "unsubscribe", "welcome",
        "pong", "error", "alerts", "frobnicate", "", "INGEST"]
GARBAGE = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01",
           b"SSH-2.0-OpenSSH_9.6\r\n", b"\xff" * 64, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a nested map/list where a value sits."""
    found = []
    if isinstance(value, dict):
        for key, inner in value.items():
            found.append((*prefix, key))
            found += paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found.append((*prefix, index))
            found += paths(inner, (*prefix, index))
    return found


def container(message: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        message = message[key]
    return message


def copy(value: Any) -> Any:
    return msgspec.msgpack.decode(encode(value))


def with_raw(message: dict[str, Any], rng: random.Random) -> bytes:
    """The message with one field (or a new unknown one) replaced by raw hostile bytes."""
    marker = "\x00MARK\x00"
    spots = [p for p in paths(message) if p != ("type",)]
    if spots and rng.random() < 0.7:
        path = rng.choice(spots)
        container(message, path)[path[-1]] = marker
    else:
        message[rng.choice(["x", "meterValue", "events", "zz" * 8])] = marker
    payload = encode(message)
    return payload.replace(encode(marker), rng.choice(HOSTILE_RAW_VALUES), 1)


def mutate_message(message: dict[str, Any], rng: random.Random) -> bytes:
    """A message-level mutation: still msgpack, hostile content."""
    message = copy(message)
    kind = rng.randrange(6)
    spots = paths(message)
    if kind == 0 and spots:  # a field gets a hostile value
        path = rng.choice(spots)
        container(message, path)[path[-1]] = copy(rng.choice(HOSTILE_VALUES))
    elif kind == 1 and spots:  # a field disappears
        path = rng.choice(spots)
        holder = container(message, path)
        del holder[path[-1]]
    elif kind == 2:  # an unknown field, anywhere a map is
        maps = [message] + [container(message, (*p, None)) for p in spots
                            if isinstance(container(message, (*p, None)), dict)]
        rng.choice(maps)[rng.choice(["x", "Type", "ID", "meter_value"])] = copy(
            rng.choice(HOSTILE_VALUES))
    elif kind == 3:  # another tag
        message["type"] = rng.choice(TAGS)
    elif kind == 4:
        return with_raw(message, rng)
    else:  # the whole message replaced
        return encode(rng.choice([[message], message.get("id", 1), "ingest", None,
                                  list(message.items()), {1: 2}]))
    return encode(message)


def mutate_bytes(payload: bytes, rng: random.Random) -> bytes:
    """A byte-level mutation of a payload (the frame header is rebuilt to match)."""
    data = bytearray(payload)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        if not data:
            data = bytearray(b"\x80")
        at = rng.randrange(len(data))
        kind = rng.randrange(5)
        if kind == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[at] = rng.randrange(256)
        elif kind == 2:
            data[at:at] = rng.randbytes(rng.randrange(1, 5))
        elif kind == 3 and len(data) > 1:
            del data[at:at + rng.randrange(1, 5)]
        else:
            del data[max(1, at):]
    return bytes(data)


@dataclass
class Plan:
    """What one frame is, for the statistics."""

    kind: str  # seed type, or "random", "garbage"
    mutation: str  # "none", "message", "bytes", "raw", "length", "cut"


def make_frame(seed: dict[str, Any], rng: random.Random) -> tuple[bytes, Plan]:
    """One frame (header included; the header may lie) from a seed message."""
    roll = rng.random()
    kind = seed["type"]
    if roll < 0.12:
        return framed(encode(seed)), Plan(kind, "none")
    if roll < 0.45:
        return framed(mutate_message(seed, rng)), Plan(kind, "message")
    if roll < 0.75:
        return framed(mutate_bytes(encode(seed), rng)), Plan(kind, "bytes")
    if roll < 0.85:
        return framed(with_raw(copy(seed), rng)), Plan(kind, "raw")
    if roll < 0.95:
        return framed(rng.randbytes(rng.randrange(1, 200))), Plan("random", "raw")
    if roll < 0.98:  # the length prefix lies (a frame error or a stall ends most windows)
        payload = encode(seed)
        length = rng.choice([0, MAX_FRAME_BYTES + 1, 2**32 - 1, rng.randrange(1, 64),
                             max(1, len(payload) - rng.randrange(1, 8)),
                             len(payload) + rng.randrange(1, 8)])
        return HEADER.pack(length) + payload, Plan(kind, "length")
    if roll < 0.99:  # cut short
        whole = framed(encode(seed))
        return whole[:rng.randrange(1, len(whole))], Plan(kind, "cut")
    return rng.choice(GARBAGE), Plan("garbage", "raw")


# --------------------------------------------------------------------- the model


class HasId(msgspec.Struct):
    id: int | None = None


def frame_ids(payload: bytes) -> set[int]:
    """Every id the server may put in its reply to this frame: the one its typed decoder
    reads (which skips unknown keys unchecked, even invalid UTF-8 ones) and the one it
    recovers from an invalid request."""
    ids = {request_id_of(payload)}
    typed = read_as(payload, HasId)
    if typed is not None:
        ids.add(typed.id)
    return {i for i in ids if i is not None}


def request_id_of(payload: bytes) -> int | None:
    """The id the server reads from an invalid request (as ``engine.server`` does)."""
    try:
        fields = msgspec.msgpack.decode(payload, type=dict[str, msgspec.Raw])
        raw = fields.get("id")
        value = None if raw is None else msgspec.msgpack.decode(raw, type=int)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return None
    return value if value is not None and 0 <= value < 2**63 else None


class SeenEvent(msgspec.Struct, rename="camel"):
    """The fields of an acknowledged event the model needs. Decoded with the test's own
    structs: like the server, they skip unknown fields without looking into them (an
    unknown key may hold invalid UTF-8, which a plain decode would refuse)."""

    meter_api_name: str
    customer_id: str
    meter_value: msgspec.Raw
    unique_id: str | None = None


class SeenIngest(msgspec.Struct):
    events: list[SeenEvent]


class SeenRemoveLimit(msgspec.Struct, rename="camel"):
    limit_id: str


def read_as(payload: bytes, shape: type[Any]) -> Any:
    try:
        return msgspec.msgpack.decode(payload, type=shape)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None


EXACT = Context(prec=200)  # the engine sums exactly; the default context rounds to 28 digits


def exact(value: Any) -> Decimal:
    """A meter value as the engine reads it: ints exact, floats by their shortest repr,
    strings as decimals."""
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


@dataclass
class Model:
    """What the server acknowledged: meters, limits, totals, dedup keys."""

    meters: dict[str, Meter]
    limits: dict[str, Any] = field(default_factory=dict)
    sums: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    seen_unique: set[tuple[str, str, str]] = field(default_factory=set)
    accepted: int = 0
    problems: list[str] = field(default_factory=list)

    def ingest(self, payload: bytes, reply: IngestReply) -> None:
        message = read_as(payload, SeenIngest)
        if message is None:
            self.problems.append(f"acknowledged an ingest the test cannot read: {payload!r}"[:300])
            return
        accepted = duplicates = 0
        for event in message.events:
            meter, customer = event.meter_api_name, event.customer_id
            unique = event.unique_id
            if unique is not None:
                key = (meter, customer, unique)
                if key in self.seen_unique:
                    duplicates += 1
                    continue
                self.seen_unique.add(key)
            accepted += 1
            try:
                value = exact(msgspec.msgpack.decode(event.meter_value))
            except (TypeError, ValueError, InvalidOperation, msgspec.DecodeError):
                self.problems.append(f"acknowledged a value the test cannot read: {event!r}")
                continue
            if not value.is_finite():
                self.problems.append(f"acknowledged a value that is not finite: {event!r}")
            self.sums[meter, customer] = EXACT.add(self.sums.get((meter, customer), Decimal(0)),
                                                   value)
            self.counts[meter, customer] = self.counts.get((meter, customer), 0) + 1
        self.accepted += accepted
        if (reply.accepted, reply.duplicates) != (accepted, duplicates):
            self.problems.append(f"ack {reply!r} but the model says accepted={accepted} "
                                 f"duplicates={duplicates} for {message!r}"[:500])

    def meter(self, reply: MeterReply) -> None:
        stored = self.meters.get(reply.meter.name)
        if stored is None:
            self.meters[reply.meter.name] = reply.meter
        elif (stored.aggregation, stored.unique_dimension) != (
                reply.meter.aggregation, reply.meter.unique_dimension):
            self.problems.append(f"meter {reply.meter!r} replaced {stored!r}")

    def limit(self, reply: LimitReply) -> None:
        self.limits.pop(reply.limit.id, None)
        self.limits[reply.limit.id] = reply.limit

    def removed(self, payload: bytes, reply: RemovedReply) -> None:
        message = read_as(payload, SeenRemoveLimit)
        if message is None:
            self.problems.append(f"removed a limit the test cannot read: {payload!r}"[:300])
            return
        existed = self.limits.pop(message.limit_id, None) is not None
        if existed != reply.removed:
            self.problems.append(f"removed={reply.removed} for {message.limit_id!r}, "
                                 f"model: {existed}")


# --------------------------------------------------------------------- the fuzzer


def split_frames(data: bytes) -> tuple[list[bytes], bool, bytes]:
    """The complete frames the server reads from ``data`` (its framing, replayed), whether
    the stream ends in a frame error (zero or oversized length), and the bytes left over
    (a frame not complete yet)."""
    frames: list[bytes] = []
    at = 0
    while at + 4 <= len(data):
        (length,) = struct.unpack_from(">I", data, at)
        if length == 0 or length > MAX_FRAME_BYTES:
            return frames, True, b""
        if at + 4 + length > len(data):
            break
        frames.append(data[at + 4:at + 4 + length])
        at += 4 + length
    return frames, False, data[at:]


@dataclass
class Fuzzer:
    port: int
    model: Model
    rng: random.Random
    worker: int
    stats: collections.Counter[str] = field(default_factory=collections.Counter)

    def window(self, size: int) -> tuple[bytes, list[Plan]]:
        """Hello (now and then mutated) plus up to ``size`` frames whose ids are distinct,
        so that every reply with an id names one frame. The server's framing is replayed
        chunk by chunk: a lying length makes the next chunk part of the frame before."""
        hello = framed(encode(HELLO))
        plans = []
        if self.rng.random() < 0.03:
            hello, plan = make_frame(HELLO, self.rng)
            plans.append(Plan("hello", plan.mutation))
        chunks = [hello]
        frames, frame_error, pending = split_frames(hello)
        complete = len(frames)
        used: set[int] = set()
        request_id = self.rng.randrange(2**20) * 256
        while len(plans) < size and not frame_error:
            request_id += 1
            seeds = seed_messages(self.rng, self.worker, request_id)
            chunk, plan = make_frame(self.rng.choice(seeds), self.rng)
            frames, error, rest = split_frames(pending + chunk)
            named = [i for k, f in enumerate(frames) if complete + k >= 1
                     for i in frame_ids(f)]
            if len(named) != len(set(named)) or used.intersection(named):
                continue  # two frames would carry one id: make another
            used.update(named)
            complete += len(frames)
            frame_error, pending = error, rest
            chunks.append(chunk)
            plans.append(plan)
        return b"".join(chunks), plans

    async def run_window(self, size: int) -> int:
        data, plans = self.window(size)
        frames, frame_error, _ = split_frames(data)
        for plan in plans:
            self.stats[f"sent {plan.kind} / {plan.mutation}"] += 1
        replies = await exchange(self.port, data)
        self.stats["connections"] += 1
        self.stats["frames"] += len(plans)
        self.stats["bytes"] += len(data)
        self.account(frames, frame_error, replies)
        return len(plans)

    def account(self, frames: list[bytes], frame_error: bool, replies: list[Any]) -> None:
        """Every complete frame got exactly one reply; acknowledged changes go to the
        model."""
        problems = self.model.problems
        answers = [r for r in replies if not isinstance(r, AlertsPush | Lagged)]
        for reply in answers:
            if isinstance(reply, ErrorReply):
                self.stats[f"reply error {reply.code}"] += 1
                if reply.code in ("internal", "closed", "storage"):
                    problems.append(f"server error reply {reply!r}")
            else:
                self.stats[f"reply {type(reply).__name__}"] += 1
        if not frames:
            expected_answers = 1 if frame_error else 0
            if len(answers) != expected_answers:
                problems.append(f"{len(answers)} replies to a stream with no complete frame")
            return
        first = answers[0] if answers else None
        if not isinstance(first, Welcome):
            # The handshake failed: one error, the connection closed, nothing else read.
            if len(answers) != 1 or not isinstance(first, ErrorReply):
                problems.append(f"a failed handshake got {answers!r}"[:300])
            return
        requests = frames[1:]
        wanted = len(requests) + (1 if frame_error else 0)
        if len(answers) - 1 != wanted:
            problems.append(f"{len(answers) - 1} replies for {len(requests)} frames "
                            f"(frame error: {frame_error})")
        by_id = {i: f for f in requests for i in frame_ids(f)}
        for reply in answers[1:]:
            if isinstance(reply, IngestReply | MeterReply | LimitReply | RemovedReply):
                payload = by_id.get(reply.id)
                if payload is None:
                    problems.append(f"a reply for no frame sent: {reply!r}")
                    continue
                if isinstance(reply, IngestReply):
                    self.stats["acknowledged ingests"] += 1
                    self.stats["acknowledged events"] += reply.accepted
                    self.model.ingest(payload, reply)
                elif isinstance(reply, MeterReply):
                    self.model.meter(reply)
                elif isinstance(reply, LimitReply):
                    self.model.limit(reply)
                else:
                    self.model.removed(payload, reply)


async def exchange(port: int, data: bytes, timeout_s: float = 30.0) -> list[Any]:
    """Send ``data`` on a new connection, half-close, read every frame until the server
    closes. Fails if the server sends a malformed frame or keeps the connection open."""
    decoder = FrameDecoder(2**31)
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:

            async def send() -> None:
                try:
                    await stream.send_all(data)
                    await stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the server closed after a frame error: it reads no further

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while True:
                    try:
                        chunk = await stream.receive_some(1 << 16)
                    except trio.BrokenResourceError:
                        break  # reset after a frame error with unread bytes: still closed
                    if not chunk:
                        break
                    decoder.feed(chunk)
    messages = []
    while (payload := decoder.next_frame()) is not None:
        messages.append(decode_server_message(payload))
    assert decoder.buffered_bytes == 0, "the server sent half a frame"
    return messages


# ------------------------------------------------------------------- the clean client


@dataclass
class Clean:
    """Ingests and reads back its own meter's exact total, throughout."""

    port: int
    expected: int = 0
    batches: int = 0
    latencies: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    async def run(self, stop: trio.Event) -> None:
        rng = random.Random(7)
        async with open_client(HOST, self.port) as client:
            while not stop.is_set():
                now = now_ms()
                events = [Event(meter_api_name=CLEAN_METER, customer_id="clean",
                                meter_value=rng.randrange(1, 1000), meter_time_in_millis=now,
                                unique_id=f"clean-{self.batches}-{i}") for i in range(5)]
                started = time.perf_counter()
                ack = await client.ingest(events)
                self.latencies.append(time.perf_counter() - started)
                self.expected += sum(int(e.meter_value) for e in events)
                self.batches += 1
                if (ack.accepted, ack.duplicates) != (5, 0):
                    self.wrong.append(f"ack {ack!r}")
                started = time.perf_counter()
                result = await client.query(clean_query(now))
                self.latencies.append(time.perf_counter() - started)
                total = result.rows[0].value if result.rows else 0
                if total != self.expected:
                    self.wrong.append(f"total {total} after batch {self.batches}, "
                                      f"expected {self.expected}")
                await trio.sleep(0.01)


def clean_query(now: int) -> Query:
    minute = now // MINUTE * MINUTE
    return Query(meter_api_name=CLEAN_METER, start_ms=minute - 40 * DAY, end_ms=minute + DAY)


# ---------------------------------------------------------------------- the test


async def final_state(port: int, model: Model) -> list[str]:
    """Differences between the server's state and the model."""
    differences = []
    async with open_client(HOST, port) as client:
        meters = {m.name: m for m in await client.list_meters()}
        modelled = {**model.meters, CLEAN_METER: Meter(name=CLEAN_METER)}
        if meters != modelled:
            differences.append(f"meters {sorted(meters)} != model {sorted(modelled)}")
        limits = {limit.id: limit for limit in await client.list_limits()}
        if limits != model.limits:
            differences.append(f"limits {limits} != model {model.limits}")
        now = now_ms()
        minute = now // MINUTE * MINUTE
        for name, meter in meters.items():
            if name == CLEAN_METER or meter.aggregation not in ("sum", "count"):
                continue
            result = await client.query(Query(meter_api_name=name, start_ms=minute - 40 * DAY,
                                              end_ms=minute + DAY, group_by=["customer_id"]))
            got: dict[str | None, Decimal] = {
                row.group["customer_id"]: Decimal(row.value) for row in result.rows}
            table = model.sums if meter.aggregation == "sum" else model.counts
            want: dict[str | None, Decimal] = {
                customer: Decimal(value) for (m, customer), value in table.items() if m == name}
            if got != want:
                differing = {c: (got.get(c), want.get(c)) for c in {*got, *want}
                             if got.get(c) != want.get(c)}
                differences.append(f"{name}: customer: (server, model): {differing}"[:2000])
    return differences


async def fuzz(tmp_path: Path, frames_wanted: int, time_budget_s: float, workers: int,
               seed: int) -> dict[str, Any]:
    flags = ["--frame-timeout", "5", "--handshake-timeout", "5", "--idle-timeout", "30"]
    with serve_in(tmp_path, *flags) as server:
        async with open_client(HOST, server.port) as admin:
            fz = await admin.define_meter(Meter(name=FUZZ_METER))
            users = await admin.define_meter(Meter(name=UNIQUE_METER, aggregation="unique_count",
                                                   unique_dimension="user"))
            await admin.define_meter(Meter(name=CLEAN_METER))
        model = Model(meters={FUZZ_METER: fz, UNIQUE_METER: users})
        clean = Clean(server.port)
        fuzzers = [Fuzzer(server.port, model, random.Random(seed * 100 + w), w)
                   for w in range(workers)]
        sent = 0
        started = time.perf_counter()
        stop = trio.Event()

        async def work(fuzzer: Fuzzer) -> None:
            nonlocal sent
            while sent < frames_wanted and time.perf_counter() - started < time_budget_s:
                frames = await fuzzer.run_window(fuzzer.rng.choice([1, 8, 64, 200]))
                sent += frames
                if server.process.poll() is not None:
                    raise AssertionError(f"the server died: {server.log.read_text()[-3000:]}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(clean.run, stop)
            async with trio.open_nursery() as fuzzing:
                for fuzzer in fuzzers:
                    fuzzing.start_soon(work, fuzzer)
            stop.set()
        elapsed = time.perf_counter() - started
        assert server.process.poll() is None, "the server died"
        differences = await final_state(server.port, model)
        async with open_client(HOST, server.port) as client:
            stats = await client.stats()
        code = server.terminate()
        logged = server.errors_logged()
    counts: collections.Counter[str] = collections.Counter()
    for fuzzer in fuzzers:
        counts.update(fuzzer.stats)
    return {"sent": sent, "elapsed": elapsed, "counts": counts, "model": model, "clean": clean,
            "differences": differences, "stats": stats, "exit": code, "logged": logged,
            "server": server}


def report_and_check(result: dict[str, Any], frames_wanted: int) -> None:
    counts, model, clean = result["counts"], result["model"], result["clean"]
    print(f"\n{result['sent']} frames in {result['elapsed']:.1f} s "
          f"({result['sent'] / result['elapsed']:.0f} frames/s) on {counts['connections']} "
          f"connections, {counts['bytes'] / 2**20:.1f} MiB")
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")
    lat = clean.latencies
    print(f"clean client: {clean.batches} batches, total {clean.expected}, latency p50 "
          f"{1000 * percentile(lat, 0.5):.1f} ms p99 {1000 * percentile(lat, 0.99):.1f} ms "
          f"max {1000 * max(lat):.1f} ms")
    print(f"model: {model.accepted} events accepted, {len(model.meters)} meters, "
          f"{len(model.limits)} limits")
    assert result["exit"] == 0, "the server did not shut down cleanly"
    assert not result["logged"], result["logged"][:20]
    assert not model.problems, model.problems[:20]
    assert not result["differences"], result["differences"]
    assert not clean.wrong, clean.wrong[:5]
    # The engine applied exactly the acknowledged events (the clean client's included).
    assert result["stats"]["events_accepted"] == model.accepted + 5 * clean.batches, (
        result["stats"]["events_accepted"], model.accepted, clean.batches)
    # The run did what it says: enough frames, many acknowledged mutants, every kind of
    # error, and the clean client kept going with bounded latency.
    assert result["sent"] >= frames_wanted, result["sent"]
    assert counts["acknowledged ingests"] > 0 and model.accepted > 0
    for code in ("bad_message", "frame_error", "batch_rejected", "protocol_error"):
        assert counts[f"reply error {code}"] > 0, code
    assert clean.batches >= 20
    # Measured with a busy core beside it: p99 11-30 ms, max 45-400 ms over ~250 batches.
    assert percentile(lat, 0.99) < 1.0, f"clean client p99 {1000 * percentile(lat, 0.99):.1f} ms"


async def test_hostile_frames_fast(tmp_path: Path) -> None:
    """15,000 random and mutated frames; a few seconds."""
    seed = int(os.environ.get("HOSTILE_SEED", "1"))
    result = await fuzz(tmp_path, frames_wanted=15_000, time_budget_s=60, workers=3, seed=seed)
    report_and_check(result, 15_000)


@pytest.mark.slow
async def test_hostile_frames_soak(tmp_path: Path) -> None:
    """120,000 frames."""
    seed = int(os.environ.get("HOSTILE_SEED", "2"))
    result = await fuzz(tmp_path, frames_wanted=120_000, time_budget_s=900, workers=3,
                        seed=seed)
    report_and_check(result, 120_000)


# ------------------------------------------------------------ specific regressions

HOSTILE_AFTER_HELLO: list[tuple[str, bytes, str, int | None]] = [
    # (name, payload, expected error code, expected id); the connection stays open. The id
    # of a map nested too deep to walk is not recovered (best effort, protocol.md 11.1).
    ("deep array in an unknown field",
     b"\x83\xa4type\xa4ping\xa2id\x05\xa1x" + DEEP_ARRAY, "bad_message", None),
    ("deep map in an unknown field",
     b"\x83\xa4type\xa4ping\xa2id\x06\xa1x" + DEEP_MAP, "bad_message", None),
    ("deep array in the events", b"\x83\xa4type\xa6ingest\xa2id\x07\xa6events" + DEEP_ARRAY,
     "bad_message", None),
    ("a deep array alone", DEEP_ARRAY, "bad_message", None),
    ("array32 of 4 billion", b"\x82\xa4type\xa4ping\xa2id\xdd\xff\xff\xff\xff", "bad_message",
     None),
    ("invalid UTF-8 in the tag", b"\x82\xa4type\xa3\xff\xfe\xfd\xa2id\x08", "bad_message", 8),
    ("NaN meter value", encode({"type": "ingest", "id": 9, "events": [
        {"meterApiName": FUZZ_METER, "customerId": "c", "meterValue": float("nan"),
         "meterTimeInMillis": 1}]}), "batch_rejected", 9),
]


async def test_hostile_payloads_get_an_error_and_the_connection_stays_open(
    tmp_path: Path,
) -> None:
    """Each payload after a hello gets its error frame; a ping after it is still answered.
    A deep structure in the hello itself is refused with an error frame too."""
    with serve_in(tmp_path) as server:
        async with open_client(HOST, server.port) as admin:
            await admin.define_meter(Meter(name=FUZZ_METER))
        hello = framed(encode(HELLO))
        ping = framed(encode({"type": "ping", "id": 99}))
        for name, payload, code, request_id in HOSTILE_AFTER_HELLO:
            replies = await exchange(server.port, hello + framed(payload) + ping)
            got = [(getattr(r, "code", type(r).__name__), getattr(r, "id", None))
                   for r in replies]
            assert got == [("Welcome", None), (code, request_id), ("Pong", 99)], (name, replies)
        deep_hello = b"\x84" + encode(HELLO)[1:] + b"\xa1x" + DEEP_ARRAY
        replies = await exchange(server.port, framed(deep_hello))
        assert [getattr(r, "code", None) for r in replies] == ["protocol_error"], replies
        assert server.terminate() == 0
        assert not server.errors_logged(), server.errors_logged()
