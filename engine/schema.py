"""Public data types: what users construct and what the engine returns.

Pure layer: imports only msgspec and the standard library. These structs are
also the wire and write-ahead-log encoding, so their field names are a
contract. Field names are snake_case in Python and camelCase when serialised
(``rename="camel"``), which makes a serialised ``Event`` exactly Amberflo's
event shape: ``meterApiName``, ``customerId``, ``meterValue``,
``meterTimeInMillis``, ``dimensions``, ``uniqueId``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

import msgspec

Aggregation = Literal["sum", "count", "max", "min", "avg", "latest", "unique_count"]
WindowName = Literal["minute", "hour", "day", "week", "month"]

AGGREGATIONS: tuple[str, ...] = ("sum", "count", "max", "min", "avg", "latest", "unique_count")


class Meter(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """How events of one meter aggregate.

    ``unique_count`` meters count distinct values of ``unique_dimension``.

    OpenMeter ingest (``POST /api/v1/events``, docs/http.md): a CloudEvent whose
    ``type`` equals ``event_type`` feeds this meter. ``value_property`` is the
    JSON path (``$.tokens``) of its value in the event's ``data`` (a ``count``
    meter needs none; a ``unique_count`` meter's is the value it counts), and
    ``dimension_paths`` maps dimension keys to JSON paths in ``data``.
    """

    name: str
    aggregation: Aggregation = "sum"
    unique_dimension: str | None = None
    description: str = ""
    event_type: str | None = None
    value_property: str | None = None
    dimension_paths: dict[str, str] = {}


class Event(msgspec.Struct, rename="camel", omit_defaults=True, gc=False):
    """One usage record, in Amberflo's shape.

    ``meter_value`` is an ``int``, a ``float`` (taken as the decimal of its
    shortest repr: ``0.1`` is exactly 0.1), a ``Decimal`` or a decimal string.
    ``meter_time_in_millis`` is integer milliseconds since the Unix epoch.
    An event with a ``unique_id`` is counted once, ever, per meter and customer.
    """

    meter_api_name: str
    customer_id: str
    meter_value: int | float | Decimal
    meter_time_in_millis: int
    dimensions: dict[str, str] = {}
    unique_id: str | None = None


class Take(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """Keep only the top (``ascending=False``) or bottom ``limit`` groups by value."""

    limit: int
    ascending: bool = False


class Query(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """A usage query over the half-open range ``[start_ms, end_ms)``.

    ``window=None`` gives one total per group over the range; otherwise rows per
    calendar window in ``timezone`` (an IANA name).
    """

    meter_api_name: str
    start_ms: int
    end_ms: int
    window: WindowName | None = None
    timezone: str = "UTC"
    group_by: list[str] = []
    filter: dict[str, list[str]] = {}
    take: Take | None = None


class Row(msgspec.Struct, frozen=True, rename="camel"):
    """One result row: the window's start, the group's key values, the exact value."""

    window_start_ms: int
    group: dict[str, str | None]
    value: int | Decimal


class QueryResult(msgspec.Struct, frozen=True, rename="camel"):
    meter_api_name: str
    aggregation: Aggregation
    start_ms: int
    end_ms: int
    window: WindowName | None
    timezone: str
    rows: list[Row]


PeriodName = Literal["hour", "day", "week", "month", "total"]


class Limit(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """Alert when a customer's usage of a meter within one period reaches a threshold.

    ``customer_id=None`` applies the limit to every customer separately.
    ``period`` is a calendar window in ``timezone`` or ``"total"`` (all time).
    ``filter`` restricts the usage counted, like ``Query.filter``.
    ``webhook_url`` (an http or https URL) receives each of its alerts as a
    signed POST when the server delivers webhooks.

    ``measure="cost"`` (docs/pricing.md) compares the customer's invoice amount in
    the plan's currency instead of usage: ``meter_api_name=None`` means the whole
    invoice total, a meter's name that meter's usage lines; the period must be the
    plan's billing month (``"month"`` in the plan's time zone). A usage limit needs
    a meter. Pricing evaluates cost limits; metering only publishes usage to it.
    """

    id: str
    meter_api_name: str | None
    thresholds: list[int | float | Decimal]
    customer_id: str | None = None
    period: PeriodName = "day"
    timezone: str = "UTC"
    filter: dict[str, list[str]] = {}
    # Where ``meter serve`` POSTs this limit's alerts (docs/http.md, "Webhooks").
    webhook_url: str | None = None
    measure: Literal["usage", "cost"] = "usage"


class Alert(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """A customer's usage crossed a threshold of a limit within a period.

    ``seq`` is gap-free and increasing across all alerts; ``crossed_at_ms`` is
    when the engine received the batch that crossed it. A cost limit's alert has
    ``measure="cost"``, its ``currency``, and amounts as ``threshold`` and ``value``
    (``meter_api_name`` None for an invoice-total limit). Older peers and stored
    alerts without these fields decode with the defaults, and a usage limit's alert
    is encoded without them (``omit_defaults``): the same bytes as before pricing.
    """

    seq: int
    limit_id: str
    customer_id: str
    meter_api_name: str | None
    threshold: int | Decimal
    value: int | Decimal
    period_start_ms: int
    crossed_at_ms: int
    measure: Literal["usage", "cost"] = "usage"
    currency: str | None = None


class IngestAck(msgspec.Struct, frozen=True, rename="camel"):
    """The batch is durable (fsynced in the write-ahead log) and applied.

    ``accepted`` counts events applied now; ``duplicates`` counts events whose
    unique id had already been accepted for the same meter and customer.
    ``lsn`` is the write-ahead-log sequence number of the batch. ``alerts``
    lists the limit crossings this batch caused, when asked for with
    ``ingest(..., report_alerts=True)``.
    """

    accepted: int
    duplicates: int
    lsn: int
    alerts: list[Alert] = []


class Backup(msgspec.Struct, frozen=True, rename="camel"):
    """A backup written by ``Engine.backup``: the data directory ``path``.

    It holds exactly the write-ahead log up to ``lsn``: every batch acknowledged with
    a lsn <= ``lsn`` and nothing later. ``size_bytes`` is the size of its store file.
    """

    path: str
    lsn: int
    size_bytes: int


class Customer(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """A customer in the engine's registry.

    A customer appears in the registry when it is added, or with no name as soon
    as usage arrives for it: metering never waits for a customer to be set up.
    ``traits`` are string labels (a plan, a region); ``extra`` keeps other fields
    integrations send (Amberflo's address, lifecycleStage, description) as JSON
    values. ``created_ms`` and ``updated_ms`` are set by the engine.
    """

    id: str
    name: str | None = None
    email: str | None = None
    traits: dict[str, str] = {}
    enabled: bool = True
    extra: dict[str, Any] = {}
    created_ms: int = 0
    updated_ms: int = 0


class QueryPage(msgspec.Struct, frozen=True, rename="camel"):
    """A page of a query's groups (``Engine.query_page``).

    ``result`` holds the rows of the groups ranked ``offset`` to
    ``offset + take.limit - 1`` (every group without ``take``); ``other``, when
    asked for, one row per window (group ``{}``) with the exact aggregate of every
    group not in the page; ``group_count`` counts the groups before paging.
    """

    result: QueryResult
    other: list[Row] | None
    group_count: int
    offset: int = 0


class RawEventPage(msgspec.Struct, frozen=True, rename="camel"):
    """A page of the raw events retained in the write-ahead log (``Engine.raw_events``).

    ``events`` are accepted events (duplicates left out) in the order they were
    logged; the next page starts at ``next_lsn`` / ``next_index`` (pass them back as
    ``from_lsn`` / ``from_index``); ``done``: there is no next page.
    """

    events: list[Event]
    next_lsn: int
    next_index: int
    done: bool


class DimensionValue(msgspec.Struct, frozen=True, rename="camel"):
    """One value of a dimension key and the meter's usage over the events holding it."""

    value: str
    usage: int | Decimal


class Dimension(msgspec.Struct, frozen=True, rename="camel"):
    """A dimension key seen on a meter's events (``Engine.dimensions``).

    ``values`` are its top values by usage (best first, ties by value);
    ``value_count`` counts its distinct values; ``other`` is the exact usage of
    every value not in ``values`` together (None when there is none).
    """

    key: str
    value_count: int
    values: list[DimensionValue]
    other: int | Decimal | None = None


MAX_PATH_CHARS = 512


def parse_path(path: object) -> tuple[str, ...]:
    """The member names of a JSON path: ``$.a.b`` or ``$['a']["b"]`` (members only, no
    wildcards, filters or array indexes); raises ``ValueError`` for anything else."""
    if type(path) is not str or not path.startswith("$") or len(path) > MAX_PATH_CHARS:
        raise ValueError(f"JSON path {path!r} must start with '$' (like '$.tokens')")
    names: list[str] = []
    position = 1
    while position < len(path):
        char = path[position]
        if char == ".":
            end = position + 1
            while end < len(path) and path[end] not in ".[":
                end += 1
            name = path[position + 1:end]
            if not name or name == "*":
                raise ValueError(f"JSON path {path!r}: an empty or wildcard member name")
            names.append(name)
            position = end
        elif char == "[" and path[position + 1:position + 2] in ("'", '"'):
            quote = path[position + 1]
            end = path.find(quote + "]", position + 2)
            if end < 0:
                raise ValueError(f"JSON path {path!r}: an unclosed [{quote}...{quote}]")
            names.append(path[position + 2:end])
            position = end + 2
        else:
            raise ValueError(f"JSON path {path!r}: only .name and ['name'] members are "
                             "supported (no wildcards, filters or indexes)")
    if not names:
        raise ValueError(f"JSON path {path!r} names no member")
    return tuple(names)
