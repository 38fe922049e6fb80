"""The native routes: ``POST /api/query``, ``GET /api/meters/{name}/dimensions``,
``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``.

Shell layer: the engine's public API, ``engine.http``. ``/api/query`` speaks the
engine's own ``Query`` and ``QueryResult`` in camelCase JSON (every window
including ``minute``, any IANA zone); group and filter keys are the engine's
(``customer_id``, dimension keys and ``customer.NAME`` traits), since they are data,
not field names.
``take.offset`` pages through the ranked groups and ``other: true`` adds the
exact aggregate of every group outside the page (``Engine.query_page``).
``/api/meters/{name}/dimensions`` lists the dimension keys seen on a meter's
events and the top values of each by usage (``Engine.dimensions``).
"""

from __future__ import annotations

import time

import msgspec

from engine import Query, Take
from engine.access import restrict_query
from engine.http.app import Request, Response, Router, json_response
from engine.http.codecs import decode_json
from engine.http.errors import bad_request
from engine.http.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from engine.schema import Aggregation, Dimension, QueryPage, Row, WindowName

WINDOWS: tuple[WindowName, ...] = ("minute", "hour", "day", "week", "month")


# GET /api/meters/{name}/dimensions: defaults and bounds of its query parameters.
DAY_MS = 86_400_000
DIMENSIONS_DEFAULT_DAYS = 30
DIMENSIONS_DEFAULT_TOP = 10
DIMENSIONS_MAX_TOP = 1000
DIMENSIONS_DEFAULT_KEYS = 50  # keys answered (each costs one query over the range)
DIMENSIONS_MAX_KEYS = 500


class TakeIn(msgspec.Struct, rename="camel"):
    """The top (or bottom) ``limit`` groups by their total, from rank ``offset`` (0 first)."""

    limit: int
    ascending: bool = False
    offset: int = 0


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
    # Also answer ``other``: per window, the exact aggregate of every group not in the page.
    other: bool = False


class QueryOut(msgspec.Struct, rename="camel", omit_defaults=True):
    """``QueryResult`` in camelCase, with ``groupCount`` (groups before ``take``) and,
    when asked for, ``other`` (one row per window, group ``{}``)."""

    meter_api_name: str
    aggregation: Aggregation
    start_ms: int
    end_ms: int
    window: WindowName | None
    timezone: str
    rows: list[Row]
    group_count: int
    offset: int = 0
    other: list[Row] | None = None


class DimensionsOut(msgspec.Struct, rename="camel"):
    """The dimension keys seen on a meter's events in [startMs, endMs), sorted by key."""

    meter_api_name: str
    aggregation: Aggregation
    start_ms: int
    end_ms: int
    top: int
    key_count: int  # the keys seen; ``dimensions`` holds the first ``maxKeys`` of them
    dimensions: list[Dimension]


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
    if body.take is not None and (type(body.take.offset) is not int or body.take.offset < 0):
        raise bad_request(f"take.offset must be a non-negative integer, got "
                          f"{body.take.offset!r}", code="invalid_query")
    return Query(meter_api_name=body.meter_api_name, start_ms=body.start_ms, end_ms=body.end_ms,
                 window=window, timezone=body.timezone, group_by=body.group_by,
                 filter=body.filter, take=take)


async def api_query(request: Request) -> Response:
    body = decode_json(await request.body(), QueryIn, "query")
    query = restrict_query(to_query(body), request.principal.customer_id)
    started = time.perf_counter()
    page: QueryPage = await request.engine.query_page(
        query, offset=body.take.offset if body.take else 0, other=body.other)
    request.app.metrics.query_seconds.observe(time.perf_counter() - started)
    result = page.result
    return json_response(QueryOut(
        meter_api_name=result.meter_api_name, aggregation=result.aggregation,
        start_ms=result.start_ms, end_ms=result.end_ms, window=result.window,
        timezone=result.timezone, rows=result.rows, group_count=page.group_count,
        offset=page.offset, other=page.other))


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.param(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise bad_request(f"{name} must be an integer, got {text!r}",
                          code="invalid_query") from None
    if not low <= value <= high:
        raise bad_request(f"{name} must be from {low} to {high}, got {value}",
                          code="invalid_query")
    return value


async def api_dimensions(request: Request) -> Response:
    """The dimension keys of a meter and the top values of each, by usage.

    Default range: the ``DIMENSIONS_DEFAULT_DAYS`` whole UTC days up to and
    including today (by the server clock); ``top`` values per key (default 10), for
    the first ``maxKeys`` keys (default 50; ``keyCount`` says how many there are).
    """
    name = request.path_params["name"]
    today_end_ms = (request.app.clock_ms() // DAY_MS + 1) * DAY_MS
    max_ms = 253_402_300_800_000  # 10000-01-01: past every accepted event time
    end_ms = _int_param(request, "endMs", today_end_ms, 0, max_ms)
    start_ms = _int_param(request, "startMs", max(0, end_ms - DIMENSIONS_DEFAULT_DAYS * DAY_MS),
                          0, max_ms)
    top = _int_param(request, "top", DIMENSIONS_DEFAULT_TOP, 1, DIMENSIONS_MAX_TOP)
    max_keys = _int_param(request, "maxKeys", DIMENSIONS_DEFAULT_KEYS, 1, DIMENSIONS_MAX_KEYS)
    customer = request.principal.customer_id
    started = time.perf_counter()
    keys = await request.engine.dimension_keys(name, start_ms, end_ms, customer_id=customer)
    dimensions = await request.engine.dimensions(
        name, start_ms, end_ms, top=top, customer_id=customer, keys=keys[:max_keys])
    request.app.metrics.query_seconds.observe(time.perf_counter() - started)
    meter = next(m for m in request.engine.meters() if m.name == name)
    return json_response(DimensionsOut(meter_api_name=name, aggregation=meter.aggregation,
                                       start_ms=start_ms, end_ms=end_ms, top=top,
                                       key_count=len(keys), dimensions=dimensions))


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
    router.add("GET", "/api/meters/{name}/dimensions", api_dimensions, "query")
    router.add("GET", "/healthz", healthz, None, needs_engine=False)
    router.add("GET", "/readyz", readyz, None)
    router.add("GET", "/metrics", metrics, "admin", needs_engine=False)
    router.add("GET", "/openapi.json", openapi, None, needs_engine=False)
