"""Protocol messages: msgspec structs, a tagged union per direction.

Pure protocol layer: msgspec, the standard library, ``engine.schema`` and
``engine.domain.records`` (for the int64 widening it shares with the WAL).
Every message is a msgpack map with a ``type`` tag; field names are camelCase
on the wire. Requests carry an ``id`` chosen by the client (a non-negative
integer, unique among its requests in flight); the reply carries the same
``id``. See docs/protocol.md.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

import msgspec

from engine.domain.records import Correction, wide_ints_as_decimals
from engine.pricing.model import Invoice, Plan, PlanAssignment
from engine.schema import Alert, Customer, Event, Limit, Meter, Query, QueryResult

PROTOCOL_VERSION = 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

RequestId = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]

_BASE = {"tag_field": "type", "rename": "camel", "omit_defaults": True}


# --------------------------------------------------------------- client → server


class Hello(msgspec.Struct, tag="hello", **_BASE):
    """The first frame on a connection."""

    version: int
    api_key: str | None = None
    client: str = ""


class Ping(msgspec.Struct, tag="ping", **_BASE):
    id: RequestId


class DefineMeter(msgspec.Struct, tag="define_meter", **_BASE):
    id: RequestId
    meter: Meter


class ListMeters(msgspec.Struct, tag="list_meters", **_BASE):
    id: RequestId


class Ingest(msgspec.Struct, tag="ingest", **_BASE):
    id: RequestId
    events: list[Event]
    report_alerts: bool = False


class QueryRequest(msgspec.Struct, tag="query", **_BASE):
    id: RequestId
    query: Query


class Stats(msgspec.Struct, tag="stats", **_BASE):
    id: RequestId


class AddLimit(msgspec.Struct, tag="add_limit", **_BASE):
    id: RequestId
    limit: Limit


class RemoveLimit(msgspec.Struct, tag="remove_limit", **_BASE):
    id: RequestId
    limit_id: str


class ListLimits(msgspec.Struct, tag="list_limits", **_BASE):
    id: RequestId


class Subscribe(msgspec.Struct, tag="subscribe", **_BASE):
    """Push alerts with seq >= ``from_seq``: stored ones first, then live ones.

    The subscription is named by this request's ``id``.
    """

    id: RequestId
    from_seq: Annotated[int, msgspec.Meta(ge=0)] = 0


class Unsubscribe(msgspec.Struct, tag="unsubscribe", **_BASE):
    id: RequestId
    subscription: RequestId


class AddCustomer(msgspec.Struct, tag="add_customer", **_BASE):
    id: RequestId
    customer: Customer


class UpdateCustomer(msgspec.Struct, tag="update_customer", **_BASE):
    id: RequestId
    customer: Customer


class GetCustomer(msgspec.Struct, tag="get_customer", **_BASE):
    id: RequestId
    customer_id: str


class ListCustomers(msgspec.Struct, tag="list_customers", **_BASE):
    id: RequestId


class DeleteCustomer(msgspec.Struct, tag="delete_customer", **_BASE):
    id: RequestId
    customer_id: str


class BackupRequest(msgspec.Struct, tag="backup", **_BASE):
    """Write a consistent copy of the server's data directory to ``path``, a path on
    the server's machine (relative: to the server's working directory)."""

    id: RequestId
    path: str


class ReadEvents(msgspec.Struct, tag="read_events", **_BASE):
    """A page of the raw events retained with event time in ``[start_ms, end_ms)``,
    duplicates left out; resume at ``from_lsn`` / ``from_index`` (a reply's ``next_*``)."""

    id: RequestId
    start_ms: int
    end_ms: int
    meter_api_name: str | None = None
    customer_id: str | None = None
    from_lsn: Annotated[int, msgspec.Meta(ge=0)] = 0
    from_index: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10_000


# Pricing (docs/pricing.md): plans, assignments and invoices.


class DefinePlan(msgspec.Struct, tag="define_plan", **_BASE):
    id: RequestId
    plan: Plan


class GetPlan(msgspec.Struct, tag="get_plan", **_BASE):
    id: RequestId
    plan_id: str
    version: int | None = None


class ListPlans(msgspec.Struct, tag="list_plans", **_BASE):
    id: RequestId


class AssignPlan(msgspec.Struct, tag="assign_plan", **_BASE):
    id: RequestId
    customer_id: str
    plan_id: str
    effective_from_ms: int


class GetInvoice(msgspec.Struct, tag="invoice", **_BASE):
    id: RequestId
    customer_id: str
    at_ms: int


class Cancel(msgspec.Struct, tag="cancel", **_BASE):
    id: RequestId
    meter_api_name: str
    customer_id: str
    unique_ids: list[str]


class CancelWhere(msgspec.Struct, tag="cancel_where", **_BASE):
    id: RequestId
    meter_api_name: str
    customer_id: str | None
    start_ms: int
    end_ms: int
    dimensions: dict[str, list[str]] = {}
    received_start_ms: int | None = None
    received_end_ms: int | None = None


class Amend(msgspec.Struct, tag="amend", **_BASE):
    id: RequestId
    meter_api_name: str
    customer_id: str
    unique_id: str
    event: Event


class ListCorrections(msgspec.Struct, tag="list_corrections", **_BASE):
    id: RequestId
    meter_api_name: str | None = None
    customer_id: str | None = None


ClientMessage = (
    Hello | Ping | DefineMeter | ListMeters | Ingest | QueryRequest | Stats
    | AddLimit | RemoveLimit | ListLimits | Subscribe | Unsubscribe
    | AddCustomer | UpdateCustomer | GetCustomer | ListCustomers | DeleteCustomer
    | BackupRequest | ReadEvents | DefinePlan | GetPlan | ListPlans | AssignPlan | GetInvoice
    | Cancel | CancelWhere | Amend | ListCorrections
)


# --------------------------------------------------------------- server → client


class Welcome(msgspec.Struct, tag="welcome", **_BASE):
    version: int
    server: str
    max_frame_bytes: int
    max_in_flight: int


class Pong(msgspec.Struct, tag="pong", **_BASE):
    id: RequestId


class MeterReply(msgspec.Struct, tag="meter", **_BASE):
    id: RequestId
    meter: Meter


class MetersReply(msgspec.Struct, tag="meters", **_BASE):
    id: RequestId
    meters: list[Meter]


class IngestReply(msgspec.Struct, tag="ingest_ack", **_BASE):
    id: RequestId
    accepted: int
    duplicates: int
    lsn: int
    alerts: list[Alert] = []


class QueryReply(msgspec.Struct, tag="query_result", **_BASE):
    id: RequestId
    result: QueryResult


class StatsReply(msgspec.Struct, tag="stats", **_BASE):
    id: RequestId
    stats: dict[str, Any]


class LimitReply(msgspec.Struct, tag="limit", **_BASE):
    id: RequestId
    limit: Limit


class RemovedReply(msgspec.Struct, tag="removed", **_BASE):
    id: RequestId
    removed: bool


class LimitsReply(msgspec.Struct, tag="limits", **_BASE):
    id: RequestId
    limits: list[Limit]


class Subscribed(msgspec.Struct, tag="subscribed", **_BASE):
    """The subscription ``id`` is open; ``next_seq`` is the seq the next new alert will get."""

    id: RequestId
    next_seq: int


class AlertsPush(msgspec.Struct, tag="alerts", **_BASE):
    """Alerts for subscription ``subscription``, in seq order, none twice."""

    subscription: RequestId
    alerts: list[Alert]


class Lagged(msgspec.Struct, tag="lagged", **_BASE):
    """The subscriber is ``behind`` alerts behind; the server keeps sending from its seq."""

    subscription: RequestId
    next_seq: int
    behind: int


class Unsubscribed(msgspec.Struct, tag="unsubscribed", **_BASE):
    id: RequestId
    subscription: RequestId


class CustomerReply(msgspec.Struct, tag="customer", **_BASE):
    """The customer stored, found or deleted; ``None``: there is no such customer."""

    id: RequestId
    customer: Customer | None = None


class CustomersReply(msgspec.Struct, tag="customers", **_BASE):
    id: RequestId
    customers: list[Customer]


class BackupReply(msgspec.Struct, tag="backup_done", **_BASE):
    """The backup is complete at ``path`` (absolute): it holds exactly the WAL up to
    ``lsn``; ``size_bytes`` is the size of its store file."""

    id: RequestId
    path: str
    lsn: int
    size_bytes: int


class EventsReply(msgspec.Struct, tag="events", **_BASE):
    """A page of raw events; the next starts at ``next_lsn`` / ``next_index``, unless
    ``done``."""

    id: RequestId
    events: list[Event]
    next_lsn: int
    next_index: int
    done: bool = False


class ErrorReply(msgspec.Struct, tag="error", **_BASE):
    """A refused request (``id`` set) or a connection-level error (``id`` absent).

    ``problems`` lists ``[index, reason]`` for a rejected batch.
    """

    code: str
    detail: str
    id: RequestId | None = None
    problems: list[tuple[int, str]] | None = None


class PlanReply(msgspec.Struct, tag="plan", **_BASE):
    id: RequestId
    plan: Plan | None = None  # None: no such plan (version)


class PlansReply(msgspec.Struct, tag="plans", **_BASE):
    id: RequestId
    plans: list[Plan]


class AssignmentReply(msgspec.Struct, tag="assignment", **_BASE):
    id: RequestId
    assignment: PlanAssignment


class InvoiceReply(msgspec.Struct, tag="invoice", **_BASE):
    id: RequestId
    invoice: Invoice


class CancelledReply(msgspec.Struct, tag="cancelled", **_BASE):
    id: RequestId
    cancelled: int


class CorrectionsReply(msgspec.Struct, tag="corrections", **_BASE):
    id: RequestId
    corrections: list[Correction]


ServerMessage = (
    Welcome | Pong | MeterReply | MetersReply | IngestReply | QueryReply | StatsReply | ErrorReply
    | LimitReply | RemovedReply | LimitsReply | Subscribed | AlertsPush | Lagged | Unsubscribed
    | CustomerReply | CustomersReply | BackupReply | EventsReply | PlanReply | PlansReply
    | AssignmentReply | InvoiceReply | CancelledReply | CorrectionsReply
)

_client_decoder: msgspec.msgpack.Decoder[ClientMessage] = msgspec.msgpack.Decoder(ClientMessage)
_server_decoder: msgspec.msgpack.Decoder[ServerMessage] = msgspec.msgpack.Decoder(ServerMessage)


def _encode_hook(obj: Any) -> Any:
    raise TypeError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_hook)


class MessageError(Exception):
    """A frame that is not a valid message; the stream itself is still in sync."""


def decode_client_message(payload: bytes) -> ClientMessage:
    try:
        return _client_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise MessageError(f"invalid message: {exc}") from None
    # ValueError: invalid UTF-8 in a string. RecursionError: msgspec's answer to nesting
    # deeper than the interpreter's recursion limit (a few kilobytes of 0x91 bytes), even
    # inside an unknown field it only skips.
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"undecodable message: {exc}") from None


def decode_server_message(payload: bytes) -> ServerMessage:
    try:
        return _server_decoder.decode(payload)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"invalid server message: {exc}") from None


def _signed64(value: Any) -> Any:
    """Integers outside int64 travel as decimal strings (clients in other languages
    read msgpack integers as signed 64-bit)."""
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        return Decimal(value)
    return value


def encode_message(message: msgspec.Struct) -> bytes:
    """msgpack payload of ``message``."""
    if isinstance(message, QueryReply):
        rows = message.result.rows
        if any(type(r.value) is int and not INT64_MIN <= r.value <= INT64_MAX for r in rows):
            wide = [msgspec.structs.replace(r, value=_signed64(r.value)) for r in rows]
            result = msgspec.structs.replace(message.result, rows=wide)
            message = msgspec.structs.replace(message, result=result)
    elif isinstance(message, Ingest | EventsReply):
        events = message.events
        if any(type(e.meter_value) is int and not INT64_MIN <= e.meter_value <= INT64_MAX
               for e in events):
            wide_events = [msgspec.structs.replace(e, meter_value=_signed64(e.meter_value))
                           for e in events]
            message = msgspec.structs.replace(message, events=wide_events)
    elif isinstance(message, AddLimit | LimitReply):
        message = msgspec.structs.replace(message, limit=wide_ints_as_decimals(message.limit))
    elif isinstance(message, LimitsReply):
        message = msgspec.structs.replace(
            message, limits=[wide_ints_as_decimals(limit) for limit in message.limits])
    elif isinstance(message, AlertsPush | IngestReply) and any(
        _wide_alert(a) for a in message.alerts
    ):
        alerts = [
            msgspec.structs.replace(a, threshold=_signed64(a.threshold), value=_signed64(a.value))
            for a in message.alerts
        ]
        message = msgspec.structs.replace(message, alerts=alerts)
    return _encoder.encode(message)


def _wide_alert(alert: Alert) -> bool:
    return any(type(v) is int and not INT64_MIN <= v <= INT64_MAX
               for v in (alert.threshold, alert.value))
