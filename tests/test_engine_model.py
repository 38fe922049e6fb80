"""Property tests: the engine agrees with the naive model on random workloads.

Every aggregation, window, time zone (including DST changes and +05:45/+05:30
zones), group_by, filter and take is compared value by value, with exact
decimals, duplicates, out-of-order and late events, random batch splits and
random shard counts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Event, InvalidQuery, Meter, Query, Take, open_engine
from engine.domain import shard as shard_module
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR, MINUTE
from tests.helpers.strategies import ANCHORS_MS, CUSTOMERS, METERS, ZONES, events
from tests.model import Model


@st.composite
def workloads(draw: Any) -> tuple[int, list[list[Event]]]:
    anchor = draw(st.sampled_from(ANCHORS_MS))
    batches = draw(st.lists(st.lists(events(anchor), min_size=1, max_size=25), min_size=1,
                            max_size=6))
    return anchor, batches


@st.composite
def queries(draw: Any, anchor_ms: int) -> Query:
    meter = draw(st.sampled_from(METERS))
    window = draw(st.sampled_from([None, "minute", "hour", "day", "week", "month"]))
    span = {None: 6 * DAY, "minute": 6 * HOUR, "hour": 3 * DAY}.get(window, 40 * DAY)
    aligned = draw(st.booleans())
    unit = MINUTE if aligned else 1
    start = anchor_ms + draw(st.integers(-span // unit, span // unit)) * unit
    if draw(st.booleans()):
        start = anchor_ms - 3 * DAY
    end = start + draw(st.integers(0, 2 * span // unit)) * unit
    keys = ["customer_id", "region", "plan"]
    group_by = draw(st.lists(st.sampled_from(keys), unique=True, max_size=2))
    filters = draw(st.dictionaries(
        st.sampled_from(keys),
        st.lists(st.sampled_from(["eu", "us", "x", *CUSTOMERS[:3]]), min_size=1, max_size=3,
                 unique=True),
        max_size=1,
    ))
    take = draw(st.one_of(st.none(), st.builds(Take, limit=st.integers(1, 4),
                                                 ascending=st.booleans())))
    return Query(meter_api_name=meter.name, start_ms=start, end_ms=end, window=window,
                 timezone=draw(st.sampled_from(ZONES)), group_by=group_by, filter=filters,
                 take=take)


def all_inputs_integral(model: Model, query: Query) -> bool:
    return all(
        isinstance(e.event.meter_value, int)
        for e in model.events
        if e.event.meter_api_name == query.meter_api_name
    )


def cut_splits_a_minute(model: Model, query: Query) -> bool:
    """True if some unaligned cut has events of the meter on both sides within its minute."""
    from engine.domain.windows import resolve_timezone, window_spans

    spans = window_spans(query.start_ms, query.end_ms, query.window,
                         resolve_timezone(query.timezone))
    cuts = [lo for _, lo, _ in spans] + ([spans[-1][2]] if spans else [])
    for cut in cuts:
        if cut % MINUTE == 0:
            continue
        times = [e.event.meter_time_in_millis for e in model.events
                 if e.event.meter_api_name == query.meter_api_name
                 and e.event.meter_time_in_millis // MINUTE == cut // MINUTE]
        if times and min(times) < cut <= max(times):
            return True
    return False


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(workload=workloads(), shards=st.integers(1, 5), data=st.data())
async def test_engine_matches_model(workload: Any, shards: int, data: Any) -> None:
    anchor, batches = workload
    model = Model(meters={m.name: m for m in METERS})
    # Windowed sums and counts take one of two loops by series length: try both.
    saved = shard_module.BUCKET_LOOP_MAX_PER_SPAN
    shard_module.BUCKET_LOOP_MAX_PER_SPAN = data.draw(st.sampled_from([0, 8, 10**9]))
    try:
        await check_engine_against_model(anchor, batches, shards, data, model)
    finally:
        shard_module.BUCKET_LOOP_MAX_PER_SPAN = saved


async def check_engine_against_model(
    anchor: int, batches: Any, shards: int, data: Any, model: Model
) -> None:
    async with open_engine(store=MemoryStore(), shards=shards,
                           clock_ms=lambda: anchor + 3 * DAY) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        for batch in batches:
            ack = await eng.ingest(batch)
            assert (ack.accepted, ack.duplicates) == model.ingest(batch)
        for _ in range(8):
            query = data.draw(queries(anchor))
            expected = model.query(query)
            try:
                result = await eng.query(query)
            except InvalidQuery as exc:
                assert "one-minute bucket" in str(exc)
                assert cut_splits_a_minute(model, query), exc
                continue
            got = [(r.window_start_ms, r.group, r.value) for r in result.rows]
            assert got == expected, query
            if all_inputs_integral(model, query) and query.meter_api_name != "m_avg":
                assert all(type(r.value) is int for r in result.rows)
            assert all(type(r.value) in (int, Decimal) for r in result.rows)


@pytest.mark.parametrize("zone", ["Europe/Berlin", "Asia/Kathmandu"])
async def test_hour_windows_are_real_hours_across_dst(zone: str) -> None:
    start = int(datetime(2026, 10, 24, 22, 0, tzinfo=UTC).timestamp()) * 1000
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: start + DAY) as eng:
        await eng.define_meter(Meter(name="calls", aggregation="count"))
        batch = [Event(meter_api_name="calls", customer_id="acme", meter_value=1,
                       meter_time_in_millis=start + i * 10 * MINUTE) for i in range(6 * 6)]
        await eng.ingest(batch)
        result = await eng.query(Query(meter_api_name="calls", start_ms=start,
                                       end_ms=start + 6 * HOUR, window="hour", timezone=zone))
    starts = [r.window_start_ms for r in result.rows]
    assert all(b - a == HOUR for a, b in pairwise(starts))
    assert sum(r.value for r in result.rows) == 36
    if zone == "Asia/Kathmandu":
        assert all(s % HOUR == 15 * MINUTE for s in starts)
    else:
        assert len(result.rows) == 6 and all(s % HOUR == 0 for s in starts)


LONG_METERS = [Meter(name="m_sum", aggregation="sum"), Meter(name="m_count", aggregation="count"),
               Meter(name="m_max", aggregation="max")]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), shards=st.integers(1, 3),
       bucket_loop=st.sampled_from([0, 8, 10**9]))
async def test_long_series_match_model(data: Any, shards: int, bucket_loop: int) -> None:
    """Few series with many buckets each, so queries cross many windows per series
    (the random workloads above mostly make one-event series)."""
    anchor = data.draw(st.sampled_from(ANCHORS_MS))
    offsets = st.one_of(st.integers(-3 * DAY, 3 * DAY),
                        st.integers(-72 * 60, 72 * 60).map(lambda m: m * MINUTE))
    batch = [
        Event(meter_api_name=data.draw(st.sampled_from(LONG_METERS)).name,
              customer_id=data.draw(st.sampled_from(CUSTOMERS[:2])),
              meter_value=data.draw(st.integers(-1000, 1000)),
              meter_time_in_millis=anchor + data.draw(offsets),
              dimensions=data.draw(st.sampled_from([{}, {"region": "eu"}])))
        for _ in range(data.draw(st.integers(1, 300)))
    ]
    model = Model(meters={m.name: m for m in LONG_METERS})
    saved = shard_module.BUCKET_LOOP_MAX_PER_SPAN
    shard_module.BUCKET_LOOP_MAX_PER_SPAN = bucket_loop
    try:
        async with open_engine(store=MemoryStore(), shards=shards,
                               clock_ms=lambda: anchor + 4 * DAY) as eng:
            for meter in LONG_METERS:
                await eng.define_meter(meter)
            assert (await eng.ingest(batch)).accepted == model.ingest(batch)[0]
            for _ in range(6):
                window = data.draw(st.sampled_from(["minute", "hour", "day", None]))
                span = {"minute": 12 * HOUR, "hour": 4 * DAY}.get(window, 8 * DAY)
                start = anchor + data.draw(st.integers(-span // MINUTE, 0)) * MINUTE
                end = start + data.draw(st.integers(0, span // MINUTE)) * MINUTE
                query = Query(
                    meter_api_name=data.draw(st.sampled_from(LONG_METERS)).name,
                    start_ms=start, end_ms=end,
                    window=window, timezone=data.draw(st.sampled_from(ZONES)),
                    group_by=data.draw(st.sampled_from([[], ["customer_id"], ["region"]])))
                result = await eng.query(query)
                got = [(r.window_start_ms, r.group, r.value) for r in result.rows]
                assert got == model.query(query), query
    finally:
        shard_module.BUCKET_LOOP_MAX_PER_SPAN = saved
