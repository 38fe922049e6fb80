"""The raw events over HTTP: ``GET /api/events``, pages of the retained raw-event log.

Shell layer: the engine's public API (``Engine.raw_events``) and ``engine.http``, like
the TCP ``read_events`` request (``engine.server_events``) it mirrors. A key needs the
``query`` scope; a key bound to a customer reads only that customer's events (no
``customerId`` means its own, another customer's is 403).

A page is JSON: ``events`` (the accepted events in the order they were logged,
duplicates left out, in Amberflo's event shape) and ``nextCursor``, which the next
request passes back as ``cursor`` (null on the last page). The cursor is the
write-ahead-log position ``LSN-INDEX`` the engine pages by; it stays valid while the
records it points into are retained.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.http.app import Request, Response, Router, json_response
from engine.http.errors import HttpError, bad_request
from engine.http.native import _int_param
from engine.schema import Event

# The engine's page sizes (engine.runtime.raw_events, which the shell may not import;
# tests/test_http_events.py checks they agree): Engine.raw_events checks them again.
DEFAULT_PAGE_EVENTS = 10_000
MAX_PAGE_EVENTS = 100_000
MAX_EVENT_MS = 253_402_300_800_000  # 10000-01-01: past every accepted event time
MAX_LSN = (1 << 63) - 1


class EventPage(msgspec.Struct, rename="camel"):
    """A page of raw events; ``nextCursor`` is null on the last page."""

    events: list[Event]
    next_cursor: str | None


def parse_cursor(text: str | None) -> tuple[int, int]:
    """``LSN-INDEX`` (both non-negative integers) as a pair; no cursor is the start."""
    if text is None or text == "":
        return 0, 0
    lsn_text, dash, index_text = text.partition("-")
    if (not dash or not lsn_text.isascii() or not lsn_text.isdigit()
            or not index_text.isascii() or not index_text.isdigit()
            or int(lsn_text) > MAX_LSN or int(index_text) > MAX_LSN):
        raise bad_request(f"cursor must be a nextCursor this route answered, got {text[:40]!r}",
                          code="invalid_query")
    return int(lsn_text), int(index_text)


async def api_events(request: Request) -> Response:
    start_ms = _int_param(request, "startMs", 0, 0, MAX_EVENT_MS)
    end_text = request.param("endMs")
    if end_text is None or end_text == "":
        raise bad_request("endMs is required (integer milliseconds, exclusive)",
                          code="invalid_query")
    end_ms = _int_param(request, "endMs", 0, 0, MAX_EVENT_MS)
    limit = _int_param(request, "limit", DEFAULT_PAGE_EVENTS, 1, MAX_PAGE_EVENTS)
    from_lsn, from_index = parse_cursor(request.param("cursor"))
    meter = request.param("meterApiName") or None
    customer_id = request.param("customerId") or None
    bound = request.principal.customer_id
    if bound is not None:
        if customer_id not in (None, bound):
            raise HttpError(403, "forbidden", "this API key may only read its own customer's "
                                              "events")
        customer_id = bound
    page = await request.engine.raw_events(
        start_ms, end_ms, meter_api_name=meter, customer_id=customer_id, from_lsn=from_lsn,
        from_index=from_index, limit=limit)
    next_cursor = None if page.done else f"{page.next_lsn}-{page.next_index}"
    return json_response(EventPage(events=page.events, next_cursor=next_cursor))


def openapi_paths() -> dict[str, Any]:
    """This module's routes for ``/openapi.json`` (``engine.http.openapi`` merges them)."""
    from engine.http.openapi import _operation, _query_param, _ref

    millis = {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_MS}
    return {
        "/api/events": {"get": _operation(
            "The raw events retained with event time in [startMs, endMs), in the order they "
            "were logged (duplicates left out), a page at a time: pass nextCursor back as "
            "cursor until it is null; a customer-bound key reads only its customer's",
            _ref("EventPage"), parameters=[
                _query_param("startMs", millis),
                _query_param("endMs", millis, required=True),
                _query_param("meterApiName", {"type": "string"}),
                _query_param("customerId", {"type": "string"}),
                _query_param("cursor", {"type": "string", "pattern": "^[0-9]+-[0-9]+$"}),
                _query_param("limit", {"type": "integer", "minimum": 1,
                                       "maximum": MAX_PAGE_EVENTS})])},
    }


def add_routes(router: Router) -> None:
    router.add("GET", "/api/events", api_events, "query")
