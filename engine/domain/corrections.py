"""Corrections: the buckets a correction rebuilt, read and written.

Pure domain layer: standard library and the domain modules ``aggregates``,
``blocks`` (its constants), ``records``, ``series`` and ``values``. A correction
(``records.WalCorrection``) carries, per customer, the minutes it touched and
every bucket of those minutes as recomputed from the events that remain.
``minute_buckets`` reads them from a scratch meter shard the runtime built from
those events; ``replace_minutes`` writes them into a meter shard (the head, or a
copy of a sealed block), replacing what the minutes held: exact for every
aggregation (a max or a latest cannot be "subtracted", so the bucket is rebuilt,
never adjusted). ``split_sealed`` divides a change at a shard's sealed boundary:
the head's minutes, and per sealed UTC day the minutes a new version of that
day's block takes (``ShardState.correct``). Deterministic: the same record gives
the same state.
"""

from __future__ import annotations

from bisect import bisect_left
from decimal import Decimal
from typing import Any

from engine.domain.aggregates import AVG, COUNT, LATEST, MAX, MIN, SUM, UNIQUE
from engine.domain.blocks import DAY_MINUTES
from engine.domain.records import CorrectedBucket, CorrectedMinutes, decimal_or_int
from engine.domain.series import MeterShard, Series
from engine.domain.values import fits_msgpack_int


def encode_value(kind: int, value: Any) -> Any:
    """A bucket's value column entry as a record stores it."""
    if kind == UNIQUE:
        return [value] if type(value) is str else sorted(value)
    if kind == COUNT:
        return 0
    if type(value) is int and fits_msgpack_int(value):
        return value
    return str(value)


def decode_value(kind: int, stored: Any) -> Any:
    if kind == UNIQUE:
        values: list[str] = stored
        return values[0] if len(values) == 1 else set(values)
    if kind == COUNT:
        return None
    if type(stored) is int:
        return stored
    return decimal_or_int(stored)


def minute_buckets(meter_shard: MeterShard, customer_id: str,
                   minutes: set[int]) -> list[CorrectedBucket]:
    """Every bucket of ``customer_id``'s series in ``minutes``, in (dims key, minute) order."""
    kind = meter_shard.meter.kind
    found: list[CorrectedBucket] = []
    for (customer, dims_key), series in sorted(meter_shard.series.items()):
        if customer != customer_id:
            continue
        for slot, minute in enumerate(series.minutes):
            if minute not in minutes:
                continue
            found.append(CorrectedBucket(
                dims_key, minute, series.edges[slot],
                encode_value(kind, series.values[slot]) if series.values is not None else 0,
                series.counts[slot] if series.counts is not None else 0,
                series.times[slot] if series.times is not None else 0,
                series.seqs[slot] if series.seqs is not None else 0,
            ))
    return found


def replace_minutes(meter_shard: MeterShard, change: CorrectedMinutes) -> None:
    """Replace every bucket of ``change.customer_id``'s series in ``change.minutes`` by
    ``change.buckets``; a series left without buckets is dropped."""
    kind = meter_shard.meter.kind
    minutes = set(change.minutes)
    for series in list(meter_shard.by_customer.get(change.customer_id, ())):
        for slot in range(len(series.minutes) - 1, -1, -1):
            if series.minutes[slot] in minutes:
                _delete_bucket(series, slot)
        series.distinct_cache = None
    for bucket in change.buckets:
        key = (change.customer_id, bucket.dims_key)
        found = meter_shard.series.get(key)
        if found is None:
            found = meter_shard.new_series(change.customer_id, bucket.dims_key)
        _insert(found, kind, bucket)
    for series in list(meter_shard.by_customer.get(change.customer_id, ())):
        if not series.minutes:
            _drop_series(meter_shard, series)


def _delete_bucket(series: Series, slot: int) -> None:
    for column in (series.minutes, series.edges, series.values, series.counts,
                   series.times, series.seqs):
        if column is not None:
            del column[slot]


def _insert(series: Series, kind: int, bucket: CorrectedBucket) -> None:
    slot = bisect_left(series.minutes, bucket.minute)
    series.minutes.insert(slot, bucket.minute)
    series.edges.insert(slot, bucket.edge)
    if kind in (SUM, MAX, MIN, AVG, LATEST):
        value = decode_value(kind, bucket.value)
        if type(value) is Decimal or not _fits_column(series, value):
            series.widen_values()
        series.values.insert(slot, value)
    elif kind == UNIQUE:
        series.values.insert(slot, decode_value(kind, bucket.value))
    if kind in (COUNT, AVG):
        series.counts.insert(slot, bucket.count)
    if kind == LATEST:
        series.times.insert(slot, bucket.time)
        series.seqs.insert(slot, bucket.seq)


def _fits_column(series: Series, value: Any) -> bool:
    if type(series.values) is list:
        return True
    try:
        series.values.append(value)
    except (TypeError, OverflowError):
        return False
    series.values.pop()
    return True


def _drop_series(meter_shard: MeterShard, series: Series) -> None:
    for key, candidate in list(meter_shard.series.items()):
        if candidate is series:
            del meter_shard.series[key]
    remaining = [s for s in meter_shard.by_customer[series.customer_id] if s is not series]
    if remaining:
        meter_shard.by_customer[series.customer_id] = remaining
    else:
        del meter_shard.by_customer[series.customer_id]


def split_sealed(change: CorrectedMinutes, before_minute: int,
                 ) -> tuple[CorrectedMinutes | None, dict[int, CorrectedMinutes]]:
    """``change`` divided at ``before_minute`` (a shard's ``sealed_before_minute``): the
    part at or after it (None if empty), and per UTC day before it that day's part."""
    if not change.minutes or min(change.minutes) >= before_minute:
        return change, {}
    head_minutes = [minute for minute in change.minutes if minute >= before_minute]
    head = (CorrectedMinutes(change.customer_id, head_minutes,
                             [b for b in change.buckets if b.minute >= before_minute])
            if head_minutes else None)
    days: dict[int, CorrectedMinutes] = {}
    for minute in change.minutes:
        if minute < before_minute:
            day = minute // DAY_MINUTES
            part = days.get(day)
            if part is None:
                part = days[day] = CorrectedMinutes(change.customer_id, [], [])
            part.minutes.append(minute)
    for bucket in change.buckets:
        if bucket.minute < before_minute:
            days[bucket.minute // DAY_MINUTES].buckets.append(bucket)
    return head, days


def bucket_count(changes: list[CorrectedMinutes]) -> int:
    return sum(len(change.buckets) for change in changes)
