"""Corrections over HTTP: cancel events by unique id or by filter, amend one, list them.

Shell layer: the engine's public API (``Engine.cancel``, ``cancel_where``, ``amend``,
``corrections``) and ``engine.http``, like the TCP requests of the same names
(``engine.server_connection``) it mirrors:

- ``POST /api/corrections/cancel``: ``{meterApiName, customerId, uniqueIds}``;
- ``POST /api/corrections/cancel-where``: ``{meterApiName, customerId, startMs, endMs,
  dimensions?, receivedStartMs?, receivedEndMs?}``; ``customerId`` must be given, and
  ``null`` means every customer (a filter over all customers is never implied by a
  missing field);
- ``POST /api/corrections/amend``: ``{meterApiName, customerId, uniqueId, event}``;
- ``GET /api/corrections?meterApiName=&customerId=``: the corrections made, oldest first.

The three changes need the ``correct`` scope, the list ``query``. A customer-bound key
corrects only its own customer (another is a 403, as is ``customerId: null``, every
customer) and lists only the corrections made for it. The audit record names the key
(``Principal.name``). Every check the embedded call makes (unknown meter, a range
past the raw-event retention, an event that changes its meter) answers its own
message: the shell adds only what JSON needs (types, the received range's order), and
refuses a ``customer.NAME`` trait key in ``dimensions``, which the embedded call does
not resolve as a query would (it would match no event).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from engine import Event
from engine.http.app import Request, Response, Router, json_response
from engine.http.codecs import decode_json
from engine.http.errors import HttpError, bad_request

TRAIT_PREFIX = "customer."  # a query's filter key on a customer trait (docs/api.md)


class CancelIn(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Cancel the customer's live events of a meter with these unique ids."""

    meter_api_name: str
    customer_id: str
    unique_ids: list[str]


class CancelWhereIn(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Cancel every live event of a meter with event time in ``[startMs, endMs)``, received
    in ``[receivedStartMs, receivedEndMs)`` when given, passing ``dimensions`` as a
    query's ``filter`` does; ``customerId: null`` is every customer."""

    meter_api_name: str
    customer_id: str | None
    start_ms: int
    end_ms: int
    dimensions: dict[str, list[str]] = {}
    received_start_ms: int | None = None
    received_end_ms: int | None = None


class AmendedEventIn(msgspec.Struct, rename="camel"):
    """The corrected event, in Amberflo's shape; a field left out is the amend's own
    (meter, customer, unique id)."""

    meter_value: int | Decimal
    meter_time_in_millis: int
    dimensions: dict[str, str] = {}
    meter_api_name: str | None = None
    customer_id: str | None = None
    unique_id: str | None = None


class AmendIn(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Replace the live event with this unique id by ``event``, in one log record."""

    meter_api_name: str
    customer_id: str
    unique_id: str
    event: AmendedEventIn


class Cancelled(msgspec.Struct, rename="camel"):
    """How many live events the correction cancelled (0: none matched, nothing logged)."""

    cancelled: int


class Amended(msgspec.Struct, rename="camel"):
    """The amend's ack: the corrected event accepted, at the log position ``lsn``."""

    accepted: int
    duplicates: int
    lsn: int


class CorrectionOut(msgspec.Struct, rename="camel"):
    """One correction: who (``by``, the API key's name), when (``receivedMs``, engine
    clock), what (``kind``, the meter, the customer or null for every customer,
    ``description`` of its target, how many events it cancelled, the amended event)."""

    lsn: int
    kind: str
    meter_api_name: str
    customer_id: str | None
    by: str
    received_ms: int
    description: str
    cancelled: int
    amended: Event | None = None


class CorrectionList(msgspec.Struct, rename="camel"):
    """The corrections, oldest first."""

    corrections: list[CorrectionOut]


def _own_customer(request: Request, customer_id: str | None) -> None:
    bound = request.principal.customer_id
    if bound is not None and customer_id != bound:
        raise HttpError(403, "forbidden", "this API key may only correct its own customer's "
                                          "events")


def _known_meter(request: Request, name: str) -> None:
    if name not in {meter.name for meter in request.engine.meters()}:
        raise HttpError(404, "unknown_meter", f"unknown meter {name!r}")


async def cancel(request: Request) -> Response:
    body = decode_json(await request.body(), CancelIn, "cancel")
    _own_customer(request, body.customer_id)
    cancelled = await request.engine.cancel(body.meter_api_name, body.customer_id,
                                            unique_ids=body.unique_ids,
                                            by=request.principal.name)
    return json_response(Cancelled(cancelled))


async def cancel_where(request: Request) -> Response:
    body = decode_json(await request.body(), CancelWhereIn, "cancel-where")
    _own_customer(request, body.customer_id)
    traits = sorted(key for key in body.dimensions if key.startswith(TRAIT_PREFIX))
    if traits:
        # A query resolves these against the customer registry; the engine's cancel_where
        # matches them as event dimensions, which never hold them (ingest refuses the
        # prefix), so it would cancel nothing: refused until it resolves them as a query.
        raise bad_request(f"dimensions cannot filter on customer traits yet ({', '.join(traits)})"
                          ": name the customers with customerId or the customer_id key")
    if (body.received_start_ms is not None and body.received_end_ms is not None
            and body.received_start_ms > body.received_end_ms):
        raise bad_request(f"receivedStartMs {body.received_start_ms} is after receivedEndMs "
                          f"{body.received_end_ms}")
    cancelled = await request.engine.cancel_where(
        body.meter_api_name, customer_id=body.customer_id, start_ms=body.start_ms,
        end_ms=body.end_ms, dimensions=body.dimensions,
        received_start_ms=body.received_start_ms, received_end_ms=body.received_end_ms,
        by=request.principal.name)
    return json_response(Cancelled(cancelled))


async def amend(request: Request) -> Response:
    body = decode_json(await request.body(), AmendIn, "amend")
    _own_customer(request, body.customer_id)
    _known_meter(request, body.meter_api_name)  # a 404 as for the other routes, not a 400
    given = body.event
    event = Event(
        meter_api_name=body.meter_api_name if given.meter_api_name is None
        else given.meter_api_name,
        customer_id=body.customer_id if given.customer_id is None else given.customer_id,
        meter_value=given.meter_value, meter_time_in_millis=given.meter_time_in_millis,
        dimensions=given.dimensions,
        unique_id=body.unique_id if given.unique_id is None else given.unique_id)
    ack = await request.engine.amend(body.meter_api_name, body.customer_id, body.unique_id,
                                     event, by=request.principal.name)
    return json_response(Amended(accepted=ack.accepted, duplicates=ack.duplicates, lsn=ack.lsn))


async def list_corrections(request: Request) -> Response:
    meter = request.param("meterApiName") or None
    customer = request.param("customerId") or None
    bound = request.principal.customer_id
    if bound is not None:
        if customer not in (None, bound):
            raise HttpError(403, "forbidden", "this API key may only list its own customer's "
                                              "corrections")
        customer = bound
    if meter is not None:
        _known_meter(request, meter)
    found = await request.engine.corrections(meter, customer)
    if bound is not None:
        # A correction of every customer is not the key's alone to see (as over TCP).
        found = [c for c in found if c.customer_id == bound]
    return json_response(CorrectionList([CorrectionOut(
        lsn=c.lsn, kind=c.kind, meter_api_name=c.meter_api_name, customer_id=c.customer_id,
        by=c.by, received_ms=c.received_ms, description=c.description, cancelled=c.cancelled,
        amended=c.amended) for c in found]))


def openapi_paths() -> dict[str, Any]:
    """This module's routes for ``/openapi.json`` (``engine.http.openapi`` merges them)."""
    from engine.http.openapi import _operation, _query_param, _ref

    def with_example(operation: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
        operation["requestBody"]["content"]["application/json"]["example"] = example
        return operation

    text = {"type": "string"}
    day_ms = 86_400_000
    return {
        "/api/corrections": {"get": _operation(
            "The corrections made, oldest first (of a meter and customer if given; a "
            "cancel-where of every customer is listed for each); a customer-bound key lists "
            "its own customer's", _ref("CorrectionList"), parameters=[
                _query_param("meterApiName", text), _query_param("customerId", text)])},
        "/api/corrections/cancel": {"post": with_example(_operation(
            "Cancel the customer's live events of a meter with these unique ids, durably; "
            "answers how many were cancelled (needs the correct scope)", _ref("Cancelled"),
            _ref("CancelIn")), {"meterApiName": "api_calls", "customerId": "acme",
                                "uniqueIds": ["e-1", "e-2"]})},
        "/api/corrections/amend": {"post": with_example(_operation(
            "Replace the live event with this unique id by event, in one log record; "
            "bypasses the late-event limit, not the retention (needs the correct scope)",
            _ref("Amended"), _ref("AmendIn")), {
                "meterApiName": "api_calls", "customerId": "acme", "uniqueId": "e-3",
                "event": {"meterValue": 2.5, "meterTimeInMillis": 1_790_000_000_000 - 60_000,
                          "dimensions": {"region": "eu"}}})},
        "/api/corrections/cancel-where": {"post": with_example(_operation(
            "Cancel every live event of a meter in [startMs, endMs) (and received in "
            "[receivedStartMs, receivedEndMs) if given) matching dimensions as a query's "
            "filter; customerId null is every customer; a range past the raw-event "
            "retention is refused whole (needs the correct scope)", _ref("Cancelled"),
            _ref("CancelWhereIn")), {"meterApiName": "api_calls", "customerId": "beta",
                                     "startMs": 1_790_000_000_000 - day_ms,
                                     "endMs": 1_790_000_000_000, "dimensions": {"region": ["eu"]},
                                     "receivedStartMs": 1_790_000_000_000 - day_ms})},
    }


def add_routes(router: Router) -> None:
    router.add("GET", "/api/corrections", list_corrections, "query")
    router.add("POST", "/api/corrections/cancel", cancel, "correct")
    router.add("POST", "/api/corrections/cancel-where", cancel_where, "correct")
    router.add("POST", "/api/corrections/amend", amend, "correct")
