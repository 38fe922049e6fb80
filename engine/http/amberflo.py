"""The Amberflo-compatible routes: ``/ingest``, ``/usage``, ``/usage/batch``,
``/usage/all`` and ``/meters`` (docs/http.md has the mapping and the differences).

Shell layer: the engine's public API (``Engine``, ``Event``, ``Query``, ``Take``,
``Meter``), ``engine.errors`` and ``engine.http``. Amberflo's JSON shapes are
this module's own structs; the engine's types keep their shape.

Invariants:

- An ingest is all or nothing: a record that does not decode, or that the
  engine refuses, makes the whole request a 400 naming each bad record by
  index, and nothing is applied. Duplicates by ``uniqueId`` are absorbed, and
  the answer still counts every record sent ("N records were ingested").
- A customer-bound key may send only its own customer's records and sees only
  its own customer's usage (``engine.server`` decides this, as on TCP).
- Report values are the engine's exact ``int``/``Decimal``; only
  ``percentageFromPrevious`` is a float.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec

from engine import Engine, Event, Meter, Query, Take
from engine.access import restrict_query
from engine.errors import Forbidden, InvalidRequest, UnknownMeter
from engine.http.app import Request, Response, Router, json_response, text_response
from engine.http.codecs import decode_each, decode_json, split_records
from engine.http.errors import Problem, bad_request
from engine.schema import AGGREGATIONS

log = logging.getLogger(__name__)

Value = int | Decimal
INTERVALS = {"minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400, "month": 0}
AMBERFLO_KEYS = {"customerId": "customer_id"}  # Amberflo's name -> the engine's
ENGINE_KEYS = {engine: amberflo for amberflo, engine in AMBERFLO_KEYS.items()}
LOGGED_PROBLEMS = 5
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second datetime can name


# ------------------------------------------------------------------ wire types


class IngestRecord(msgspec.Struct, rename="camel", forbid_unknown_fields=False):
    customer_id: str
    meter_api_name: str
    meter_value: int | Decimal
    meter_time_in_millis: int
    dimensions: dict[str, str] | None = None
    unique_id: str | None = None


_records_decoder: msgspec.json.Decoder[list[IngestRecord] | IngestRecord] = (
    msgspec.json.Decoder(list[IngestRecord] | IngestRecord))


class TimeRange(msgspec.Struct, rename="camel"):
    start_time_in_seconds: int
    end_time_in_seconds: int | None = None


class UsageTake(msgspec.Struct, rename="camel"):
    limit: int
    is_ascending: bool = False


class UsageQuery(msgspec.Struct, rename="camel", omit_defaults=True):
    meter_api_name: str
    time_grouping_interval: str
    time_range: TimeRange
    aggregation: str | None = None  # the meter's own aggregation when absent
    group_by: list[str] | None = None
    filter: dict[str, list[str]] | None = None
    take: UsageTake | None = None


class GroupInfo(msgspec.Struct, rename="camel"):
    group_info: dict[str, str | None]


class BucketValue(msgspec.Struct, rename="camel"):
    value: Value
    seconds_since_epoch_utc: int
    percentage_from_previous: float


class ClientMeter(msgspec.Struct, rename="camel"):
    group: GroupInfo | None
    group_value: Value
    values: list[BucketValue]


class UsageReport(msgspec.Struct, rename="camel"):
    metadata: UsageQuery
    seconds_since_epoch_intervals: list[int]
    client_meters: list[ClientMeter]


class AmberfloMeterIn(msgspec.Struct, rename="camel"):
    meter_api_name: str
    label: str | None = None
    meter_type: str | None = None
    aggregation: str | None = None
    description: str | None = None
    aggregation_dimensions: list[str] | None = None
    # OpenMeter ingest (POST /api/v1/events): the engine's Meter fields of the same names.
    event_type: str | None = None
    value_property: str | None = None
    dimension_paths: dict[str, str] | None = None


class AmberfloMeter(msgspec.Struct, rename="camel", omit_defaults=True):
    id: str
    meter_api_name: str
    label: str
    meter_type: str
    aggregation: str
    description: str
    aggregation_dimensions: list[str]
    event_type: str | None = None
    value_property: str | None = None
    dimension_paths: dict[str, str] = {}


METER_TYPES = {"sum_of_all_usage": "sum", "active_users": "unique_count"}
TYPE_OF_AGGREGATION = {aggregation: meter_type for meter_type, aggregation in METER_TYPES.items()}


# ----------------------------------------------------------------------- ingest


async def ingest(request: Request) -> Response:
    body = await request.body()
    try:
        # The whole body in one call: no Python work per record for a good batch.
        decoded = _records_decoder.decode(body)
        records = decoded if isinstance(decoded, list) else [decoded]
    except (msgspec.ValidationError, msgspec.DecodeError):
        # Something is wrong: decode record by record to name each bad one.
        raws, _ = split_records(body)
        records, problems = decode_each(raws, IngestRecord)
        if problems:
            refuse(request, "invalid_record", problems)
            raise bad_request(f"{len(problems)} of {len(raws)} record(s) are invalid; "
                              "nothing was ingested", problems, code="batch_rejected") from None
    metrics = request.app.metrics
    customer = request.principal.customer_id
    if customer is not None:
        foreign = [Problem(i, "this API key may only send records of its own customer")
                   for i, r in enumerate(records) if r.customer_id != customer]
        if foreign:
            refuse(request, "forbidden", foreign)
            raise Forbidden(f"{len(foreign)} record(s) are of another customer; "
                            "nothing was ingested")
    events = [Event(meter_api_name=r.meter_api_name, customer_id=r.customer_id,
                    meter_value=r.meter_value, meter_time_in_millis=r.meter_time_in_millis,
                    dimensions=r.dimensions or {}, unique_id=r.unique_id) for r in records]
    started = time.perf_counter()
    try:
        await request.engine.ingest(events)
    except InvalidRequest as exc:
        bad = getattr(exc, "problems", None)
        refuse(request, exc.code, [Problem(p.index, p.reason) for p in bad]
                if bad else [Problem(-1, exc.detail)], count=len(bad) if bad else len(events))
        raise
    metrics.ingest_seconds.observe(time.perf_counter() - started)
    metrics.events_received.inc(len(events))
    return text_response(f"{len(events)} records were ingested")


def refuse(request: Request, reason: str, problems: list[Problem],
            count: int | None = None) -> None:
    request.app.metrics.events_rejected.labels(reason).inc(
        len(problems) if count is None else count)
    listed = "; ".join(f"{p.index}: {p.reason}" for p in problems[:LOGGED_PROBLEMS])
    log.info("HTTP ingest refused (%s), %d record(s): %s", reason, len(problems), listed)


# ------------------------------------------------------------------------ usage


async def usage(request: Request) -> Response:
    query = decode_json(await request.body(), UsageQuery, "usage query")
    return json_response(await report(request, query))


async def usage_batch(request: Request) -> Response:
    queries = decode_json(await request.body(), list[UsageQuery], "usage queries")
    return json_response([await report(request, query) for query in queries])


async def usage_all(request: Request) -> Response:
    start_text = request.param("startTimeInSeconds")
    interval = request.param("timeGroupingInterval")
    if start_text is None or interval is None:
        raise bad_request("startTimeInSeconds and timeGroupingInterval are required")
    end_text = request.param("endTimeInSeconds")
    time_range = TimeRange(_int_param("startTimeInSeconds", start_text),
                           _int_param("endTimeInSeconds", end_text) if end_text else None)
    group_by = request.param("groupBy")
    if group_by is not None and group_by != "customerId":
        raise bad_request(f"groupBy may only be customerId here, got {group_by!r}")
    customer = request.param("customerId")
    reports = []
    for meter in request.engine.meters():
        query = UsageQuery(
            meter_api_name=meter.name, time_grouping_interval=interval, time_range=time_range,
            aggregation=meter.aggregation, group_by=[group_by] if group_by else None,
            filter={"customerId": [customer]} if customer else None)
        reports.append(await report(request, query))
    return json_response(reports)


def _int_param(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise bad_request(f"{name} must be an integer number of seconds, got {text!r}") from None


async def report(request: Request, usage_query: UsageQuery) -> UsageReport:
    """One Amberflo usage report, answered by the engine's own queries."""
    engine = request.engine
    meter = _meter(engine, usage_query.meter_api_name)
    aggregation = (usage_query.aggregation or meter.aggregation).lower()
    if aggregation != meter.aggregation:
        raise bad_request(
            f"meter {meter.name!r} aggregates by {meter.aggregation.upper()}; it cannot answer "
            f"{aggregation.upper()} (a report answers the meter's own aggregation only)",
            code="invalid_query")
    interval = usage_query.time_grouping_interval.lower()
    if interval not in INTERVALS:
        raise bad_request(f"timeGroupingInterval must be one of "
                          f"{', '.join(i.upper() for i in INTERVALS)}, got "
                          f"{usage_query.time_grouping_interval!r}", code="invalid_query")
    start_s = usage_query.time_range.start_time_in_seconds
    # No end: now, rounded up to a whole second, so that usage up to this instant counts.
    end_s = usage_query.time_range.end_time_in_seconds or -(-request.app.clock_ms() // 1000)
    for name, seconds in (("startTimeInSeconds", start_s), ("endTimeInSeconds", end_s)):
        if not 0 <= seconds <= MAX_SECONDS:
            raise bad_request(f"{name} must be from 0 to {MAX_SECONDS} (year 9999), "
                              f"got {seconds}", code="invalid_query")
    take = usage_query.take
    query = Query(
        meter_api_name=meter.name, start_ms=start_s * 1000, end_ms=end_s * 1000,
        window=interval,  # type: ignore[arg-type]  # checked against INTERVALS above
        group_by=[AMBERFLO_KEYS.get(k, k) for k in usage_query.group_by or []],
        filter={AMBERFLO_KEYS.get(k, k): v for k, v in (usage_query.filter or {}).items()},
        take=Take(limit=take.limit, ascending=take.is_ascending) if take else None)
    query = restrict_query(query, request.principal.customer_id)
    windowed = await _timed_query(request, query)
    totals: dict[tuple[Any, ...], Value] | None = None
    if aggregation not in ("sum", "count", "max", "min"):
        # avg, latest, unique_count: a total is not a function of the window values.
        overall = await _timed_query(request, msgspec.structs.replace(query, window=None))
        totals = {tuple(row.group.values()): row.value for row in overall.rows}
    intervals = interval_starts(start_s, end_s, interval)
    position = {start: k for k, start in enumerate(intervals)}
    groups: dict[tuple[Any, ...], list[Value]] = {}
    labels: dict[tuple[Any, ...], dict[str, str | None]] = {}
    for row in windowed.rows:
        key = tuple(row.group.values())
        values = groups.get(key)
        if values is None:
            values = groups[key] = [0] * len(intervals)
            labels[key] = row.group
        k = position.get(row.window_start_ms // 1000)
        if k is not None:
            values[k] = row.value
    meters = []
    for key, values in groups.items():
        group_value = totals[key] if totals is not None else _combine(aggregation, values)
        group = GroupInfo({ENGINE_KEYS.get(k, k): v for k, v in labels[key].items()})
        meters.append(ClientMeter(group if usage_query.group_by else None, group_value,
                                  _bucket_values(intervals, values)))
    ascending = bool(take and take.is_ascending)
    meters.sort(key=lambda m: m.group_value, reverse=not ascending)
    if take is not None:
        meters = meters[: take.limit]
    metadata = msgspec.structs.replace(
        usage_query, aggregation=aggregation.upper(), time_grouping_interval=interval.upper(),
        time_range=TimeRange(start_s, end_s))
    return UsageReport(metadata, intervals, meters)


async def _timed_query(request: Request, query: Query) -> Any:
    started = time.perf_counter()
    result = await request.engine.query(query)
    request.app.metrics.query_seconds.observe(time.perf_counter() - started)
    return result


def _meter(engine: Engine, name: str) -> Meter:
    for meter in engine.meters():
        if meter.name == name:
            return meter
    raise UnknownMeter(f"unknown meter {name!r}")


def _combine(aggregation: str, values: list[Value]) -> Value:
    if aggregation == "max":
        return max(values)
    if aggregation == "min":
        return min(values)
    return sum(values)


def _bucket_values(intervals: list[int], values: list[Value]) -> list[BucketValue]:
    out = []
    previous: Value | None = None
    for start, value in zip(intervals, values, strict=True):
        out.append(BucketValue(value, start, percentage_change(previous, value)))
        previous = value
    return out


def percentage_change(previous: Value | None, current: Value) -> float:
    """Amberflo's ``percentageFromPrevious``: 0 first, ±100 from zero, else the change in %."""
    if previous is None or previous == current:
        return 0.0
    if previous == 0:
        return 100.0 if current > 0 else -100.0
    change = float((Decimal(current) - Decimal(previous)) / abs(Decimal(previous)) * 100)
    return change if math.isfinite(change) else 0.0


def interval_starts(start_s: int, end_s: int, interval: str) -> list[int]:
    """UTC-aligned bucket starts from the one holding ``start_s`` to the one holding
    ``end_s``, inclusive, as Amberflo lists them (weeks start on Monday, months on the 1st)."""
    if end_s < start_s:
        return []
    step = INTERVALS[interval]
    if interval in ("minute", "hour", "day"):
        return list(range(start_s - start_s % step, end_s - end_s % step + 1, step))
    day = datetime.fromtimestamp(start_s - start_s % 86400, UTC)
    if interval == "week":
        day -= timedelta(days=day.weekday())
    else:
        day = day.replace(day=1)
    starts = []
    while (stamp := int(day.timestamp())) <= end_s:
        starts.append(stamp)
        if interval == "week":
            day += timedelta(days=7)
        else:
            day = day.replace(year=day.year + day.month // 12, month=day.month % 12 + 1)
    return starts


# ----------------------------------------------------------------------- meters


def to_amberflo(meter: Meter) -> AmberfloMeter:
    return AmberfloMeter(
        id=meter.name, meter_api_name=meter.name, label=meter.name,
        meter_type=TYPE_OF_AGGREGATION.get(meter.aggregation, meter.aggregation),
        aggregation=meter.aggregation.upper(), description=meter.description,
        aggregation_dimensions=[meter.unique_dimension] if meter.unique_dimension else [],
        event_type=meter.event_type, value_property=meter.value_property,
        dimension_paths=dict(meter.dimension_paths))


def from_amberflo(meter: AmberfloMeterIn) -> Meter:
    by_type = None
    if meter.meter_type is not None:
        by_type = METER_TYPES.get(meter.meter_type.lower())
        if by_type is None:
            raise bad_request(f"meterType must be one of {', '.join(METER_TYPES)}, got "
                              f"{meter.meter_type!r} (or give aggregation instead)")
    by_name = meter.aggregation.lower() if meter.aggregation is not None else None
    if by_name is not None and by_name not in AGGREGATIONS:
        raise bad_request(f"aggregation must be one of {', '.join(AGGREGATIONS)}, "
                          f"got {meter.aggregation!r}")
    if by_type and by_name and by_type != by_name:
        raise bad_request(f"meterType {meter.meter_type!r} and aggregation "
                          f"{meter.aggregation!r} disagree")
    aggregation = by_name or by_type or "sum"
    dimensions = meter.aggregation_dimensions or []
    if aggregation == "unique_count" and len(dimensions) != 1:
        raise bad_request("an active_users (unique_count) meter needs exactly one "
                          "aggregationDimensions entry: the dimension whose values it counts")
    return Meter(name=meter.meter_api_name,
                 aggregation=aggregation,  # type: ignore[arg-type]  # checked above
                 unique_dimension=dimensions[0] if aggregation == "unique_count" else None,
                 description=meter.description or "", event_type=meter.event_type,
                 value_property=meter.value_property,
                 dimension_paths=meter.dimension_paths or {})


async def list_meters(request: Request) -> Response:
    wanted = request.param("meterApiName")
    return json_response([to_amberflo(m) for m in request.engine.meters()
                          if wanted is None or m.name == wanted])


async def define_meter(request: Request) -> Response:
    meter = from_amberflo(decode_json(await request.body(), AmberfloMeterIn, "meter"))
    return json_response(to_amberflo(await request.engine.define_meter(meter)))


def add_routes(router: Router) -> None:
    router.add("POST", "/ingest", ingest, "ingest")
    router.add("POST", "/usage", usage, "query")
    router.add("POST", "/usage/batch", usage_batch, "query")
    router.add("GET", "/usage/all", usage_all, "query")
    router.add("GET", "/meters", list_meters, "query")
    router.add("POST", "/meters", define_meter, "admin")
