"""engine.domain.shard and series: applying prepared batches, the shard's query pass,
snapshot export and restore.

Pure and fast: shard states are driven directly (prepare_batch, ShardState.apply,
plan_query / finish_query), no engine, no store. Dedup is the WAL writer's, against
the store's index: here a dict stands in for the index, with the same decision
functions (engine.runtime.dedup). The property test compares every aggregation with a
naive model over the same events.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal, localcontext
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.domain import records
from engine.domain.batch import ShardRouter, prepare_batch
from engine.domain.meters import IngestRules, MeterDef, check_meter
from engine.domain.query import finish_query, plan_query
from engine.domain.shard import ShardState, restore_shards, state_statistics
from engine.domain.values import EXACT, average
from engine.errors import InvalidQuery
from engine.runtime.dedup import batch_keys, drop_duplicates
from engine.schema import AGGREGATIONS, Event, Meter, Query

HOUR = 3_600_000
T0 = 1_750_000_000_000 - 1_750_000_000_000 % HOUR  # on an hour
METERS: dict[str, MeterDef] = {
    aggregation: check_meter(
        Meter(aggregation, aggregation,  # type: ignore[arg-type]
              unique_dimension="user" if aggregation == "unique_count" else None),
        IngestRules())
    for aggregation in AGGREGATIONS
}


def event(meter: str = "sum", customer: str = "acme", value: Any = 1, ts: int = T0,
          unique_id: str | None = None, **dims: str) -> Event:
    return Event(meter, customer, value, ts, dims, unique_id)


class Router(ShardRouter):
    """A router that also carries the test's dedup index (key -> lsn), a dict standing in
    for the store's."""

    def __init__(self, shard_count: int) -> None:
        super().__init__(shard_count)
        self.index: dict[bytes, int] = {}


def build(events: list[Event], shards: int = 3, lsn: int = 1) -> tuple[list[ShardState], Any]:
    route = Router(shards)
    states = [ShardState() for _ in range(shards)]
    apply(states, route, events, lsn)
    return states, route


def apply(states: list[ShardState], route: Router, events: list[Event],
          lsn: int) -> tuple[int, int]:
    accepted = duplicates = 0
    slices = prepare_batch(events, METERS, route, IngestRules(), None)
    flags = []
    for key in batch_keys(slices):  # as the WAL writer decides, against a dict
        flags.append(key in route.index)
        route.index.setdefault(key, lsn)
    duplicates = drop_duplicates(slices, flags)
    with localcontext(EXACT):
        for state, groups in zip(states, slices, strict=True):
            a, d, crossings = state.apply(lsn, groups)
            assert crossings == []
            accepted, duplicates = accepted + a, duplicates + d
    return accepted, duplicates


def query(states: list[ShardState], meter: str, **fields: Any) -> dict[tuple[Any, ...], Any]:
    q = Query(meter, fields.pop("start_ms", T0), fields.pop("end_ms", T0 + 4 * HOUR), **fields)
    plan = plan_query(q, METERS[meter])
    with localcontext(EXACT):
        result = finish_query(plan, [state.query(plan) for state in states])
    return {(row.window_start_ms, *row.group.values()): row.value for row in result.rows}


def test_duplicates_are_dropped_per_meter_and_customer() -> None:
    states, route = build([
        event(value=5, unique_id="a"), event(value=7, unique_id="a"),
        event(value=1, unique_id="a", customer="globex"), event(value=2),
    ])
    assert query(states, "sum", group_by=["customer_id"]) == {
        (T0, "acme"): 7, (T0, "globex"): 1}
    assert apply(states, route, [event(value=9, unique_id="a"), event("max", unique_id="a")],
                 2) == (1, 1)


def test_late_events_land_in_their_own_minute_and_buckets_stay_sorted() -> None:
    states, _ = build([event(ts=T0 + 3 * 60_000), event(ts=T0 + 60_000, value=2),
                       event(ts=T0 + 3 * 60_000 + 59_999, value=4), event(ts=T0, value=8)],
                      shards=1)
    series = next(iter(states[0].meters["sum"].series.values()))
    assert list(series.minutes) == [m + T0 // 60_000 for m in (0, 1, 3)]
    assert list(series.values) == [8, 2, 5]
    assert [(e >> 16, e & 0xFFFF) for e in series.edges] == [(0, 0), (0, 0), (0, 59_999)]
    assert state_statistics(states[0]) == (1, 3)


def test_a_sum_beyond_int64_widens_its_column_and_stays_exact() -> None:
    big = 2**63 - 1
    states, _ = build([event(value=big), event(value=big), event(value=Decimal("0.5"))],
                      shards=1)
    assert query(states, "sum") == {(T0,): 2 * big + Decimal("0.5")}
    series = next(iter(states[0].meters["sum"].series.values()))
    assert type(series.values) is list


def test_a_cut_inside_a_minute_is_exact_or_refused() -> None:
    states, _ = build([event(ts=T0 + 10_000), event(ts=T0 + 50_000, value=2)])
    assert query(states, "sum", start_ms=T0 + 5_000) == {(T0 + 5_000,): 3}
    assert query(states, "sum", end_ms=T0 + 55_000) == {(T0,): 3}
    with pytest.raises(InvalidQuery, match="inside a one-minute bucket"):
        query(states, "sum", start_ms=T0 + 30_000)


def test_a_snapshot_restores_to_any_shard_count() -> None:
    events = [event(m, customer=c, value=v, ts=T0 + v * 60_000, unique_id=f"{c}{v}", user=f"u{v}")
              for m in ("sum", "latest", "unique_count", "avg")
              for c in ("acme", "globex", "initech", "umbrella") for v in range(1, 4)]
    states, _ = build(events, shards=3)
    parts = [state.export() for state in states]
    encoded = [records.encode(records.ShardPart(p)) for p in parts]
    decoded = [records.decode_part(raw) for raw in encoded]
    one = restore_shards(decoded, METERS, ShardRouter(1))
    again = restore_shards([records.ShardPart(one[0].export())], METERS, ShardRouter(3))
    assert [records.encode(records.ShardPart(s.export())) for s in again] == encoded
    for meter in ("sum", "latest", "unique_count", "avg"):
        assert query(one, meter, group_by=["customer_id"]) == query(
            states, meter, group_by=["customer_id"])
    # Unique ids are the store's (its dedup index), no longer in a shard's snapshot.
    assert all(part.seen == [] for shard_part in decoded for part in shard_part.meters)


def model(events: list[Event], aggregation: str, window_ms: int | None,
          by_customer: bool) -> dict[Any, Any]:
    seen: set[tuple[str, str]] = set()
    groups: dict[tuple[Any, ...], list[tuple[int, int, Event]]] = defaultdict(list)
    for index, e in enumerate(events):
        if e.meter_api_name != aggregation:
            continue
        if e.unique_id is not None:
            if (e.customer_id, e.unique_id) in seen:
                continue
            seen.add((e.customer_id, e.unique_id))
        start = T0 if window_ms is None else e.meter_time_in_millis // window_ms * window_ms
        key = (start, e.customer_id) if by_customer else (start,)
        groups[key].append((e.meter_time_in_millis, index, e))
    return {key: naive(aggregation, items) for key, items in groups.items()}


def naive(aggregation: str, items: list[tuple[int, int, Event]]) -> Any:
    values = [e.meter_value for _, _, e in items]
    if aggregation == "sum":
        return sum(values)
    if aggregation == "count":
        return len(values)
    if aggregation in ("max", "min"):
        return max(values) if aggregation == "max" else min(values)
    if aggregation == "avg":
        return average(sum(values), len(values))
    if aggregation == "latest":
        return max(items, key=lambda item: item[:2])[2].meter_value
    return len({e.dimensions["user"] for _, _, e in items})


EVENTS = st.lists(st.builds(
    event,
    meter=st.sampled_from(AGGREGATIONS),
    customer=st.sampled_from(["acme", "globex", "initech"]),
    value=st.one_of(st.integers(-50, 50), st.integers(2**62, 2**63 + 5),
                    st.decimals(min_value=-5, max_value=5, places=2)),
    ts=st.integers(T0, T0 + 4 * HOUR - 1),
    unique_id=st.one_of(st.none(), st.sampled_from(["e1", "e2", "e3"])),
    user=st.sampled_from(["u1", "u2", "u3"]),
), max_size=40)


@settings(max_examples=40, deadline=None)
@given(EVENTS, st.sampled_from([None, HOUR]), st.integers(1, 4), st.booleans())
def test_every_aggregation_matches_a_naive_model(
    events: list[Event], window_ms: int | None, shards: int, by_customer: bool
) -> None:
    """Grouped by customer, a group's partials come from one shard; otherwise they
    are merged across shards."""
    states, _ = build(events, shards=shards)
    group_by = ["customer_id"] if by_customer else []
    window = None if window_ms is None else "hour"
    for aggregation in AGGREGATIONS:
        assert query(states, aggregation, group_by=group_by, window=window) == model(
            events, aggregation, window_ms, by_customer), aggregation
