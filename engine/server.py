"""The TCP server: trio around the sans-IO protocol and the embedded engine.

Shell layer: trio, ``engine.protocol``, ``engine.auth``, ``engine.budget``,
``engine.server_connection`` (one connection's tasks) and the runtime's ``Engine``.

Policy, per connection (each is a task with its own small nursery):

- With ``ssl_context`` set, the stream is TLS (``trio.SSLStream``): the TLS
  handshake must finish within ``handshake_timeout_s`` (a plain-TCP client, a
  failed or a stalled handshake is counted as a protocol error and closed;
  nothing else sees it), and the hello timeout starts after it.
- The first frame must be ``hello`` within ``handshake_timeout_s``, with the
  protocol version and, when keys are configured, a valid API key; otherwise
  the server answers with an error frame and closes.
- Requests are read one frame at a time and each runs in its own task, so many
  can be in flight (pipelining). At most ``max_in_flight`` per connection: the
  reader stops reading while that many are running, which pushes back on a
  client that sends faster than the engine commits (TCP flow control does the
  rest). Replies go through a bounded queue (``max_in_flight`` frames) to one
  writer task. Memory per connection is thus bounded: at most ``max_in_flight``
  requests running, each holding its frame and then its reply until the reply
  is queued, plus ``max_in_flight`` queued replies and the one being written.
  A client that reads nothing therefore pins at most about
  ``2 * max_in_flight + 1`` replies (tests/test_load.py measures it).
- A frame must complete within ``frame_timeout_s`` once it started (slow
  senders), a connection with nothing in flight is closed after
  ``idle_timeout_s``, and a client that does not read its replies for
  ``send_timeout_s`` is disconnected.
- A bad frame (zero length, over ``max_frame_bytes``, garbage such as an HTTP
  request) means the stream is out of sync: error frame, then close. A frame
  that decodes but is not a valid message gets an error frame and the
  connection stays open. Neither ever reaches the engine, so neither changes
  state; other connections are unaffected.
- On shutdown the server stops accepting, stops reading new requests, lets
  in-flight ones finish for up to ``drain_timeout_s`` (a batch is either
  committed and acknowledged or not acknowledged; the engine never applies half
  a batch), then closes.

The protocol rules themselves (handshake, frame and reply limits, bad
requests) are in ``engine.protocol.connection``; this module keeps the
timeouts, the request budget and the tasks. The accept loop's policy is on
``MeterServer.serve``.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
from dataclasses import dataclass, field

import trio

from engine.auth import KeyRing
from engine.budget import ByteBudget
from engine.errors import InsecureBind, MeteringError, ServerBusy
from engine.pricing.engine import PricedEngine as Engine
from engine.protocol.connection import MAX_HELLO_BYTES, encode_message_frame, error_reply
from engine.protocol.framing import MAX_FRAME_BYTES
from engine.server_connection import (
    LAG_NOTICE,
    MAX_SUBSCRIPTIONS,
    PUSH_BATCH,
    RECEIVE_CHUNK_BYTES,
    REQUEST_HANDLERS,
    REQUEST_MEMORY_FACTOR,
    REQUIRED_SCOPE,
    SERVER_NAME,
    RequestHandler,
    ServerSideConnection,
)

__all__ = [
    "ACCEPT_RETRY_S",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "LAG_NOTICE",
    "MAX_HELLO_BYTES",
    "MAX_SUBSCRIPTIONS",
    "PUSH_BATCH",
    "RECEIVE_CHUNK_BYTES",
    "REQUEST_HANDLERS",
    "REQUEST_MEMORY_FACTOR",
    "REQUIRED_SCOPE",
    "SERVER_NAME",
    "ByteBudget",
    "InsecureBind",
    "MeterServer",
    "RequestHandler",
    "ServerConfig",
    "ServerStatistics",
    "check_bind",
    "server_ssl_context",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7433
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# accept() errors that mean "out of file descriptors or memory for now", as in
# trio.serve_listeners: retried, not fatal.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# How long to sleep after one of those before calling accept() again.
ACCEPT_RETRY_S = 0.1
# Closing a connection never waits longer than this (a TLS close_notify to a peer that
# does not read, say); past it the socket is closed without the goodbye.
CLOSE_TIMEOUT_S = 1.0


def check_bind(host: str, *, keys_enabled: bool, tls: bool, allow_insecure_bind: bool,
               what: str = "listen") -> None:
    """Refuse (``InsecureBind``) a non-loopback ``host`` without API keys or without TLS,
    unless ``allow_insecure_bind``: beyond loopback, keys must exist and must not cross
    the network in clear. Loopback is always allowed. Called before anything binds."""
    if allow_insecure_bind or host in LOOPBACK_HOSTS:
        return
    missing = [need for need, present in (("API keys", keys_enabled), ("TLS", tls))
               if not present]
    if missing:
        raise InsecureBind(
            f"refusing to {what} on {host!r} without {' and '.join(missing)}: configure "
            "keys (--keys FILE or $METER_API_KEYS) and TLS (--tls-cert FILE --tls-key FILE), "
            "bind to 127.0.0.1, or pass --allow-insecure-bind"
        )


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later, Python's defaults otherwise) holding
    the PEM certificate chain in ``cert_file`` and its private key in ``key_file``.

    The key must not be encrypted: OpenSSL would otherwise prompt for its password on
    the terminal, and a server started by a supervisor would wait there forever."""

    def no_password() -> str:
        raise ssl.SSLError(f"the private key in {key_file!r} is encrypted; give the server "
                           "an unencrypted key (openssl pkey -in KEY -out PLAIN_KEY)")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert_file, keyfile=key_file, password=no_password)
    return context



@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    keys: KeyRing = field(default_factory=lambda: KeyRing(()))
    allow_insecure_bind: bool = False
    # TLS on every connection when set (``server_ssl_context`` makes one from PEM files);
    # required beyond loopback unless ``allow_insecure_bind``.
    ssl_context: ssl.SSLContext | None = None
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_reply_bytes: int = 256 * 1024 * 1024
    max_in_flight: int = 16
    max_connections: int = 1024
    # Server-wide: memory for requests read but not yet answered (REQUEST_MEMORY_FACTOR
    # times their wire size) plus replies not yet sent, over all connections. Beyond it,
    # connections wait before reading another frame body (backpressure).
    max_request_bytes_in_flight: int = 64 * 1024 * 1024
    handshake_timeout_s: float = 10.0
    frame_timeout_s: float = 30.0
    idle_timeout_s: float = 300.0
    send_timeout_s: float = 30.0
    drain_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """What ``MeterServer.statistics()`` returns: counters at the moment of the call.

    The ``stats`` request sends these with a ``server_`` prefix beside the engine's.
    """

    connections: int = 0
    """Connections open now (past the connection limit check)."""
    connections_total: int = 0
    """Connections accepted since the server started."""
    requests: int = 0
    """Requests answered (with a reply or an error), not counting refused frames."""
    events_ingested: int = 0
    """Events accepted by ingest requests (not duplicates)."""
    protocol_errors: int = 0
    """Frames refused: bad frames and messages, failed handshakes, timeouts."""
    refused_connections: int = 0
    """Connections refused at the connection limit (``busy``)."""


@dataclass(slots=True)
class _ServerCounters:
    """The mutable counters behind ``ServerStatistics``; written only by the server."""

    connections: int = 0
    connections_total: int = 0
    requests: int = 0
    events_ingested: int = 0
    protocol_errors: int = 0
    refused_connections: int = 0


class MeterServer:
    """Serves one engine over TCP. Use ``serve`` (or ``nursery.start(server.serve)``)."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None, *,
                 request_budget: ByteBudget | None = None) -> None:
        """``request_budget``: share one with another shell (HTTP) of the same process;
        by default the server makes its own of ``config.max_request_bytes_in_flight``."""
        self.engine = engine
        self.config = config or ServerConfig()
        self._counters = _ServerCounters()
        self.port: int | None = None
        self._draining = trio.Event()
        self.request_budget = request_budget or ByteBudget(
            self.config.max_request_bytes_in_flight)
        self._reader_scopes: set[trio.CancelScope] = set()
        check_bind(self.config.host, keys_enabled=self.config.keys.enabled,
                   tls=self.config.ssl_context is not None,
                   allow_insecure_bind=self.config.allow_insecure_bind)

    def statistics(self) -> ServerStatistics:
        """The server's counters now (an immutable snapshot)."""
        counters = self._counters
        return ServerStatistics(
            connections=counters.connections, connections_total=counters.connections_total,
            requests=counters.requests, events_ingested=counters.events_ingested,
            protocol_errors=counters.protocol_errors,
            refused_connections=counters.refused_connections)

    @property
    def stats(self) -> ServerStatistics:
        """``statistics()``, under the attribute name it had before (read-only)."""
        return self.statistics()

    # ------------------------------------------------------------- listening

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``config.host``/``config.port`` until cancelled or ``shutdown``.

        Reports the bound port through ``task_status`` (so ``port = await
        nursery.start(server.serve)`` works with port 0) and sets ``self.port``.

        Resource handling:
            Each accepted connection runs in its own task in a nursery this call
            owns, so ``serve`` returns only once every connection is closed. On
            ``shutdown`` the listeners stop accepting, readers stop reading, and
            connections get ``drain_timeout_s`` to answer what they already read,
            after which they are cancelled. Listeners are closed on the way out, even
            when cancelled. Past ``max_connections``, a new connection gets a
            ``busy`` error frame and is closed.

        Error handling:
            An ``accept`` failing with EMFILE, ENFILE, ENOMEM or ENOBUFS (out of file
            descriptors or memory) is logged and retried after ``ACCEPT_RETRY_S``;
            any other ``accept`` error propagates. A connection whose peer goes away
            ends quietly; an unexpected error in a connection is logged and closes
            that connection only.
        """
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        try:
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, handlers)
                    task_status.started(self.port)
                    await self._draining.wait()
                    acceptors.cancel_scope.cancel()
                # Connections stop reading; requests in flight finish and are acknowledged.
                # Whatever is still running after the drain timeout is cancelled.
                handlers.cancel_scope.deadline = trio.current_time() + self.config.drain_timeout_s
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    def shutdown(self) -> None:
        """Stop accepting and reading; in-flight requests get ``drain_timeout_s`` to finish."""
        self._draining.set()
        for scope in self._reader_scopes:
            scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    log.error("accept returned %s (%s); retrying in %.0f ms",
                              errno.errorcode[exc.errno], os.strerror(exc.errno),
                              ACCEPT_RETRY_S * 1000, exc_info=True)
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
                raise
            handlers.start_soon(self._connection, stream)

    # ------------------------------------------------------------ connection

    async def _connection(self, socket_stream: trio.SocketStream) -> None:
        counters = self._counters
        stream: trio.abc.Stream = socket_stream
        if self.config.ssl_context is not None:
            stream = trio.SSLStream(socket_stream, self.config.ssl_context, server_side=True)
        if counters.connections >= self.config.max_connections:
            counters.refused_connections += 1
            await self._send_and_close(stream, ServerBusy("too many connections"))
            return
        counters.connections += 1
        counters.connections_total += 1
        try:
            if isinstance(stream, trio.SSLStream) and not await self._tls_handshake(stream):
                return
            await ServerSideConnection(self, stream).run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        except* Exception:
            log.exception("connection handler failed")
        finally:
            counters.connections -= 1
            await _close(stream)

    async def _tls_handshake(self, stream: trio.SSLStream[trio.SocketStream]) -> bool:
        """The TLS handshake within ``handshake_timeout_s``; ``False`` if it failed (a
        plain-TCP client, an untrusted certificate) or stalled, and the caller closes."""
        with trio.move_on_after(self.config.handshake_timeout_s) as timer:
            try:
                await stream.do_handshake()
                return True
            except trio.BrokenResourceError as exc:
                reason: object = exc.__cause__ or exc
        if timer.cancelled_caught:
            reason = f"not finished within {self.config.handshake_timeout_s} s"
        self._counters.protocol_errors += 1
        log.info("closing a connection whose TLS handshake failed: %s", reason)
        return False

    async def _send_and_close(self, stream: trio.abc.Stream, error: MeteringError) -> None:
        # Over TLS the send includes the handshake: both within the same second.
        with trio.move_on_after(1):
            try:
                await stream.send_all(encode_message_frame(error_reply(error)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await _close(stream)


async def _close(stream: trio.abc.Stream) -> None:
    """Close ``stream`` even when cancelled, within ``CLOSE_TIMEOUT_S``: an ``SSLStream``
    sends close_notify first (and, with its handshake unfinished, would try to finish it);
    cancelling that closes the socket without it."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
        await stream.aclose()
