"""The native routes: ``POST /api/query``, ``/healthz``, ``/readyz``, ``/metrics``,
``/openapi.json``.

Shell layer: the engine's public API, ``engine.http``. ``/api/query`` speaks the
engine's own ``Query`` and ``QueryResult`` in camelCase JSON (every window
including ``minute``, any IANA zone); group and filter keys are the engine's
(``customer_id`` and dimension keys), since they are data, not field names.
"""

from __future__ import annotations

import time

import msgspec

from engine import Query, QueryResult, Take
from engine.access import restrict_query
from engine.http.app import Request, Response, Router, json_response
from engine.http.codecs import decode_json
from engine.http.errors import bad_request
from engine.http.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from engine.schema import WindowName

WINDOWS: tuple[WindowName, ...] = ("minute", "hour", "day", "week", "month")


class TakeIn(msgspec.Struct, rename="camel"):
    limit: int
    ascending: bool = False


class QueryIn(msgspec.Struct, rename="camel"):
    """``Query`` as JSON, with ``window`` matched case-insensitively."""

    meter_api_name: str
    start_ms: int
    end_ms: int
    window: str | None = None
    timezone: str = "UTC"
    group_by: list[str] = []
    filter: dict[str, list[str]] = {}
    take: TakeIn | None = None


class Health(msgspec.Struct):
    status: str


class Ready(msgspec.Struct):
    ready: bool


def to_query(body: QueryIn) -> Query:
    window: WindowName | None = None
    if body.window is not None:
        name = body.window.lower()
        matched = [w for w in WINDOWS if w == name]
        if not matched:
            raise bad_request(f"window must be one of {', '.join(WINDOWS)} or null, "
                              f"got {body.window!r}", code="invalid_query")
        window = matched[0]
    take = Take(limit=body.take.limit, ascending=body.take.ascending) if body.take else None
    return Query(meter_api_name=body.meter_api_name, start_ms=body.start_ms, end_ms=body.end_ms,
                 window=window, timezone=body.timezone, group_by=body.group_by,
                 filter=body.filter, take=take)


async def api_query(request: Request) -> Response:
    query = to_query(decode_json(await request.body(), QueryIn, "query"))
    query = restrict_query(query, request.principal.customer_id)
    started = time.perf_counter()
    result: QueryResult = await request.engine.query(query)
    request.app.metrics.query_seconds.observe(time.perf_counter() - started)
    return json_response(result)


async def healthz(request: Request) -> Response:
    return json_response(Health("ok"))


async def readyz(request: Request) -> Response:
    return json_response(Ready(True))  # the app answers 503 until an engine is attached


async def metrics(request: Request) -> Response:
    return Response(200, request.app.metrics.render(), METRICS_CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    from engine.http.openapi import openapi_document  # built once, on first request

    return Response(200, openapi_document())


def add_routes(router: Router) -> None:
    router.add("POST", "/api/query", api_query, "query")
    router.add("GET", "/healthz", healthz, None, needs_engine=False)
    router.add("GET", "/readyz", readyz, None)
    router.add("GET", "/metrics", metrics, "admin", needs_engine=False)
    router.add("GET", "/openapi.json", openapi, None, needs_engine=False)
