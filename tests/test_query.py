"""engine.domain.query and aggregates: planning a query, merging shard partials, take.

Partials are built by hand here, so the merge, the finalisation and the ranking are
tested apart from the shards that produce them (tests/test_shard.py).
"""

from __future__ import annotations

import dataclasses
from array import array
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.domain.aggregates import (
    AVG,
    LATEST,
    MAX,
    SUM,
    UNIQUE,
    copy_partial,
    finalize,
    merge_partial,
    slice_partial,
)
from engine.domain.meters import IngestRules, check_meter
from engine.domain.query import finish_query, keep_top_groups, plan_query, rank_all_groups
from engine.errors import InvalidQuery
from engine.schema import Meter, Query, Row, Take

DAY = 86_400_000
T0 = 1_750_032_000_000  # 2025-06-16T00:00:00Z
SUM_METER = check_meter(Meter("calls"), IngestRules())
USERS = check_meter(Meter("users", "unique_count", unique_dimension="user"), IngestRules())


def plan(meter: Any = SUM_METER, **fields: Any) -> Any:
    return plan_query(Query(meter.name, fields.pop("start_ms", T0),
                            fields.pop("end_ms", T0 + 3 * DAY), **fields), meter)


def test_a_plan_cuts_the_range_into_calendar_windows() -> None:
    daily = plan(window="day", timezone="Europe/Berlin", filter={
        "customer_id": ["acme"], "region": ["eu", "us"]})
    assert daily.labels_ms == [T0 - 2 * 3_600_000 + k * DAY for k in range(4)]
    assert daily.cuts_ms == [T0, T0 + 22 * 3_600_000, T0 + 46 * 3_600_000,
                             T0 + 70 * 3_600_000, T0 + 3 * DAY]
    assert daily.customers == frozenset({"acme"})
    assert daily.dim_filters == (("region", frozenset({"eu", "us"})),)
    total = plan()
    assert (total.labels_ms, total.cuts_ms) == ([T0], [T0, T0 + 3 * DAY])


@pytest.mark.parametrize(("meter", "fields", "reason"), [
    (SUM_METER, {"start_ms": T0 + 1, "end_ms": T0}, "is after end_ms"),
    (SUM_METER, {"window": "fortnight"}, "window"),
    (SUM_METER, {"group_by": ["region", "region"]}, "names a key twice"),
    (SUM_METER, {"group_by": [f"k{i}" for i in range(9)]}, "at most 8"),
    (SUM_METER, {"take": Take(0)}, "take.limit must be a positive integer"),
    (USERS, {"group_by": ["user"]}, "cannot be grouped by it"),
    (USERS, {"filter": {"user": ["u1"]}}, "cannot be filtered by it"),
])
def test_a_bad_query_is_refused_with_a_reason(meter: Any, fields: dict[str, Any],
                                              reason: str) -> None:
    with pytest.raises(InvalidQuery, match=reason):
        plan(meter, **fields)


def test_partials_from_shards_merge_into_ordered_rows() -> None:
    by_region = plan(group_by=["region"], window="day")
    shard_a = {(0, ("eu",)): 2, (1, ("eu",)): 3, (0, (None,)): 1}
    shard_b = {(0, ("eu",)): 5, (0, ("us",)): 4}
    result = finish_query(by_region, [shard_a, shard_b])
    assert result.rows == [
        Row(T0, {"region": None}, 1), Row(T0, {"region": "eu"}, 7),
        Row(T0, {"region": "us"}, 4), Row(T0 + DAY, {"region": "eu"}, 3),
    ]
    assert (result.meter_api_name, result.aggregation, result.window) == ("calls", "sum", "day")


def test_take_ranks_groups_by_their_total_over_all_windows() -> None:
    top = plan(group_by=["customer_id"], window="day", take=Take(2))
    partials = {(0, ("a",)): 5, (1, ("a",)): 1, (0, ("b",)): 4, (1, ("b",)): 4,
                (0, ("c",)): 6, (1, ("d",)): 6}
    rows = finish_query(top, [partials]).rows
    assert [(r.window_start_ms, r.group["customer_id"], r.value) for r in rows] == [
        (T0, "b", 4), (T0, "a", 5), (T0 + DAY, "b", 4), (T0 + DAY, "a", 1)]
    bottom = plan(group_by=["customer_id"], take=Take(1, ascending=True))
    assert finish_query(bottom, [{(0, ("a",)): 5}, {(0, ("b",)): 4}]).rows == [
        Row(T0, {"customer_id": "b"}, 4)]


def test_unique_count_partials_are_sets_merged_without_touching_a_shards_copy() -> None:
    users = plan(USERS, window="day", take=Take(5))
    day0, day1 = {"u1", "u2"}, {"u2", "u3"}
    rows = finish_query(users, [{(0, ()): day0, (1, ()): day1}]).rows
    assert [r.value for r in rows] == [2, 2]
    assert day0 == {"u1", "u2"}  # the ranking merged a copy
    assert copy_partial(UNIQUE, day0) == day0 and copy_partial(UNIQUE, day0) is not day0
    assert copy_partial(SUM, 5) == 5


AVG_METER = check_meter(Meter("latency", "avg"), IngestRules())


@given(st.sampled_from([SUM_METER, AVG_METER]), st.sampled_from([None, "day"]),
       st.integers(1, 5), st.booleans(),
       st.lists(st.dictionaries(st.tuples(st.integers(0, 2), st.integers(0, 7)),
                                st.integers(-3, 3), max_size=20), min_size=1, max_size=4))
def test_each_shard_keeping_its_own_best_groups_answers_as_all_of_them(
    meter: Any, window: str | None, limit: int, ascending: bool,
    shards: list[dict[tuple[int, int], int]],
) -> None:
    """A take over customer groups: each shard cuts its partials to its own best
    groups (``keep_top_groups``) and the answer is the same, ties included (values
    from a narrow range tie often). Each shard has its own customers."""
    query = plan(meter, group_by=["customer_id"], window=window,
                 take=Take(limit, ascending=ascending))
    spans = len(query.labels_ms)
    partials = []
    for index, shard in enumerate(shards):
        partial: dict[tuple[int, tuple[Any, ...]], Any] = {}
        for (span, customer), value in shard.items():
            if span < spans:
                partial[(span, (f"s{index}c{customer}",))] = (
                    value if meter is SUM_METER else [Decimal(value), abs(value) + 1])
        partials.append(partial)
    pushed = dataclasses.replace(query, shard_take=True)
    cut = [keep_top_groups(pushed, partial) for partial in partials]
    assert all(set(c) <= set(p) for c, p in zip(cut, partials, strict=True))
    assert finish_query(pushed, cut).rows == finish_query(query, partials).rows
    for kept in cut:  # at most ``limit`` groups a shard, beyond it only ties
        if len({key[1] for key in kept}) > limit:
            assert spans == 1 and meter is SUM_METER
            values = sorted(kept.values(), reverse=not ascending)
            assert set(values[limit - 1:]) == {values[limit - 1]}


class Columns:
    def __init__(self, values: list[Any], counts: list[int], times: list[int],
                 seqs: list[int]) -> None:
        self.values, self.counts = values, counts
        self.times, self.seqs = array("q", times), array("q", seqs)


BUCKETS = st.lists(st.tuples(st.integers(-100, 100), st.integers(1, 5), st.integers(0, 9)),
                   min_size=2, max_size=12)


@given(BUCKETS, st.data())
def test_merging_the_partials_of_a_split_equals_the_partial_of_the_whole(
    buckets: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    values = [v for v, _, _ in buckets]
    series = Columns(values, [c for _, c, _ in buckets], [t for _, _, t in buckets],
                     list(range(len(buckets))))
    cut = data.draw(st.integers(1, len(buckets) - 1))
    for kind in (SUM, MAX, AVG, LATEST):
        whole = slice_partial(kind, series, 0, len(buckets))
        merged = merge_partial(kind, slice_partial(kind, series, 0, cut),
                               slice_partial(kind, series, cut, len(buckets)))
        assert merged == whole, kind
    latest = max(range(len(buckets)), key=lambda i: (buckets[i][2], i))
    assert finalize(LATEST, slice_partial(LATEST, series, 0, len(buckets))) == values[latest]
    assert finalize(MAX, slice_partial(MAX, series, 0, len(buckets))) == max(values)


def test_finalize_divides_avg_and_counts_unique_values() -> None:
    assert finalize(AVG, [7, 2]) == Decimal("3.5")
    assert finalize(UNIQUE, {"u1", "u2", "u3"}) == 3
    assert finalize(LATEST, (10, 3, "value")) == "value"


@given(totals=st.dictionaries(st.sampled_from([f"c{k}" for k in range(12)]),
                              st.integers(0, 4), max_size=12),
       spans=st.integers(1, 2), limit=st.integers(1, 14), ascending=st.booleans())
def test_the_first_groups_ranked_alone_are_the_first_of_all(totals: dict[str, int], spans: int,
                                                            limit: int, ascending: bool) -> None:
    """A page or a dimension's top orders only the groups that can make it (ties by group
    order): the same groups, in the same order, as ranking every group."""
    merged = {(span, (customer,)): value for customer, value in totals.items()
              for span in range(spans)}
    assert rank_all_groups(SUM, merged, ascending, limit=limit) == rank_all_groups(
        SUM, merged, ascending)[:limit]
