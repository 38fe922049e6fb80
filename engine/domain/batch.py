"""Batch validation and preparation: the per-event work done once per batch.

Pure domain layer: standard library and ``engine.schema`` only. ``prepare_batch``
checks every event of a batch, names each bad one by index and reason, and
either refuses the whole batch or splits it by shard into compact tuples the
shard actors apply. Replay of the write-ahead log runs the same function with
``trusted=True`` (no clock, no limits): a logged batch was valid when logged,
and replay must be a pure function of the log.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from engine.domain.values import exact_value
from engine.errors import BatchRejected, EventProblem, MeterConflict
from engine.schema import AGGREGATIONS, Event, Meter

MINUTE_MS = 60_000
DAY_MS = 86_400_000

# Aggregation kinds as small ints so the hot loop branches on an int compare.
SUM, COUNT, MAX, MIN, AVG, LATEST, UNIQUE = range(7)
KIND_BY_AGGREGATION = dict(zip(AGGREGATIONS, range(7), strict=True))

# Timestamps: non-negative and before year 10000, so a minute index fits 32 bits.
MAX_TIMESTAMP_MS = 253_402_300_800_000


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """What an event may look like. Defaults are documented in docs/api.md."""

    late_ms: int = 35 * DAY_MS  # events up to 35 days old are accepted
    future_ms: int = 5 * MINUTE_MS  # and up to 5 minutes ahead of the engine clock
    max_dimensions: int = 16
    max_key_chars: int = 128  # dimension keys
    max_value_chars: int = 256  # dimension values, customer ids, unique ids, meter names
    max_batch_events: int = 100_000


@dataclass(frozen=True, slots=True, eq=False)
class MeterDef:
    """A defined meter, as the shards use it."""

    name: str
    kind: int
    unique_dimension: str | None
    meter: Meter


def check_meter(meter: Meter, limits: IngestLimits) -> MeterDef:
    """Validate a meter definition; raises ``MeterConflict``-free ``ValueError`` on bad input."""
    if type(meter.name) is not str or not meter.name:
        raise ValueError("meter name must be a non-empty string")
    if len(meter.name) > limits.max_value_chars:
        raise ValueError(f"meter name is longer than {limits.max_value_chars} characters")
    if meter.aggregation not in KIND_BY_AGGREGATION:
        raise ValueError(
            f"unknown aggregation {meter.aggregation!r}: use one of {', '.join(AGGREGATIONS)}"
        )
    if meter.aggregation == "unique_count":
        if type(meter.unique_dimension) is not str or not meter.unique_dimension:
            raise ValueError("a unique_count meter needs unique_dimension (a dimension key)")
    elif meter.unique_dimension is not None:
        raise ValueError("unique_dimension is only meaningful for unique_count meters")
    return MeterDef(
        meter.name, KIND_BY_AGGREGATION[meter.aggregation], meter.unique_dimension, meter
    )


def merge_meter(existing: MeterDef | None, new: MeterDef) -> bool:
    """True if ``new`` must be stored; raises ``MeterConflict`` if it contradicts ``existing``."""
    if existing is None:
        return True
    old = existing.meter
    if old.aggregation != new.meter.aggregation or old.unique_dimension != new.unique_dimension:
        raise MeterConflict(
            f"meter {new.name!r} is already defined with aggregation {old.aggregation!r}"
            + (f" on {old.unique_dimension!r}" if old.unique_dimension else "")
            + f"; refusing to redefine it as {new.meter.aggregation!r}"
        )
    return False


def shard_of(customer_id: str, shard_count: int) -> int:
    """Stable across processes and machines (never Python's randomised ``hash``)."""
    return zlib.crc32(customer_id.encode()) % shard_count


# A prepared event: (meter, customer_id, dims_key, ts_ms, value, unique_id, index, unique_value)
Prepared = tuple[MeterDef, str, tuple[tuple[str, str], ...], int, Any, str | None, int, str | None]


class ShardRouter:
    """Customer → shard, cached: crc32 once per distinct customer."""

    __slots__ = ("_cache", "shard_count")

    def __init__(self, shard_count: int) -> None:
        self.shard_count = shard_count
        self._cache: dict[str, int] = {}

    def __call__(self, customer_id: str) -> int:
        shard = self._cache.get(customer_id)
        if shard is None:
            shard = self._cache[customer_id] = shard_of(customer_id, self.shard_count)
        return shard


def _problem_with_dimensions(dims: object, limits: IngestLimits) -> str | None:
    if type(dims) is not dict:
        return f"dimensions must be a mapping of strings to strings, got {type(dims).__name__}"
    if len(dims) > limits.max_dimensions:
        return f"{len(dims)} dimensions, at most {limits.max_dimensions} allowed"
    for key, value in dims.items():
        if type(key) is not str or not key:
            return f"dimension key {key!r} must be a non-empty string"
        if type(value) is not str:
            return f"dimension {key!r} must have a string value, got {type(value).__name__}"
        if len(key) > limits.max_key_chars:
            return f"dimension key {key[:40]!r}... is longer than {limits.max_key_chars} chars"
        if len(value) > limits.max_value_chars:
            return f"dimension {key!r} value is longer than {limits.max_value_chars} chars"
        if key == "customer_id":
            return "'customer_id' is reserved and cannot be a dimension key"
    return None


def prepare_batch(
    events: list[Event],
    meters: dict[str, MeterDef],
    route: ShardRouter,
    limits: IngestLimits,
    now_ms: int | None,
) -> list[list[Prepared]]:
    """Validate ``events`` and split them by shard.

    ``now_ms=None`` means trusted replay: no clock checks. Raises
    ``BatchRejected`` listing every bad event; then nothing is returned, so
    nothing can be applied.
    """
    slices: list[list[Prepared]] = [[] for _ in range(route.shard_count)]
    problems: list[EventProblem] = []
    if now_ms is None:
        oldest_ms, newest_ms = 0, MAX_TIMESTAMP_MS
    else:
        oldest_ms = max(0, now_ms - limits.late_ms)
        newest_ms = min(MAX_TIMESTAMP_MS, now_ms + limits.future_ms)
    if len(events) > limits.max_batch_events and now_ms is not None:
        raise BatchRejected(
            [EventProblem(limits.max_batch_events, f"batch has {len(events)} events, "
                          f"at most {limits.max_batch_events} allowed")]
        )
    max_chars = limits.max_value_chars
    get_meter = meters.get
    for index, event in enumerate(events):
        if type(event) is not Event:
            problems.append(EventProblem(index, f"not an Event: {type(event).__name__}"))
            continue
        meter = get_meter(event.meter_api_name)
        if meter is None:
            problems.append(EventProblem(index, f"unknown meter {event.meter_api_name!r}"))
            continue
        customer = event.customer_id
        if type(customer) is not str or not customer or len(customer) > max_chars:
            problems.append(EventProblem(
                index,
                "customer_id must be a non-empty string of at most "
                f"{max_chars} characters, got {customer!r:.60}",
            ))
            continue
        value: Any = event.meter_value
        if type(value) is not int or not -(10**30) < value < 10**30:
            try:
                value = exact_value(value)
            except ValueError as exc:
                problems.append(EventProblem(index, str(exc)))
                continue
        ts = event.meter_time_in_millis
        if type(ts) is not int or not oldest_ms <= ts <= newest_ms:
            problems.append(EventProblem(index, _timestamp_problem(ts, oldest_ms, newest_ms)))
            continue
        dims = event.dimensions
        unique_value = None
        if dims:
            problem = _problem_with_dimensions(dims, limits)
            if problem is not None:
                problems.append(EventProblem(index, problem))
                continue
            if meter.unique_dimension is not None:
                unique_value = dims.get(meter.unique_dimension)
                if unique_value is not None:
                    dims = {k: v for k, v in dims.items() if k != meter.unique_dimension}
            if len(dims) == 1:
                dims_key: tuple[tuple[str, str], ...] = tuple(dims.items())
            else:
                dims_key = tuple(sorted(dims.items()))
        else:
            dims_key = ()
        if meter.unique_dimension is not None and unique_value is None:
            problems.append(EventProblem(
                index,
                f"meter {meter.name!r} counts distinct {meter.unique_dimension!r} "
                "but the event has no such dimension",
            ))
            continue
        unique_id = event.unique_id
        if unique_id is not None and (
            type(unique_id) is not str or not unique_id or len(unique_id) > max_chars
        ):
            problems.append(EventProblem(
                index, f"unique_id must be null or a non-empty string of at most {max_chars} chars"
            ))
            continue
        slices[route(customer)].append(
            (meter, customer, dims_key, ts, value, unique_id, index, unique_value)
        )
    if problems:
        raise BatchRejected(problems)
    return slices


def _timestamp_problem(ts: object, oldest_ms: int, newest_ms: int) -> str:
    if type(ts) is not int:
        return f"meter_time_in_millis must be integer milliseconds, got {type(ts).__name__}"
    if ts < oldest_ms:
        return (f"meter_time_in_millis {ts} is older than the oldest accepted "
                f"{oldest_ms} (late-event limit)")
    return (f"meter_time_in_millis {ts} is later than the newest accepted {newest_ms} "
            "(future tolerance)")


def decimal_or_int(value: int | str) -> int | Decimal:
    """Inverse of the snapshot encoding of a value: ints beyond 64 bits travel as digits."""
    if type(value) is int:
        return value
    text: str = value  # type: ignore[assignment]
    if text.lstrip("-").isdigit():
        return int(text)
    return Decimal(text)
