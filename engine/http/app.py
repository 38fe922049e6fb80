"""The ASGI application: routing, authentication, error mapping, metrics per request.

Shell layer: imports ``engine.auth``, ``engine.errors`` and the other
``engine.http`` modules; it never reaches into the runtime. Routes are
registered by ``engine.http.amberflo`` and ``engine.http.native``.

Invariants:

- Every route answers with and without a trailing slash, and never redirects
  (a 301/302 makes ``requests`` turn a POST into a GET and drop the body).
- Every success is 200 (the Amberflo SDK treats anything else as an error).
- Every answer that is not a success is JSON (``engine.http.errors``): an
  unknown route is a 404, a known path with the wrong method a 405.
- A route declares the scope it needs; the key comes in ``X-API-KEY`` or
  ``Authorization: Bearer``. No keys configured: every request is admin.
  Wrong or missing key 401; key without the scope 403.
- Until an engine is attached, every route but ``/healthz`` answers 503 with
  ``Retry-After`` (the listener may bind before recovery ends).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import trio

from engine import Engine
from engine.auth import KeyRing, Principal
from engine.errors import MeteringError
from engine.http.codecs import BodyReader, encode_json
from engine.http.errors import RETRY_AFTER_SECONDS, HttpError, from_engine_error
from engine.http.metrics import HttpMetrics
from engine.server import REQUEST_MEMORY_FACTOR, ByteBudget

log = logging.getLogger(__name__)

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


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # without a trailing slash
    handler: Handler
    scope: str | None  # the API-key scope needed; None: no key needed
    needs_engine: bool = True
    name: str = ""


class Router:
    """Routes by exact path, then by template: a ``{name}`` segment matches one
    non-empty path segment, given to the handler in ``path_params``. ASGI gives the
    path percent-decoded, so an id holding ``/`` cannot be named in a path (use a
    query form). An exact path wins over a template."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Route]] = {}
        self._templates: list[tuple[tuple[str, ...], str]] = []  # (segments, template)

    def add(self, method: str, path: str, handler: Handler, scope: str | None, *,
            needs_engine: bool = True) -> None:
        path = normalise(path)
        if "{" in path and path not in self._routes:
            self._templates.append((tuple(path.split("/")), path))
        self._routes.setdefault(path, {})[method] = Route(
            method, path, handler, scope, needs_engine, path)

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
        await _send(send, response, head=scope["method"] == "HEAD")

    def _release(self, request: Request | None) -> None:
        budget = self.limits.request_budget
        if request is not None and budget is not None and request.charged_bytes:
            budget.release(request.charged_bytes)
            request.charged_bytes = 0

    def _authenticate(self, scope: dict[str, Any], route: Route) -> Principal:
        if route.scope is None:
            return Principal(scopes=frozenset(), name="anonymous")
        headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                   for name, value in scope.get("headers", [])}
        principal = self.keys.authenticate(presented_key(headers))
        if principal is None:
            raise HttpError(401, "unauthorized", "missing or invalid API key",
                            headers=[(b"www-authenticate", b"Bearer")])
        if route.scope not in principal.scopes:
            raise HttpError(403, "forbidden", f"this API key may not {route.scope}")
        return principal


def _error_response(error: HttpError) -> Response:
    return Response(error.status, encode_json(error.body()), JSON, list(error.headers))


async def _send(send: Send, response: Response, head: bool = False) -> None:
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
