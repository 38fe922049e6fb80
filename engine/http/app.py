"""The ASGI application: routing, authentication, error mapping, metrics per request.

Shell layer: imports ``engine.auth``, ``engine.errors`` and the other
``engine.http`` modules; it never reaches into the runtime. Routes are
registered by ``engine.http.amberflo``, ``customers``, ``limits``, ``streams``
and ``native``; a path may hold ``{name}`` segments (``/customers/{id}``).

Invariants:

- Every route answers with and without a trailing slash, and never redirects
  (a 301/302 makes ``requests`` turn a POST into a GET and drop the body).
- Every success is 200 (the Amberflo SDK treats anything else as an error), but
  OpenMeter's ingest, which answers 204 as OpenMeter does.
- Every answer that is not a success is JSON (``engine.http.errors``): an
  unknown route is a 404, a known path with the wrong method a 405.
- A route declares the scope it needs; the key comes in ``X-API-KEY`` or
  ``Authorization: Bearer``. No keys configured: every request is admin.
  Wrong or missing key 401; key without the scope 403.
- Until an engine is attached, every route but ``/healthz`` answers 503 with
  ``Retry-After`` (the listener may bind before recovery ends).
- A stream route (``token_auth``) also takes a short-lived ``?token=``
  (``engine.http.tokens``) in place of a key header, and answers a
  ``StreamResponse``: it runs until the client goes away or the server drains,
  never longer.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import trio

from engine import Engine
from engine.auth import KeyRing, Principal
from engine.errors import MeteringError
from engine.http.codecs import BodyReader, encode_json
from engine.http.errors import RETRY_AFTER_SECONDS, HttpError, from_engine_error
from engine.http.metrics import HttpMetrics
from engine.http.tokens import verify_token
from engine.server import REQUEST_MEMORY_FACTOR, ByteBudget

if TYPE_CHECKING:
    from engine.http.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)

ANY_KEY = "any"  # a route scope: any valid key (or none, when no keys are configured)
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 16 * 1024 * 1024  # received and, for gzip, inflated
    body_timeout_s: float = 30.0  # a body must arrive whole within this, once its read began
    # Shared with the TCP server when given: bodies wait for room before they are read.
    request_budget: ByteBudget | None = None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Write = Callable[[bytes], Awaitable[None]]


@dataclass
class StreamResponse:
    """A 200 whose body ``produce(write)`` writes piece by piece (server-sent events).

    The app runs ``produce`` until it returns, the client goes away (ASGI
    ``http.disconnect``) or the server shuts down, whichever comes first.
    """

    produce: Callable[[Write], Awaitable[None]]
    status: int = 200  # always: the status is sent before the first event
    content_type: bytes = b"text/event-stream; charset=utf-8"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass
class StreamSettings:
    keep_alive_s: float = 15.0  # an SSE comment this often, so proxies keep the stream open
    stats_interval_s: float = 1.0  # /api/stats/stream: one event per interval
    token_ttl_ms: int = 60_000  # /api/stream-token: how long a token is good for
    # How often a stream looks whether the server is draining (see ``_stream``).
    shutdown_poll_s: float = 0.25


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, encode_json(value))


def text_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), TEXT)


class Request:
    """One HTTP request as the handlers see it."""

    def __init__(self, app: HttpApp, scope: dict[str, Any], receive: Receive,
                 principal: Principal) -> None:
        self.app = app
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.principal = principal
        self.path_params: dict[str, str] = {}  # the ``{name}`` segments of the route's path
        self.headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                        for name, value in scope.get("headers", [])}
        self._query = parse_qs(scope.get("query_string", b"").decode("latin-1"),
                               keep_blank_values=True)
        self._receive = receive
        self.charged_bytes = 0  # of the request budget, given back when the answer is sent

    @property
    def engine(self) -> Engine:
        engine = self.app.engine
        assert engine is not None  # checked before any handler that needs it runs
        return engine

    def param(self, name: str) -> str | None:
        values = self._query.get(name)
        return values[-1] if values else None

    def params(self, name: str) -> list[str]:
        return self._query.get(name, [])

    async def body(self) -> bytes:
        """The whole body (inflated if gzip), refused with 413 past the size limit."""
        length_text = self.headers.get("content-length")
        try:
            length = int(length_text) if length_text is not None else None
        except ValueError:
            raise HttpError(400, "bad_request", "Content-Length is not an integer") from None
        limits = self.app.limits
        reader = BodyReader(self._receive, limits.max_body_bytes, length,
                            self.headers.get("content-encoding", ""))
        if length is not None and length > limits.max_body_bytes:
            return await reader.read()  # refused at once, nothing to charge
        if limits.request_budget is not None and not self.charged_bytes:
            # As on TCP: budget first, body second (the decoded body is what costs memory).
            wanted = min(length if length is not None else limits.max_body_bytes,
                         limits.max_body_bytes)
            self.charged_bytes = await limits.request_budget.acquire(
                max(wanted, 1) * REQUEST_MEMORY_FACTOR)
        with trio.move_on_after(limits.body_timeout_s) as timeout:
            return await reader.read()
        assert timeout.cancelled_caught
        raise HttpError(408, "timeout", f"the body did not arrive within "
                                        f"{limits.body_timeout_s} s")


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # without a trailing slash
    handler: Handler
    scope: str | None  # the API-key scope needed; None: no key needed
    needs_engine: bool = True
    name: str = ""
    # Streams may also be authenticated by ``?token=`` (browsers' EventSource cannot
    # send headers); see engine.http.streams.
    token_auth: bool = False


class Router:
    """Routes by exact path, then by template: a ``{name}`` segment matches one
    non-empty path segment, given to the handler in ``path_params``. ASGI gives the
    path percent-decoded, so an id holding ``/`` cannot be named in a path (use a
    query form). An exact path wins over a template."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Route]] = {}
        self._templates: list[tuple[tuple[str, ...], str]] = []  # (segments, template)

    def add(self, method: str, path: str, handler: Handler, scope: str | None, *,
            needs_engine: bool = True, token_auth: bool = False) -> None:
        path = normalise(path)
        if "{" in path and path not in self._routes:
            self._templates.append((tuple(path.split("/")), path))
        self._routes.setdefault(path, {})[method] = Route(
            method, path, handler, scope, needs_engine, path, token_auth)

    def match(self, method: str, path: str) -> Route:
        return self.resolve(method, path)[0]

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for ``method`` and ``path``, and the values of its ``{name}`` segments."""
        path = normalise(path)
        params: dict[str, str] = {}
        by_method = self._routes.get(path) if "{" not in path else None
        if by_method is None:
            segments = path.split("/")
            for template_segments, template in self._templates:
                found = _match_template(template_segments, segments)
                if found is not None:
                    by_method, params = self._routes[template], found
                    break
        if by_method is None:
            raise HttpError(404, "not_found", f"no route {path!r}")
        route = by_method.get(method)
        if route is None and method == "HEAD":
            route = by_method.get("GET")
        if route is None:
            allowed = ", ".join(sorted(by_method))
            raise HttpError(405, "method_not_allowed", f"{method} is not allowed on {path!r}",
                            headers=[(b"allow", allowed.encode())])
        return route, params

    def routes(self) -> list[Route]:
        return [route for by_method in self._routes.values() for route in by_method.values()]


def _match_template(template: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    if len(template) != len(segments):
        return None
    params = {}
    for expected, actual in zip(template, segments, strict=True):
        if expected.startswith("{") and expected.endswith("}"):
            if not actual:
                return None
            params[expected[1:-1]] = actual  # ASGI's path is already percent-decoded
        elif expected != actual:
            return None
    return params


def normalise(path: str) -> str:
    stripped = path.rstrip("/")
    return stripped or "/"


def presented_key(headers: dict[str, str]) -> str | None:
    """The API key from ``X-API-KEY`` (Amberflo) or ``Authorization: Bearer`` (OpenMeter)."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


class HttpApp:
    """An ASGI 3 application around one engine (attached now or when recovery ends)."""

    def __init__(self, router: Router, keys: KeyRing, limits: HttpLimits,
                 metrics: HttpMetrics, engine: Engine | None = None,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.router = router
        self.keys = keys
        self.limits = limits
        self.metrics = metrics
        self.engine = engine
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.streams = StreamSettings()
        # Signs stream tokens; per process, so a restart invalidates every token.
        self.token_secret = secrets.token_bytes(32)
        self._closing = trio.Event()
        self.open_streams = 0  # streams being served now
        # The alert webhooks' dispatcher (engine.http.webhooks), when the server runs one.
        self.webhooks: WebhookDispatcher | None = None

    def close_streams(self) -> None:
        """End every open stream now (they also end when the server drains)."""
        self._closing.set()

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics.attach(engine)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not served; closing without accepting refuses them
        started = time.perf_counter()
        route_name = "unmatched"
        request: Request | None = None
        try:
            route, path_params = self.router.resolve(scope["method"], scope["path"])
            route_name = route.name
            principal = self._authenticate(scope, route)
            if principal is None:
                raise HttpError(401, "unauthorized", "missing or invalid API key",
                                headers=[(b"www-authenticate", b"Bearer")])
            if route.scope not in (None, ANY_KEY) and route.scope not in principal.scopes:
                raise HttpError(403, "forbidden", f"this API key may not {route.scope}")
            if route.needs_engine and self.engine is None:
                raise HttpError(503, "starting", "the engine is recovering; retry shortly",
                                headers=[(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])
            request = Request(self, scope, receive, principal)
            request.path_params = path_params
            with self.metrics.in_flight.track_inprogress():
                response = await route.handler(request)
        except trio.Cancelled:
            self._release(request)
            raise
        except HttpError as exc:
            response = _error_response(exc)
        except MeteringError as exc:
            response = _error_response(from_engine_error(exc))
        except Exception:
            log.exception("HTTP %s %s failed", scope["method"], scope["path"])
            response = _error_response(HttpError(500, "internal", "internal error"))
        self.metrics.requests.labels(route_name, scope["method"], str(response.status)).inc()
        self.metrics.request_seconds.labels(route_name).observe(time.perf_counter() - started)
        # The request's memory is gone once its answer is built: give its budget back first.
        self._release(request)
        if isinstance(response, StreamResponse) and scope["method"] == "HEAD":
            await _send(send, Response(200, b"", response.content_type), head=True)
        elif isinstance(response, StreamResponse):
            await self._stream(send, receive, response)
        else:
            await _send(send, response, head=scope["method"] == "HEAD")

    async def _stream(self, send: Send, receive: Receive, response: StreamResponse) -> None:
        """Run a stream until it ends, the client leaves or the server drains.

        Hypercorn gives the tasks of requests in flight a deadline when it drains
        (``graceful_timeout``); a stream is never done by itself, so it ends as
        soon as its deadline moves earlier, instead of holding the drain until
        then. ``close_streams()`` ends every stream at once.
        """
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", response.content_type), (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"), *response.headers]})

        async def write(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        self.open_streams += 1
        try:
            client_left = await self._run_stream(receive, write, response)
        finally:
            self.open_streams -= 1
        if not client_left:
            with trio.move_on_after(1):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _run_stream(self, receive: Receive, write: Write, response: StreamResponse
                          ) -> bool:
        """``produce`` until it returns or is stopped; True if the client went away."""
        client_left = False
        async with trio.open_nursery() as nursery:

            async def watch_client() -> None:
                nonlocal client_left
                while (await receive())["type"] != "http.disconnect":
                    pass
                client_left = True
                nursery.cancel_scope.cancel()

            async def watch_shutdown() -> None:
                # The deadline a draining server sets is earlier than any before it.
                deadline_at_start = trio.current_effective_deadline()
                while trio.current_effective_deadline() >= deadline_at_start:
                    with trio.move_on_after(self.streams.shutdown_poll_s):
                        await self._closing.wait()
                    if self._closing.is_set():
                        break
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_client)
            nursery.start_soon(watch_shutdown)
            try:
                await response.produce(write)
            except MeteringError as exc:  # the headers are gone: end the stream, say why
                log.info("HTTP stream ended: %s", exc)
            nursery.cancel_scope.cancel()
        return client_left

    def _release(self, request: Request | None) -> None:
        budget = self.limits.request_budget
        if request is not None and budget is not None and request.charged_bytes:
            budget.release(request.charged_bytes)
            request.charged_bytes = 0

    def _authenticate(self, scope: dict[str, Any], route: Route) -> Principal | None:
        if route.scope is None:
            return Principal(scopes=frozenset(), name="anonymous")
        headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                   for name, value in scope.get("headers", [])}
        key = presented_key(headers)
        if route.token_auth and key is None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if query.get("token"):
                if not self.keys.enabled:
                    return self.keys.authenticate(None)  # no keys: every request may do all
                return verify_token(self.token_secret, query["token"][-1], self.clock_ms())
        return self.keys.authenticate(key)


def _error_response(error: HttpError) -> Response:
    return Response(error.status, encode_json(error.body()), JSON, list(error.headers))


async def _send(send: Send, response: Response, head: bool = False) -> None:
    if response.status == 204:  # no body, so neither a type nor a length (RFC 9110 §8.6)
        headers = list(response.headers)
    else:
        headers = [(b"content-type", response.content_type),
                   (b"content-length", str(len(response.body)).encode()), *response.headers]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else response.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
