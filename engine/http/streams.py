"""Server-sent event streams: ``/alerts/stream``, ``/api/stats/stream``, and the
short-lived tokens (``POST /api/stream-token``) a browser's ``EventSource`` passes as
``?token=`` because it cannot send headers.

Shell layer: trio, the engine's public API (``Engine.subscribe``,
``Engine.statistics``), ``engine.http``. Each stream is an ``app.StreamResponse``:
the app ends it when the client goes away or the server drains.

Invariants:

- ``/alerts/stream``: each alert is one event whose ``id:`` is its seq, so a
  client that reconnects with ``Last-Event-ID: N`` gets every alert from N+1 on,
  none twice, none skipped (the engine's alert log is gap-free by seq).
  ``?fromSeq=`` says where to start on a first connection; without either, the
  stream starts at the next alert. ``Last-Event-ID`` wins over ``fromSeq``
  (``EventSource`` reconnects to the same URL, adding the header).
- A customer-bound principal (key or token) gets only its customer's alerts.
- A comment (``: keep-alive``) goes out when nothing else did for
  ``keep_alive_s``, so proxies and clients can tell a quiet stream from a dead one.
"""

from __future__ import annotations

import msgspec
import trio

from engine import Alert
from engine.http.app import (
    ANY_KEY,
    Request,
    Response,
    Router,
    StreamResponse,
    Write,
    json_response,
)
from engine.http.codecs import encode_json
from engine.http.errors import bad_request
from engine.http.limits import from_seq_param
from engine.http.tokens import issue_token

KEEP_ALIVE = b": keep-alive\n\n"
MAX_EVENTS_PER_WRITE = 256


class StreamToken(msgspec.Struct, rename="camel"):
    token: str
    expires_at_ms: int


class StatsEvent(msgspec.Struct, rename="camel"):
    at_ms: int
    events_accepted: int
    events_duplicate: int
    batches: int
    events_per_second: float  # accepted since the previous event, per second


def _start_seq(request: Request) -> int:
    last_id = request.headers.get("last-event-id")
    if last_id is not None and last_id.strip():
        try:
            seen = int(last_id.strip())
        except ValueError:
            seen = -2
        if seen < -1:
            raise bad_request(f"Last-Event-ID must be an alert seq, got {last_id!r}")
        return seen + 1
    from_seq = from_seq_param(request)
    return from_seq if from_seq is not None else request.engine.next_alert_seq()


def _alert_event(alert: Alert) -> bytes:
    return b"id: %d\nevent: alert\ndata: %s\n\n" % (alert.seq, encode_json(alert))


async def alert_stream(request: Request) -> StreamResponse:
    from_seq = _start_seq(request)
    engine = request.engine
    bound = request.principal.customer_id
    keep_alive_s = request.app.streams.keep_alive_s

    async def produce(write: Write) -> None:
        async with engine.subscribe(from_seq) as subscription:
            await write(f": alerts from seq {from_seq}\n\n".encode())
            written_at = trio.current_time()
            while True:
                batch = None
                with trio.move_on_at(written_at + keep_alive_s):
                    batch = await subscription.receive_batch(MAX_EVENTS_PER_WRITE)
                if batch is None:
                    await write(KEEP_ALIVE)
                    written_at = trio.current_time()
                    continue
                events = [_alert_event(alert) for alert in batch
                          if bound is None or alert.customer_id == bound]
                if events:
                    await write(b"".join(events))
                    written_at = trio.current_time()

    return StreamResponse(produce)


async def stats_stream(request: Request) -> StreamResponse:
    engine = request.engine
    app = request.app
    interval_s = app.streams.stats_interval_s

    async def produce(write: Write) -> None:
        await write(f": engine statistics every {interval_s} s\n\n".encode())
        previous = engine.statistics().events_accepted
        previous_at = trio.current_time()
        while True:
            await trio.sleep(interval_s)
            stats = engine.statistics()
            now = trio.current_time()
            rate = (stats.events_accepted - previous) / max(now - previous_at, 1e-9)
            previous, previous_at = stats.events_accepted, now
            event = StatsEvent(app.clock_ms(), stats.events_accepted, stats.events_duplicate,
                               stats.batches, round(rate, 3))
            await write(b"event: stats\ndata: %s\n\n" % encode_json(event))

    return StreamResponse(produce)


async def stream_token(request: Request) -> Response:
    app = request.app
    expires_ms = app.clock_ms() + app.streams.token_ttl_ms
    return json_response(StreamToken(issue_token(app.token_secret, request.principal,
                                                 expires_ms), expires_ms))


def add_routes(router: Router) -> None:
    router.add("GET", "/alerts/stream", alert_stream, "query", token_auth=True)
    router.add("GET", "/api/stats/stream", stats_stream, "admin", token_auth=True)
    router.add("POST", "/api/stream-token", stream_token, ANY_KEY)
