"""engine.domain.batch: validating a batch and splitting it by shard and meter.

The fast path of ``prepare_batch`` (inlined checks, the memo of checked dimension
sets) must agree with the full checks of ``_prepare_one`` on every event; the
property test compares both with a plain model built from ``exact_value`` and
``dims_key_of``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.domain.batch import (
    ShardRouter,
    dims_key_of,
    dims_of_key,
    prepare_batch,
    shard_of,
)
from engine.domain.meters import IngestRules, MeterDef, check_meter
from engine.domain.values import exact_value
from engine.errors import BatchRejected
from engine.schema import Event, Meter

NOW = 1_750_000_000_000
DAY = 86_400_000
RULES = IngestRules()
METERS = {m.name: check_meter(m, RULES) for m in (
    Meter("calls"), Meter("peak", "max"), Meter("users", "unique_count", unique_dimension="user"),
)}


def event(**fields: Any) -> Event:
    base: dict[str, Any] = {"meter_api_name": "calls", "customer_id": "acme", "meter_value": 1,
                            "meter_time_in_millis": NOW}
    return Event(**(base | fields))


def as_rows(slices: list[Any]) -> list[tuple[Any, ...]]:
    """(shard, meter, index, customer, dims key, ts, value, unique id, counted value) per
    prepared event; the counted value (a unique_count meter's dimension) is None elsewhere."""
    return sorted(
        (shard, meter.name, index, customer, dims, ts, value, unique_id, counted)
        for shard, groups in enumerate(slices)
        for meter, c in groups
        for customer, dims, ts, value, unique_id, index, counted in zip(
            c.customers, c.dims_keys, c.times, c.values, c.unique_ids, c.indices,
            c.unique_values if meter.unique_dimension else [None] * len(c), strict=True)
    )


def test_shard_of_is_stable_across_processes() -> None:
    # crc32 of the customer id: a change here re-routes every stored customer.
    assert [shard_of(c, 8) for c in ("acme", "globex", "initech")] == [6, 2, 0]
    assert shard_of("acme", 1000) == 814
    route = ShardRouter(8)
    assert route("globex") == 2 and route.cache == {"globex": 2}


def test_dimension_keys_are_canonical_and_reversible() -> None:
    key = dims_key_of({"region": "eu", "plan": "pro"})
    assert key == "plan\x00pro\x00region\x00eu" == dims_key_of({"plan": "pro", "region": "eu"})
    assert dims_of_key(key) == (("plan", "pro"), ("region", "eu"))
    assert dims_key_of({}) == "" and dims_of_key("") == ()


def test_a_batch_splits_by_shard_then_by_meter_in_order_of_first_appearance() -> None:
    events = [
        event(customer_id="acme", meter_value=5),
        event(customer_id="globex", meter_api_name="peak", meter_value=Decimal("2.5")),
        event(customer_id="acme", meter_api_name="peak", meter_value="7"),
        event(customer_id="acme", dimensions={"region": "eu"}, unique_id="e-1"),
        event(meter_api_name="users", dimensions={"user": "u1", "region": "eu"}),
    ]
    slices = prepare_batch(events, METERS, ShardRouter(8), RULES, NOW)
    assert len(slices) == 8
    assert [(m.name, c.indices) for m, c in slices[6]] == [
        ("calls", [0, 3]), ("peak", [2]), ("users", [4])]
    assert [(m.name, c.indices) for m, c in slices[2]] == [("peak", [1])]
    calls = slices[6][0][1]
    assert calls.values == [5, 1] and calls.dims_keys == ["", "region\x00eu"]
    assert calls.unique_ids == [None, "e-1"]
    assert slices[6][1][1].values == [7]  # "7" is exactly 7
    users = slices[6][2][1]
    assert users.unique_values == ["u1"] and users.dims_keys == ["region\x00eu"]


def test_every_bad_event_is_named_and_nothing_is_returned() -> None:
    events = [
        event(),
        event(meter_api_name="nope"),
        event(meter_value=float("inf")),
        event(meter_time_in_millis=NOW - 36 * DAY),
        event(meter_time_in_millis=NOW + DAY),
        event(dimensions={"customer_id": "x"}),
        event(meter_api_name="users"),
        event(unique_id=""),
    ]
    with pytest.raises(BatchRejected) as caught:
        prepare_batch(events, METERS, ShardRouter(4), RULES, NOW)
    problems = {p.index: p.reason for p in caught.value.problems}
    assert sorted(problems) == [1, 2, 3, 4, 5, 6, 7]
    assert "unknown meter 'nope'" in problems[1]
    assert "not a finite number" in problems[2]
    assert "late-event limit" in problems[3]
    assert "future tolerance" in problems[4]
    assert "reserved" in problems[5]
    assert "no such dimension" in problems[6]
    assert "unique_id" in problems[7]


def test_the_rules_bound_a_live_batch_but_not_replay() -> None:
    strict = IngestRules(max_dimensions=1, max_batch_events=2)
    old = event(meter_time_in_millis=NOW - 300 * DAY, dimensions={"a": "1", "b": "2"})
    with pytest.raises(BatchRejected) as caught:
        prepare_batch([old, event(dimensions={"a": "1", "b": "2"})], METERS, ShardRouter(1),
                      strict, NOW)
    reasons = [p.reason for p in caught.value.problems]
    assert "late-event limit" in reasons[0] and "2 dimensions, at most 1" in reasons[1]
    with pytest.raises(BatchRejected, match="batch has 3 events, at most 2"):
        prepare_batch([event()] * 3, METERS, ShardRouter(1), strict, NOW)
    replayed = prepare_batch([old] * 3, METERS, ShardRouter(1), strict, None)
    assert replayed[0][0][1].times == [NOW - 300 * DAY] * 3


VALUES = st.one_of(
    st.integers(-(2**63) - 1, -(2**63) + 1),  # -2**63 itself takes the slow path
    st.integers(2**63 - 2, 2**63 + 1),
    st.integers(-1000, 1000),
    st.decimals(min_value=-1000, max_value=1000, places=3),
)
DIMS = st.dictionaries(st.sampled_from(["region", "plan", "user"]),
                       st.sampled_from(["eu", "us", "pro", "u1", "u2"]), max_size=3)
EVENTS = st.builds(
    event,
    meter_api_name=st.sampled_from(sorted(METERS)),
    customer_id=st.sampled_from(["acme", "globex", "initech"]),
    meter_value=VALUES,
    meter_time_in_millis=st.integers(NOW - 2 * DAY, NOW),
    dimensions=DIMS,
    unique_id=st.one_of(st.none(), st.sampled_from(["e1", "e2"])),
)


def model_rows(events: list[Event], meters: dict[str, MeterDef], shards: int) -> list[Any]:
    rows = []
    for index, e in enumerate(events):
        meter = meters[e.meter_api_name]
        dims = {k: v for k, v in e.dimensions.items() if k != meter.unique_dimension}
        rows.append((shard_of(e.customer_id, shards), meter.name, index, e.customer_id,
                     dims_key_of(dims), e.meter_time_in_millis, exact_value(e.meter_value),
                     e.unique_id, e.dimensions.get(meter.unique_dimension or "")
                     if meter.unique_dimension else None))
    return sorted(rows)


@settings(max_examples=60, deadline=None)
@given(st.lists(EVENTS, max_size=30))
def test_fast_and_full_checks_prepare_the_same_events(events: list[Event]) -> None:
    valid = [e for e in events
             if METERS[e.meter_api_name].unique_dimension is None or "user" in e.dimensions]
    route = ShardRouter(3)
    expected = model_rows(valid, METERS, 3)
    assert as_rows(prepare_batch(valid, METERS, route, RULES, NOW)) == expected
    # Again with the dimension memo warm, and as trusted replay (its own memo).
    assert as_rows(prepare_batch(valid, METERS, route, RULES, NOW)) == expected
    assert as_rows(prepare_batch(valid, METERS, route, RULES, None)) == expected


@pytest.mark.parametrize(("dimensions", "reason"), [
    ({"user": "a\x00b"}, "contains a NUL character"),
    ({"user": "u" * 300}, "value is longer than"),
    ({"user": "u1", "region": "e\x00u"}, "contains a NUL character"),
    ({"user": "u1", "a": "1", "b": "2", "c": "3"}, "4 dimensions, at most 3"),
    ({"region": "eu"}, "has no such dimension"),
])
def test_a_unique_count_event_is_checked_in_full(dimensions: dict[str, str],
                                                 reason: str) -> None:
    """The fast path takes unique_count events too; what it cannot vouch for is refused
    with the reason the full check gives."""
    rules = IngestRules(max_value_chars=256, max_dimensions=3)
    meters = {"users": check_meter(Meter("users", "unique_count", unique_dimension="user"),
                                   rules)}
    with pytest.raises(BatchRejected) as caught:
        prepare_batch([event(meter_api_name="users", dimensions=dimensions)], meters,
                      ShardRouter(1), rules, NOW)
    assert reason in caught.value.problems[0].reason
