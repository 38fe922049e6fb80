"""Ingest behaviour: validation errors, dedup, durability, concurrency, read-your-writes."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from engine import (
    BatchRejected,
    Event,
    IngestLimits,
    InvalidQuery,
    InvalidRequest,
    Meter,
    MeterConflict,
    Query,
    UnknownMeter,
    open_engine,
)
from engine.storage import MemoryStore
from tests.helpers.events import DAY, NOW, event
from tests.helpers.internals import dimension_sets_of


async def total(eng: object, meter: str = "calls", **query: object) -> object:
    """The value of the first row of a query over the last 40 days (``None`` if none)."""
    result = await eng.query(  # type: ignore[attr-defined]
        Query(meter_api_name=meter, start_ms=NOW - 40 * DAY, end_ms=NOW + DAY, **query)
    )
    return result.rows[0].value if result.rows else None


@pytest.fixture
async def eng():  # type: ignore[no-untyped-def]
    async with open_engine(store=MemoryStore(), shards=4, clock_ms=lambda: NOW) as engine:
        await engine.define_meter(Meter(name="calls", aggregation="sum"))
        await engine.define_meter(
            Meter(name="users", aggregation="unique_count", unique_dimension="user")
        )
        yield engine


BAD_EVENTS = [
    (event(meter_api_name="nope"), "unknown meter 'nope'"),
    (event(customer_id=""), "customer_id must be a non-empty string"),
    (event(meter_value=float("nan")), "not a finite number"),
    (event(meter_value=float("inf")), "not a finite number"),
    (event(meter_value=Decimal("NaN")), "not a finite number"),
    (event(meter_value="ten"), "not a decimal number"),
    (event(meter_value=True), "not a boolean"),
    (event(meter_value=[1]), "must be a number"),
    (event(meter_value=10**31), "out of range"),
    (event(meter_value=Decimal("0.1234567890123456789")), "digits after the point"),
    (event(meter_time_in_millis=NOW - 36 * DAY), "older than the oldest accepted"),
    (event(meter_time_in_millis=NOW + DAY), "later than the newest accepted"),
    (event(meter_time_in_millis=float(NOW)), "must be integer milliseconds"),
    (event(dimensions={f"k{i}": "v" for i in range(17)}), "17 dimensions, at most 16"),
    (event(dimensions={"k": "v" * 300}), "longer than 256"),
    (event(dimensions={"k": 5}), "must have a string value"),
    (event(dimensions={"customer_id": "x"}), "reserved"),
    (event(unique_id=""), "unique_id must be null or a non-empty string"),
    (event(meter_api_name="users", dimensions={"plan": "pro"}), "has no such dimension"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_EVENTS)
async def test_bad_event_rejects_whole_batch_with_index_and_reason(
    eng: object, bad: Event, reason: str
) -> None:
    good = event(unique_id="good-1")
    with pytest.raises(BatchRejected) as caught:
        await eng.ingest([good, good, bad])  # type: ignore[attr-defined]
    assert [p.index for p in caught.value.problems] == [2]
    assert reason in caught.value.problems[0].reason
    assert "event 2:" in str(caught.value)
    # Nothing was applied: not even the good events, and the unique id is still free.
    assert await total(eng) is None
    ack = await eng.ingest([good])  # type: ignore[attr-defined]
    assert (ack.accepted, ack.duplicates) == (1, 0)


async def test_every_bad_event_is_listed(eng: object) -> None:
    batch = [event(), event(customer_id=""), event(), event(meter_value=float("nan"))]
    with pytest.raises(BatchRejected) as caught:
        await eng.ingest(batch)  # type: ignore[attr-defined]
    assert [p.index for p in caught.value.problems] == [1, 3]


async def test_dedup_counts_once_whatever_other_fields(eng: object) -> None:
    first = await eng.ingest([event(unique_id="u-1", meter_value=5)])  # type: ignore[attr-defined]
    again = await eng.ingest([  # type: ignore[attr-defined]
        event(unique_id="u-1", meter_value=7, meter_time_in_millis=NOW - DAY,
              dimensions={"region": "eu"}),
        event(unique_id="u-1", customer_id="globex", meter_value=11),  # other customer: new
        event(meter_value=2),  # no unique id: never deduplicated
        event(meter_value=2),
    ])
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (again.accepted, again.duplicates) == (3, 1)
    assert await total(eng) == 5 + 11 + 2 + 2


async def test_within_batch_duplicates(eng: object) -> None:
    ack = await eng.ingest([event(unique_id="x"), event(unique_id="x"),  # type: ignore[attr-defined]
                            event(unique_id="x", meter_value=9)])
    assert (ack.accepted, ack.duplicates) == (1, 2)
    assert await total(eng) == 1


async def test_amberflo_shaped_values_are_exact(eng: object) -> None:
    await eng.ingest([event(meter_value=0.1), event(meter_value=0.2),  # type: ignore[attr-defined]
                      event(meter_value="0.3"), event(meter_value=Decimal("0.4"))])
    value = await total(eng)
    assert value == Decimal("1.0") and type(value) is Decimal


async def test_integral_values_stay_int_and_sum_beyond_64_bits(eng: object) -> None:
    big = 9 * 10**18
    await eng.ingest([event(meter_value=big), event(meter_value=big),  # type: ignore[attr-defined]
                      event(meter_value=2.0)])
    value = await total(eng)
    assert value == 2 * big + 2 and type(value) is int


async def test_meter_definitions(eng: object) -> None:
    assert await eng.define_meter(Meter(name="calls", aggregation="sum"))  # type: ignore[attr-defined]
    with pytest.raises(MeterConflict, match="already defined with aggregation 'sum'"):
        await eng.define_meter(Meter(name="calls", aggregation="max"))  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest, match="needs unique_dimension"):
        await eng.define_meter(Meter(name="u2", aggregation="unique_count"))  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest, match="unknown aggregation"):
        await eng.define_meter(Meter(name="u3", aggregation="median"))  # type: ignore[attr-defined, arg-type]


async def test_query_errors(eng: object) -> None:
    with pytest.raises(UnknownMeter):
        await eng.query(Query(meter_api_name="nope", start_ms=0, end_ms=1))  # type: ignore[attr-defined]
    bad_queries = [
        (Query(meter_api_name="calls", start_ms=5, end_ms=1), "after end_ms"),
        (Query(meter_api_name="calls", start_ms=0, end_ms=1, timezone="Mars/Base"), "time zone"),
        (Query(meter_api_name="calls", start_ms=0, end_ms=1, window="fortnight"), "window"),  # type: ignore[arg-type]
        (Query(meter_api_name="calls", start_ms=0, end_ms=10**12, window="minute"), "windows"),
        (Query(meter_api_name="users", start_ms=0, end_ms=1, group_by=["user"]), "cannot be"),
    ]
    for query, message in bad_queries:
        with pytest.raises(InvalidQuery, match=message):
            await eng.query(query)  # type: ignore[attr-defined]


async def test_unaligned_cut_inside_a_busy_minute_is_refused_not_guessed(eng: object) -> None:
    minute_start = (NOW // 60_000) * 60_000
    await eng.ingest([event(meter_time_in_millis=minute_start + 1_000),  # type: ignore[attr-defined]
                      event(meter_time_in_millis=minute_start + 50_000)])
    exact = await eng.query(Query(meter_api_name="calls", start_ms=minute_start + 1_000,  # type: ignore[attr-defined]
                                  end_ms=minute_start + 50_001))
    assert exact.rows[0].value == 2
    with pytest.raises(InvalidQuery, match="one-minute bucket"):
        await eng.query(Query(meter_api_name="calls", start_ms=minute_start + 2_000,  # type: ignore[attr-defined]
                              end_ms=minute_start + 60_000))


async def test_late_and_future_limits_are_configurable() -> None:
    limits = IngestLimits(late_ms=2 * DAY, future_ms=0)
    async with open_engine(store=MemoryStore(), shards=1, limits=limits,
                           clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls"))
        await eng.ingest([event(meter_time_in_millis=NOW - 2 * DAY), event()])
        with pytest.raises(BatchRejected, match="older"):
            await eng.ingest([event(meter_time_in_millis=NOW - 2 * DAY - 1)])
        with pytest.raises(BatchRejected, match="later"):
            await eng.ingest([event(meter_time_in_millis=NOW + 1)])


async def test_concurrent_ingests_share_group_commits_and_are_all_visible(tmp_path: Path) -> None:
    async with open_engine(tmp_path, shards=4, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls"))
        acks = []

        async def send(worker: int) -> None:
            for batch in range(10):
                ack = await eng.ingest([
                    event(customer_id=f"c{i % 7}", unique_id=f"{worker}-{batch}-{i}")
                    for i in range(50)
                ])
                acks.append(ack)
                # Read-your-writes: the acknowledged batch is visible to the next query.
                assert await total(eng, group_by=[]) >= 50

        async with trio.open_nursery() as nursery:
            for worker in range(16):
                nursery.start_soon(send, worker)
        stats = eng.statistics()
        assert sum(a.accepted for a in acks) == 16 * 10 * 50
        assert sorted(a.lsn for a in acks) == list(range(1, 161))
        assert stats.group_commits < stats.batches, "concurrent batches should share commits"
        assert await total(eng) == 8000


async def test_result_does_not_depend_on_shard_count() -> None:
    results = []
    for shards in (1, 3, 16):
        async with open_engine(store=MemoryStore(), shards=shards, clock_ms=lambda: NOW) as eng:
            await eng.define_meter(Meter(name="calls", aggregation="max"))
            await eng.ingest([event(meter_api_name="calls", customer_id=f"c{i}", meter_value=i % 13,
                                    dimensions={"r": str(i % 3)}) for i in range(300)])
            result = await eng.query(Query(meter_api_name="calls", start_ms=NOW - DAY,
                                           end_ms=NOW + DAY, group_by=["r", "customer_id"]))
            results.append(result.rows)
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == 300


async def test_concurrent_conflicting_meter_definitions_one_wins(tmp_path: Path) -> None:
    """Definitions are decided by the WAL writer in commit order, not by the callers:
    of two conflicting definitions racing each other exactly one is stored."""
    for attempt in range(5):
        outcomes: list[object] = []
        async with open_engine(tmp_path / f"d{attempt}", clock_ms=lambda: NOW) as eng:

            async def define(meter: Meter, outcomes: list[object] = outcomes) -> None:
                try:
                    outcomes.append(await eng.define_meter(meter))
                except MeterConflict as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as nursery:
                for _attempt in range(3):
                    nursery.start_soon(define, Meter(name="m", aggregation="sum"))
                    nursery.start_soon(define, Meter(name="m", aggregation="unique_count",
                                                     unique_dimension="user"))
            winners = {o.aggregation for o in outcomes if isinstance(o, Meter)}
            assert len(winners) == 1
            assert sum(isinstance(o, MeterConflict) for o in outcomes) == 3
            assert [m.aggregation for m in eng.meters()] == list(winners)


async def test_events_whose_dimensions_are_not_a_mapping_are_rejected(eng: object) -> None:
    for dims in (None, [], [("a", "b")], "", 0):
        with pytest.raises(BatchRejected, match="dimensions must be a mapping"):
            await eng.ingest([event(dimensions=dims)])  # type: ignore[attr-defined]


async def test_replay_does_not_apply_todays_stricter_limits(tmp_path: Path) -> None:
    async with open_engine(tmp_path, clock_ms=lambda: NOW, snapshot_on_close=False) as eng:
        await eng.define_meter(Meter(name="calls"))
        await eng.ingest([event(dimensions={f"k{i}": "v" for i in range(10)})])
    strict = IngestLimits(max_dimensions=2)
    async with open_engine(tmp_path, clock_ms=lambda: NOW, limits=strict) as eng:
        assert await total(eng) == 1


async def test_a_failed_shard_stops_the_engine_without_leaving_anyone_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fail-stop: a bug while applying stops the engine; the caller gets EngineClosed, a
    snapshot that was pending does not wait forever, and ``open_engine`` exits."""
    from engine import EngineClosed
    from engine.domain.shard import ShardState

    real_apply = ShardState.apply

    def apply(self: ShardState, lsn: int, groups: Any, received_ms: int = 0) -> Any:
        if any("poison" in columns.customers for _, columns in groups):
            raise RuntimeError("a bug while applying")
        return real_apply(self, lsn, groups, received_ms)

    monkeypatch.setattr(ShardState, "apply", apply)
    caught: list[BaseException] = []
    with trio.fail_after(10):
        try:
            async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: NOW,
                                   snapshot_every_bytes=1) as eng:
                await eng.define_meter(Meter(name="calls"))
                await eng.ingest([event(customer_id="fine")])

                async def ingest_poison() -> None:
                    try:
                        await eng.ingest([event(customer_id="poison")])
                    except EngineClosed as exc:
                        caught.append(exc)

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(ingest_poison)
                with pytest.raises(EngineClosed):
                    await eng.ingest([event(customer_id="fine")])
        except BaseException as exc:  # the engine's own failure surfaces at exit
            caught.append(exc)
    assert len(caught) >= 3
    assert any(isinstance(e, EngineClosed) for e in caught)


async def test_a_dimension_set_accepted_by_replay_is_still_checked_live(tmp_path: Path) -> None:
    """Checked dimension sets are remembered per set of limits: one that replay accepted
    (logged under looser limits) is still refused by today's stricter ones, every time,
    and one refused once is never let through by an earlier success of another set."""
    long_dims = {"region": "r" * 20, "plan": "pro"}
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: NOW,
                           snapshot_on_close=False) as eng:  # the next start replays the WAL
        await eng.define_meter(Meter(name="calls", aggregation="sum"))
        await eng.ingest([event(dimensions=long_dims)])
    strict = IngestLimits(max_value_chars=10)
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: NOW, limits=strict) as eng:
        result = await eng.query(Query(meter_api_name="calls", start_ms=0, end_ms=NOW + DAY,
                                       group_by=["region"]))
        assert [(r.group, r.value) for r in result.rows] == [({"region": "r" * 20}, 1)]
        for _ in range(2):
            with pytest.raises(BatchRejected, match="longer than 10"):
                await eng.ingest([event(dimensions=dict(long_dims))])
        await eng.ingest([event(dimensions={"region": "eu", "plan": "pro"})] * 2)
        with pytest.raises(BatchRejected, match="NUL"):
            await eng.ingest([event(dimensions={"region": "e\x00u", "plan": "pro"})])
        with pytest.raises(BatchRejected, match="must have a string value"):
            await eng.ingest([event(dimensions={"region": ["eu"], "plan": "pro"})])


async def test_remembered_dimension_sets_still_refuse_string_subclasses() -> None:
    """A dimension value must be a plain str whatever was ingested before: an equal
    StrEnum is refused after the plain string was accepted, as it is before."""
    import enum

    class Region(enum.StrEnum):
        EU = "eu"

    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls", aggregation="sum"))
        await eng.ingest([event(dimensions={"region": "eu"})] * 2)
        with pytest.raises(BatchRejected, match="must have a string value"):
            await eng.ingest([event(dimensions={"region": Region.EU})])
        # Big dimension sets are checked every time rather than remembered: rejected
        # batches full of them leave nothing behind.
        huge = {f"k{i}": "v" * 200 for i in range(16)}
        for _ in range(3):
            with pytest.raises(BatchRejected):
                await eng.ingest([event(dimensions=huge)] * 50 + [event(meter_value="x")])
        assert dimension_sets_of(eng) == 1
