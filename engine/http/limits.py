"""Limits and stored alerts over HTTP: ``/limits``, ``/limits/{id}``, ``/alerts``, and
``/api/customers/{id}/limits`` (each limit's current period, usage and thresholds).

Shell layer: the engine's public API (``Limit``, ``Alert``, ``Query``), ``engine.access``,
``engine.errors`` and ``engine.http``. Limits are the engine's own ``Limit`` in
camelCase JSON; thresholds and usage are exact (``int``/``Decimal``, JSON numbers).

Invariants:

- A customer-bound key sees only the limits that apply to its customer
  (``engine.access.visible_limits``), only its customer's alerts, and only its
  own customer's limit status (another customer is a 403).
- ``GET /alerts`` answers at most ``limit`` alerts and reads at most
  ``MAX_SCANNED_ALERTS`` from the log per request, so a page is bounded in time
  and memory whatever the log holds; ``nextSeq`` says where to go on.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal, cast

import msgspec

from engine import Alert, Engine, Limit, Query
from engine.access import visible_limits
from engine.errors import Forbidden, InvalidRequest, UnknownCustomer
from engine.http.app import Request, Response, Router, json_response
from engine.http.codecs import decode_json
from engine.http.errors import HttpError, bad_request

Value = int | Decimal
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_SCANNED_ALERTS = 10_000
PERIODS = ("hour", "day", "week", "month", "total")


class LimitIn(msgspec.Struct, rename="camel"):
    """The engine's ``Limit`` as JSON; thresholds are exact numbers (``0.1`` is 0.1)."""

    id: str
    meter_api_name: str | None  # None: a cost limit on the whole invoice
    thresholds: list[int | Decimal]
    customer_id: str | None = None
    period: str = "day"
    timezone: str = "UTC"
    filter: dict[str, list[str]] = {}
    webhook_url: str | None = None
    measure: Literal["usage", "cost"] = "usage"


class AlertPage(msgspec.Struct, rename="camel"):
    alerts: list[Alert]
    next_seq: int  # ask again with fromSeq=nextSeq for what follows


class LimitStatus(msgspec.Struct, rename="camel"):
    limit: Limit
    period_start_ms: int
    period_end_ms: int  # the period is [periodStartMs, periodEndMs)
    usage: Value
    thresholds: list[Value]  # ascending, distinct
    reached: list[Value]  # the thresholds usage is at or over


class CustomerLimits(msgspec.Struct, rename="camel"):
    customer_id: str
    at_ms: int
    limits: list[LimitStatus]


def to_limit(body: LimitIn) -> Limit:
    period = body.period.lower()
    if period not in PERIODS:
        raise bad_request(f"period must be one of {', '.join(PERIODS)}, got {body.period!r}")
    return Limit(id=body.id, meter_api_name=body.meter_api_name,
                 thresholds=cast(list[int | float | Decimal], body.thresholds),
                 customer_id=body.customer_id, period=cast(Any, period),
                 timezone=body.timezone, filter=body.filter, webhook_url=body.webhook_url,
                 measure=body.measure)


async def list_limits(request: Request) -> Response:
    limits = request.engine.limits()
    bound = request.principal.customer_id
    return json_response(visible_limits(limits, bound) if bound is not None else limits)


async def add_limit(request: Request) -> Response:
    limit = to_limit(decode_json(await request.body(), LimitIn, "limit"))
    return json_response(await request.engine.add_limit(limit))


async def remove_limit(request: Request) -> Response:
    limit_id = request.path_params["id"]
    known = [limit for limit in request.engine.limits() if limit.id == limit_id]
    if not known or not await request.engine.remove_limit(limit_id):
        raise HttpError(404, "unknown_limit", f"no limit {limit_id!r}")
    return json_response(known[0])


def from_seq_param(request: Request) -> int | None:
    text = request.param("fromSeq")
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise bad_request(f"fromSeq must be a non-negative integer, got {text!r}")
    return value


async def list_alerts(request: Request) -> Response:
    from_seq = from_seq_param(request) or 0
    page_text = request.param("limit")
    try:
        page = int(page_text) if page_text is not None else DEFAULT_PAGE
    except ValueError:
        page = 0
    if not 1 <= page <= MAX_PAGE:
        raise bad_request(f"limit must be from 1 to {MAX_PAGE}, got {page_text!r}")
    engine = request.engine
    end_seq = engine.next_alert_seq()  # only what is stored now: never wait for more
    bound = request.principal.customer_id
    alerts: list[Alert] = []
    next_seq = from_seq
    if from_seq < end_seq:
        async with engine.subscribe(from_seq) as subscription:
            while next_seq < end_seq and len(alerts) < page and (
                    next_seq - from_seq < MAX_SCANNED_ALERTS):
                for alert in await subscription.receive_batch(
                        min(page - len(alerts), end_seq - next_seq)):
                    next_seq = alert.seq + 1
                    if bound is None or alert.customer_id == bound:
                        alerts.append(alert)
    return json_response(AlertPage(alerts, next_seq))


async def customer_limits(request: Request) -> Response:
    customer_id = request.path_params["id"]
    bound = request.principal.customer_id
    if bound is not None and bound != customer_id:
        raise Forbidden("this API key may only see its own customer's limits")
    engine = request.engine
    now_ms = request.app.clock_ms()
    statuses = []
    for limit in visible_limits(engine.limits(), customer_id):
        try:
            start_ms, end_ms = engine.limit_period(limit, now_ms)
        except (ValueError, KeyError) as exc:  # pragma: no cover - the engine checked it
            raise InvalidRequest(f"limit {limit.id!r}: {exc}") from None
        usage: Value
        if limit.meter_api_name is None or limit.measure == "cost":
            usage = await cost_to_date(engine, limit, customer_id, now_ms)
        else:
            result = await engine.query(Query(
                meter_api_name=limit.meter_api_name, start_ms=start_ms, end_ms=end_ms,
                timezone=limit.timezone, filter={**limit.filter, "customer_id": [customer_id]}))
            usage = result.rows[0].value if result.rows else 0
        thresholds = sorted({Decimal(str(t)) if isinstance(t, float) else t
                             for t in limit.thresholds})
        statuses.append(LimitStatus(limit, start_ms, end_ms, usage, thresholds,
                                    [t for t in thresholds if usage >= t]))
    return json_response(CustomerLimits(customer_id, now_ms, statuses))


async def cost_to_date(engine: Engine, limit: Limit, customer_id: str, now_ms: int) -> Value:
    """A cost limit's amount now: the open invoice's total, or its meter's lines."""
    try:
        invoice = await engine.invoice(customer_id, now_ms)
    except UnknownCustomer:
        return 0
    return sum((line.amount for line in invoice.lines if line.kind != "adjustment" and (
        limit.meter_api_name is None or line.meter_api_name == limit.meter_api_name)),
        Decimal(0))


def add_routes(router: Router) -> None:
    router.add("GET", "/limits", list_limits, "query")
    router.add("POST", "/limits", add_limit, "admin")
    router.add("DELETE", "/limits/{id}", remove_limit, "admin")
    router.add("GET", "/alerts", list_alerts, "query")
    router.add("GET", "/api/customers/{id}/limits", customer_limits, "query")
