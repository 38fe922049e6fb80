"""OpenMeter ingest: ``POST /api/v1/events`` with CloudEvents (docs/http.md has the mapping).

Shell layer: the engine's public API (``engine.schema.parse_path`` for JSON paths),
``engine.errors`` and ``engine.http``. A CloudEvent becomes one engine ``Event``
per meter whose ``event_type`` equals its ``type``:

- ``subject`` is the customer; ``time`` (RFC 3339, floored to the millisecond) the
  event time, the server clock when absent;
- the value is read from ``data`` at the meter's ``value_property`` (a number, or
  a string holding one; exact); a ``count`` meter counts 1; a ``unique_count``
  meter counts distinct values found there (put in its ``unique_dimension``);
- dimensions are read from ``data`` at the meter's ``dimension_paths``: strings,
  numbers and booleans become strings; null or missing leaves the key out;
- the unique id is ``len(source):source`` followed by ``id``, so two sources that
  reuse an id never collide, and a retry of the same event is a duplicate.

Invariants (as for ``/ingest``): all or nothing, every refused event named by
its index in the request with a reason and counted in
``events_rejected_total{reason}``; a customer-bound key may send only its own
customer's events. Success is 204 with no body, as OpenMeter answers.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import msgspec

from engine import Event, Meter
from engine.errors import Forbidden, InvalidRequest
from engine.http.amberflo import refuse
from engine.http.app import Request, Response, Router
from engine.http.errors import HttpError, Problem, bad_request
from engine.schema import parse_path

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
PLAIN = "application/json"  # either shape, told apart by the body


class CloudEvent(msgspec.Struct, forbid_unknown_fields=False):
    """A CloudEvents 1.0 event in its JSON format (only what metering reads)."""

    specversion: str
    id: str
    source: str
    type: str
    subject: str
    time: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")  # decoded apart, with exact decimals
    datacontenttype: str | None = None


class CloudEventDoc(msgspec.Struct, rename={"type_": "type"}):
    """``CloudEvent`` as the OpenAPI document describes it (``data``: any JSON object)."""

    specversion: Literal["1.0"]
    id: str
    source: str
    type_: str
    subject: str
    time: str | None = None
    data: dict[str, Any] | None = None
    datacontenttype: str | None = None


_event_decoder = msgspec.json.Decoder(CloudEvent)
# Exact values: a JSON number with a fraction or exponent becomes a Decimal, never a float.
_data_decoder = msgspec.json.Decoder(float_hook=Decimal)
_INTEGER = re.compile(r"[+-]?[0-9]{1,400}")


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _split(body: bytes, content_type: str) -> list[msgspec.Raw]:
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in (SINGLE, BATCH, PLAIN):
        raise HttpError(415, "unsupported_media_type",
                        f"Content-Type must be {SINGLE} or {BATCH}, got {content_type!r}")
    try:
        parsed = msgspec.json.decode(body, type=list[msgspec.Raw] | dict[str, msgspec.Raw])
    except msgspec.ValidationError:
        raise bad_request("the body must be a CloudEvent (an object) or, with "
                          f"{BATCH}, an array of them") from None
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise bad_request(f"body is not valid JSON: {exc}") from None
    if isinstance(parsed, dict):
        if media == BATCH:
            raise bad_request(f"{BATCH} needs an array of CloudEvents")
        return [msgspec.Raw(body)]
    if media == SINGLE:
        raise bad_request(f"{SINGLE} is one CloudEvent; send an array as {BATCH}")
    return parsed


def _time_ms(text: str | None, now_ms: int) -> int:
    if text is None:
        return now_ms
    if "T" not in text.upper():
        raise _Refused(f"time {text!r} is not an RFC 3339 date-time")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Refused(f"time {text!r} is not an RFC 3339 date-time") from None
    if moment.tzinfo is None:
        raise _Refused(f"time {text!r} has no time zone offset (RFC 3339 needs one)")
    # Whole microseconds from the epoch, exact (no float), floored to milliseconds.
    delta = moment - datetime.fromtimestamp(0, moment.tzinfo)
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return micros // 1000


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(data, dict) or name not in data:
            return None
        data = data[name]
    return data


def _number(found: Any, where: str) -> int | Decimal:
    if type(found) is int or type(found) is Decimal:
        return found
    if type(found) is str:
        text = found.strip()
        if _INTEGER.fullmatch(text):
            return int(text)
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise _Refused(f"{where} is {found!r}, not a number") from None
        if not number.is_finite():
            raise _Refused(f"{where} is {found!r}, not a finite number")
        return number
    if found is None:
        raise _Refused(f"{where} is missing")
    raise _Refused(f"{where} is a {type(found).__name__}, not a number")


def _text(found: Any, where: str) -> str | None:
    if found is None:
        return None
    if type(found) is str:
        return found
    if type(found) is bool:
        return "true" if found else "false"
    if type(found) is int or type(found) is Decimal:
        return str(found)
    raise _Refused(f"{where} is a JSON {'object' if isinstance(found, dict) else 'array'}; "
                   "a dimension must be a string, number or boolean")


def to_events(cloud: CloudEvent, meters: list[Meter], now_ms: int) -> list[Event]:
    """The engine events of one CloudEvent (one per meter of its type)."""
    if cloud.specversion != "1.0":
        raise _Refused(f"specversion must be '1.0', got {cloud.specversion!r}")
    for name in ("id", "source", "type", "subject"):
        if not getattr(cloud, name):
            raise _Refused(f"{name} must be a non-empty string")
    if not meters:
        raise _Refused(f"no meter has eventType {cloud.type!r}")
    try:
        data: Any = _data_decoder.decode(cloud.data)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # pragma: no cover
        raise _Refused(f"data is not valid JSON: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise _Refused("data must be a JSON object")
    time_ms = _time_ms(cloud.time, now_ms)
    unique_id = f"{len(cloud.source)}:{cloud.source}{cloud.id}"
    events = []
    for meter in meters:
        dimensions: dict[str, str] = {}
        for key, path in meter.dimension_paths.items():
            text = _text(_lookup(data, parse_path(path)), f"data at {path} ({key})")
            if text is not None:
                dimensions[key] = text
        value: int | Decimal = 1
        if meter.value_property is not None and meter.aggregation != "count":
            found = _lookup(data, parse_path(meter.value_property))
            where = f"data at {meter.value_property} (meter {meter.name!r})"
            if meter.aggregation == "unique_count":
                counted = _text(found, where)
                if counted is None:
                    raise _Refused(f"{where} is missing")
                assert meter.unique_dimension is not None  # check_meter requires it
                dimensions[meter.unique_dimension] = counted
            else:
                value = _number(found, where)
        events.append(Event(meter_api_name=meter.name, customer_id=cloud.subject,
                            meter_value=value, meter_time_in_millis=time_ms,
                            dimensions=dimensions, unique_id=unique_id))
    return events


async def ingest_events(request: Request) -> Response:
    raws = _split(await request.body(), request.headers.get("content-type", ""))
    by_type: dict[str, list[Meter]] = {}
    for meter in request.engine.meters():
        if meter.event_type is not None:
            by_type.setdefault(meter.event_type, []).append(meter)
    now_ms = request.app.clock_ms()
    customer = request.principal.customer_id
    events: list[Event] = []
    origin: list[int] = []  # the CloudEvent index of each engine event
    problems: list[Problem] = []
    foreign: list[Problem] = []
    for index, raw in enumerate(raws):
        try:
            cloud = _event_decoder.decode(raw)
            mapped = to_events(cloud, by_type.get(cloud.type, []), now_ms)
        except msgspec.ValidationError as exc:
            problems.append(Problem(index, str(exc)))
            continue
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # pragma: no cover
            problems.append(Problem(index, f"not valid JSON: {exc}"))
            continue
        except _Refused as exc:
            problems.append(Problem(index, exc.reason))
            continue
        if customer is not None and cloud.subject != customer:
            foreign.append(Problem(index, "this API key may only send events of its own "
                                          "customer"))
        events.extend(mapped)
        origin.extend([index] * len(mapped))
    if problems:
        refuse(request, "invalid_record", problems)
        raise bad_request(f"{len(problems)} of {len(raws)} event(s) are invalid; nothing was "
                          "ingested", problems, code="batch_rejected")
    if foreign:
        refuse(request, "forbidden", foreign)
        raise Forbidden(f"{len(foreign)} event(s) are of another customer; nothing was "
                        "ingested")
    if events:
        started = time.perf_counter()
        try:
            await request.engine.ingest(events)
        except InvalidRequest as exc:
            bad = getattr(exc, "problems", None)
            if not bad:
                refuse(request, exc.code, [Problem(-1, exc.detail)], count=len(raws))
                raise
            named = sorted({(origin[p.index] if 0 <= p.index < len(origin) else p.index,
                             p.reason) for p in bad})
            mapped_problems = [Problem(index, reason) for index, reason in named]
            refuse(request, exc.code, mapped_problems)
            raise bad_request(f"{len({i for i, _ in named})} of {len(raws)} event(s) were "
                              "refused; nothing was ingested", mapped_problems,
                              code="batch_rejected") from None
        request.app.metrics.ingest_seconds.observe(time.perf_counter() - started)
        request.app.metrics.events_received.inc(len(events))
    return Response(204, b"")


def add_routes(router: Router) -> None:
    router.add("POST", "/api/v1/events", ingest_events, "ingest")
