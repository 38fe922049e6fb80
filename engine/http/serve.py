"""``serve_http``: the HTTP shell around an engine, on Hypercorn's trio worker.

Shell layer: trio, Hypercorn, ``engine.auth``, ``engine.server`` (its bind
policy) and ``engine.http``.

Why Hypercorn: it is a maintained ASGI server whose trio worker runs in the
caller's trio event loop (``hypercorn.trio.serve``), so the HTTP shell shares
the process, the engine and its actors with the TCP server. It speaks HTTP/1.1
through h11 (keep-alive, pipelining, body flow control: the app pulls body
chunks, so a body over the limit is refused before it is read whole), and it
brings HTTP/2, timeouts and its own TLS for later. The app is a small ASGI
router of ours (``engine.http.app``), not a framework.

Resource policy: the listener is bound before ``task_status.started`` reports
the server, so a caller may attach the engine later (``HttpServer.attach``),
when recovery has ended; until then every route but ``/healthz`` answers 503.
Like the TCP server (``engine.server.check_bind``), it refuses a non-loopback
bind without API keys or without TLS unless ``allow_insecure_bind``. TLS is
Hypercorn's own (``tls_cert_file`` and ``tls_key_file``, PEM); a handshake
must finish within ``tls_handshake_timeout_s``. Idle keep-alive connections close after
``keep_alive_timeout_s``; a connection that sends nothing for
``read_timeout_s`` is closed; a body must arrive whole within
``body_timeout_s`` (408), and waits, before it is read, for room in the
``request_budget`` when one is given (the TCP server's, to share it). On
shutdown, requests in flight get ``drain_timeout_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from engine import Engine
from engine.auth import KeyRing
from engine.http import (
    amberflo,
    corrections,
    customers,
    events,
    explorer,
    limits,
    native,
    openmeter,
    pricing,
    streams,
    webhooks,
)
from engine.http.app import HttpApp, HttpLimits, Router
from engine.http.metrics import HttpMetrics
from engine.server import ByteBudget, MeterServer, check_bind

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 7434


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT
    keys: KeyRing = field(default_factory=lambda: KeyRing(()))
    allow_insecure_bind: bool = False
    # HTTPS when both are set: PEM files, loaded by Hypercorn when it binds.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_handshake_timeout_s: float = 10.0
    max_body_bytes: int = HttpLimits.max_body_bytes
    body_timeout_s: float = HttpLimits.body_timeout_s
    # Pass the TCP server's ``request_budget`` to share one server-wide memory budget.
    request_budget: ByteBudget | None = None
    keep_alive_timeout_s: float = 30.0
    read_timeout_s: int = 30
    drain_timeout_s: float = 10.0
    clock_ms: Callable[[], int] | None = None  # "now" when a usage query has no end


def build_router() -> Router:
    router = Router()
    amberflo.add_routes(router)
    customers.add_routes(router)
    limits.add_routes(router)
    streams.add_routes(router)
    native.add_routes(router)
    openmeter.add_routes(router)
    pricing.add_routes(router)
    webhooks.add_routes(router)
    explorer.add_routes(router)
    events.add_routes(router)
    corrections.add_routes(router)
    return router


class HttpServer:
    """One HTTP listener serving one engine. Start it with ``nursery.start(server.serve)``."""

    def __init__(self, engine: Engine | None, config: HttpConfig | None = None) -> None:
        self.config = config = config or HttpConfig()
        if (config.tls_cert_file is None) != (config.tls_key_file is None):
            raise ValueError("HTTP TLS needs both tls_cert_file and tls_key_file")
        check_bind(config.host, keys_enabled=config.keys.enabled,
                   tls=config.tls_cert_file is not None,
                   allow_insecure_bind=config.allow_insecure_bind, what="serve HTTP")
        self.metrics = HttpMetrics()
        self.app = HttpApp(build_router(), config.keys, HttpLimits(
            config.max_body_bytes, config.body_timeout_s, config.request_budget),
                           self.metrics, clock_ms=config.clock_ms)
        if engine is not None:
            self.attach(engine)
        self.port: int | None = None
        self._shutdown = trio.Event()

    def attach(self, engine: Engine) -> None:
        """Serve ``engine`` from now on (routes answered 503 before)."""
        self.app.attach(engine)

    def attach_tcp(self, server: MeterServer) -> None:
        """Report ``server``'s connections and requests in ``/metrics`` too."""
        self.metrics.attach_tcp(server)

    def attach_webhooks(self, dispatcher: webhooks.WebhookDispatcher) -> None:
        """Serve ``/webhooks/*`` and the webhook metrics from ``dispatcher``."""
        self.app.webhooks = dispatcher
        self.metrics.attach_webhooks(dispatcher)

    def shutdown(self) -> None:
        """Stop accepting; requests in flight get ``drain_timeout_s`` to finish, and open
        event streams end now (they would otherwise hold the drain until its end)."""
        self.app.close_streams()
        self._shutdown.set()

    async def serve(self, task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        config = self.config
        hypercorn_config = Config()
        host = f"[{config.host}]" if ":" in config.host else config.host
        hypercorn_config.bind = [f"{host}:{config.port}"]
        hypercorn_config.keep_alive_timeout = config.keep_alive_timeout_s
        hypercorn_config.read_timeout = config.read_timeout_s
        hypercorn_config.graceful_timeout = config.drain_timeout_s
        hypercorn_config.include_server_header = False
        hypercorn_config.accesslog = None
        hypercorn_config.certfile = config.tls_cert_file
        hypercorn_config.keyfile = config.tls_key_file
        hypercorn_config.ssl_handshake_timeout = config.tls_handshake_timeout_s
        hypercorn_config.errorlog = logging.getLogger("hypercorn.error")

        def started(binds: list[str] | None = None) -> None:
            # "http://127.0.0.1:54321" (https with TLS): the port the kernel chose for port 0.
            assert binds
            self.port = int(binds[0].rsplit(":", 1)[1])
            log.info("HTTP listening on %s", binds[0])
            task_status.started(self)

        await serve(cast(Any, self.app), hypercorn_config, shutdown_trigger=self._shutdown.wait,
                    task_status=_Started(started), mode="asgi")


class _Started:
    """Adapts Hypercorn's ``task_status.started(binds)`` to reporting the server."""

    def __init__(self, callback: Callable[[list[str] | None], None]) -> None:
        self._callback = callback

    def started(self, value: list[str] | None = None) -> None:
        self._callback(value)


async def serve_http(
    engine: Engine | None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_HTTP_PORT,
    keys: KeyRing | None = None,
    config: HttpConfig | None = None,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``engine`` over HTTP until cancelled; reports the ``HttpServer`` once bound.

    ``config`` gives every other setting; ``host``, ``port`` and ``keys`` override it.
    Pass ``engine=None`` to bind first and ``server.attach(engine)`` after recovery.
    """
    base = config or HttpConfig()
    base = HttpConfig(**{**base.__dict__, "host": host, "port": port,
                         "keys": keys if keys is not None else base.keys})
    server = HttpServer(engine, base)
    await server.serve(task_status=task_status)
