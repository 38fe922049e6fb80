"""Limits, hand-checked: every aggregation fires as specified, threshold semantics, alert
seqs in WAL order, and adding, replacing, listing and removing limits.

Periods in time zones are in tests/test_limits_periods.py; alerts' durability and
subscriptions in tests/test_alerts.py (embedded) and tests/test_alerts_tcp.py; a
SIGKILL of a real server in tests/test_limits_crash.py. The naive-model property test
is tests/test_limits_model.py.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import trio

from engine import Event, IngestRules, Limit, Meter, Query, open_engine
from tests.helpers.alerts import (
    assert_gap_free,
    assert_quiet,
    key,
    memory_engine,
    take,
)
from tests.helpers.events import DAY, HOUR, MINUTE, NOW, TODAY, ev

# ----------------------------------------------------------- firing semantics


AGGREGATION_METERS = [
    Meter(name="s", aggregation="sum"),
    Meter(name="c", aggregation="count"),
    Meter(name="mx", aggregation="max"),
    Meter(name="mn", aggregation="min"),
    Meter(name="av", aggregation="avg"),
    Meter(name="lt", aggregation="latest"),
    Meter(name="uq", aggregation="unique_count", unique_dimension="user"),
]
AGGREGATION_THRESHOLDS: dict[str, list[Any]] = {
    "s": [10, 20], "c": [3], "mx": [10, 15], "mn": [50], "av": [12, "16.5"], "lt": [40],
    "uq": [3],
}


async def test_every_aggregation_fires_as_specified() -> None:
    t1, t2 = NOW - 60 * MINUTE, NOW - 30 * MINUTE
    # (events, expected alerts: (limit/meter, customer, threshold, value)); one batch per step
    steps: list[tuple[list[Event], list[tuple[Any, ...]]]] = [
        # sum: 4 + 5 = 9, then 10 (fires 10), then -3 + 15 -> 22 (fires 20)
        ([ev("a", 4, t1, "s"), ev("a", 5, t1, "s")], []),
        ([ev("a", 1, t2, "s")], [("s", "a", 10, 10)]),
        ([ev("a", -3, t2, "s"), ev("a", 15, t2, "s")], [("s", "a", 20, 22)]),
        # count ignores values
        ([ev("a", 100, t1, "c"), ev("a", 0, t1, "c")], []),
        ([ev("a", -7, t2, "c")], [("c", "a", 3, 3)]),
        # max: 12 fires 10 with the max as value; 9 changes nothing; 15 fires 15
        ([ev("a", 5, t1, "mx"), ev("a", 12, t1, "mx"), ev("a", 8, t1, "mx")],
         [("mx", "a", 10, 12)]),
        ([ev("a", 9, t2, "mx")], []),
        ([ev("a", 15, t2, "mx")], [("mx", "a", 15, 15)]),
        # min: the first value is the usage, so a first event at 100 fires 50 at once;
        # a customer whose first value is 30 never reaches 50, whatever follows
        ([ev("a", 30, t1, "mn")], []),
        ([ev("a", 100, t2, "mn")], []),
        ([ev("b", 100, t1, "mn")], [("mn", "b", 50, 100)]),
        ([ev("b", 10, t2, "mn")], []),
        ([ev("b", 200, t2, "mn")], []),
        # avg: 10 -> 10; (10 + 20) / 2 = 15 fires 12; +2 -> 32/3; +40 -> 72/4 = 18 fires 16.5
        ([ev("a", 10, t1, "av")], []),
        ([ev("a", 20, t1, "av")], [("av", "a", 12, 15)]),
        ([ev("a", 2, t2, "av")], []),
        ([ev("a", 40, t2, "av")], [("av", "a", Decimal("16.5"), 18)]),
        # latest: the value of the event with the greatest timestamp
        ([ev("a", 5, t1, "lt")], []),
        ([ev("a", 50, t2, "lt")], [("lt", "a", 40, 50)]),
        ([ev("b", 10, t2, "lt")], []),
        ([ev("b", 100, t1, "lt")], []),  # earlier timestamp: latest stays 10
        ([ev("b", 45, t2, "lt")], [("lt", "b", 40, 45)]),  # same timestamp: ingested last wins
        # unique_count of "user"
        ([ev("a", 1, t1, "uq", dimensions={"user": u}) for u in ("u1", "u2", "u1")], []),
        ([ev("a", 1, t2, "uq", dimensions={"user": "u2"})], []),
        ([ev("a", 1, t2, "uq", dimensions={"user": "u3"})], [("uq", "a", 3, 3)]),
    ]
    async with memory_engine() as eng:
        for meter in AGGREGATION_METERS:
            await eng.define_meter(meter)
            await eng.add_limit(Limit(id=meter.name, meter_api_name=meter.name,
                                      thresholds=AGGREGATION_THRESHOLDS[meter.name]))
        seen = set()
        seq = 0
        for events, expected in steps:
            ack = await eng.ingest(events, report_alerts=True)
            got = [(a.limit_id, a.customer_id, a.threshold, a.value) for a in ack.alerts]
            assert got == expected, events
            for alert in ack.alerts:
                assert alert.seq == seq and alert.period_start_ms == TODAY
                assert alert.meter_api_name == alert.limit_id and alert.crossed_at_ms == NOW
                seq += 1
            seen.update(a.limit_id for a in ack.alerts)
        assert seen == {m.name for m in AGGREGATION_METERS}
        # The value in the alert is what a query for that customer and day returns.
        result = await eng.query(Query(meter_api_name="av", start_ms=TODAY, end_ms=TODAY + DAY,
                                       filter={"customer_id": ["a"]}))
        assert result.rows[0].value == 18


async def test_threshold_semantics() -> None:
    async with memory_engine(shards=4) as eng:
        await eng.define_meter(Meter(name="gb"))
        await eng.add_limit(Limit(id="multi", meter_api_name="gb", thresholds=[30, 5, 20, 10]))
        await eng.add_limit(Limit(id="acme-only", meter_api_name="gb", thresholds=[1],
                                  customer_id="acme"))
        await eng.add_limit(Limit(id="eu", meter_api_name="gb", thresholds=[10],
                                  filter={"region": ["eu"]}))
        async with eng.subscribe(0) as subscription:
            # One batch jumps three thresholds (given unsorted): each fires, ascending seqs.
            ack = await eng.ingest([ev("globex", 25, NOW, unique_id="g1")], report_alerts=True)
            assert [key(a) for a in ack.alerts] == [("multi", "globex", t, 25, TODAY)
                                                    for t in (5, 10, 20)]
            assert_gap_free(ack.alerts)
            # The same event again (same unique id): a duplicate, which cannot cross 30.
            ack = await eng.ingest([ev("globex", 25, NOW, unique_id="g1")], report_alerts=True)
            assert (ack.accepted, ack.duplicates, ack.alerts) == (0, 1, [])
            # Many customers crossing in one batch: ascending seqs (by shard, then found).
            batch = [ev(f"c{i}", 7, NOW) for i in range(12)]
            ack = await eng.ingest(batch, report_alerts=True)
            assert_gap_free(ack.alerts, first=3)
            assert sorted(key(a) for a in ack.alerts) == sorted(
                ("multi", f"c{i}", 5, 7, TODAY) for i in range(12))
            # Fires once per period however many events follow.
            for _ in range(3):
                ack = await eng.ingest([ev(f"c{i}", "0.5", NOW) for i in range(12)],
                                       report_alerts=True)
                assert ack.alerts == []
            # customer_id-scoped: only acme's usage counts; dimension filter: only eu.
            ack = await eng.ingest([ev("globex", 1, NOW, dimensions={"region": "us"}),
                                    ev("initech", 9, NOW, dimensions={"region": "eu"}),
                                    ev("initech", 50, NOW, dimensions={"region": "us"})],
                                   report_alerts=True)
            assert sorted(key(a) for a in ack.alerts) == [
                ("multi", "initech", t, 59, TODAY) for t in (5, 10, 20, 30)]
            assert eng.next_alert_seq() == 19
            ack = await eng.ingest([ev("acme", 1, NOW, dimensions={"region": "eu"}),
                                    ev("initech", 1, NOW, dimensions={"region": "eu"})],
                                   report_alerts=True)
            assert sorted(key(a) for a in ack.alerts) == [
                ("acme-only", "acme", 1, 1, TODAY), ("eu", "initech", 10, 10, TODAY)]
            # report_alerts=False: the ack lists nothing, the alerts still happen.
            before = eng.next_alert_seq()
            ack = await eng.ingest([ev("hooli", 100, NOW)])
            assert ack.alerts == [] and eng.next_alert_seq() == before + 4
            streamed = await take(subscription, eng.next_alert_seq())
            assert_gap_free(streamed)
            await assert_quiet(subscription, 0.05)


async def test_alert_seqs_follow_wal_order_under_concurrent_ingest(tmp_path: Path) -> None:
    """Many ingests in flight (group commits, shards applying in parallel): sorted by
    lsn, the acks' alerts are exactly seqs 0, 1, 2, ... and so is the stream."""
    async with open_engine(tmp_path / "data", shards=4, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="gb"))
        await eng.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1, 2]))
        acks = []

        async def worker(task: int) -> None:
            for b in range(10):
                batch = [ev(f"t{task}-{b}-{i}", 2, NOW) for i in range(3)]
                acks.append(await eng.ingest(batch, report_alerts=True))

        async with eng.subscribe(0) as subscription:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for task in range(8):
                        nursery.start_soon(worker, task)
            assert eng.statistics().group_commits < len(acks)  # some were grouped
            acks.sort(key=lambda ack: ack.lsn)
            in_lsn_order = [alert for ack in acks for alert in ack.alerts]
            assert_gap_free(in_lsn_order)
            assert len(in_lsn_order) == 8 * 10 * 3 * 2
            assert await take(subscription, len(in_lsn_order)) == in_lsn_order


async def test_adding_replacing_and_removing_limits() -> None:
    """Chosen behaviour: a limit added (or replaced) while a customer's usage is already
    at or over a threshold fires at once, for the period containing the moment it was
    added (the point of adding a limit is to learn who is over it). Earlier periods are
    not evaluated at add time. Replacing (same id) forgets what fired; removing stops
    alerts."""
    async with memory_engine() as eng:
        await eng.define_meter(Meter(name="gb"))
        await eng.ingest([ev("acme", 150, NOW - HOUR), ev("globex", 50, NOW - HOUR),
                          ev("initech", 500, NOW - DAY)])  # initech: yesterday only
        async with eng.subscribe(0) as subscription:
            limit = Limit(id="cap", meter_api_name="gb", thresholds=[100, 120])
            assert await eng.add_limit(limit) == limit
            added = await take(subscription, 2)
            assert [key(a) for a in added] == [("cap", "acme", 100, 150, TODAY),
                                               ("cap", "acme", 120, 150, TODAY)]
            assert all(a.crossed_at_ms == NOW for a in added)
            assert eng.next_alert_seq() == 2  # nothing for globex (50) or initech (yesterday)

            # A later event for yesterday still fires for yesterday.
            late = await eng.ingest([ev("initech", 1, NOW - DAY)], report_alerts=True)
            assert [key(a) for a in late.alerts] == [("cap", "initech", 100, 501, TODAY - DAY),
                                                     ("cap", "initech", 120, 501, TODAY - DAY)]

            # Replacing: fired state is forgotten, acme is evaluated (and alerted) again.
            replaced = Limit(id="cap", meter_api_name="gb", thresholds=[40, 100])
            await eng.add_limit(replaced)
            again = await take(subscription, 5)
            assert again[:2] == late.alerts
            assert sorted(key(a) for a in again[2:]) == [
                ("cap", "acme", 40, 150, TODAY), ("cap", "acme", 100, 150, TODAY),
                ("cap", "globex", 40, 50, TODAY)]

            other = Limit(id="other", meter_api_name="gb", thresholds=[10**6], period="total")
            await eng.add_limit(other)
            assert await eng.list_limits() == [replaced, other]
            await eng.add_limit(limit)  # replacing moves the limit to the end of the list
            assert await eng.list_limits() == [other, limit]
            assert len(await take(subscription, 2)) == 2  # acme over 100 and 120 again

            assert await eng.remove_limit("cap") is True
            assert await eng.remove_limit("cap") is False
            assert await eng.list_limits() == [other]
            ack = await eng.ingest([ev("globex", 1000, NOW), ev("hooli", 1000, NOW)],
                                   report_alerts=True)
            assert ack.alerts == []
            # Re-adding after a remove starts from scratch as well.
            await eng.add_limit(limit)
            readded = await take(subscription, 6)
            assert sorted(key(a)[1:3] for a in readded) == [
                ("acme", 100), ("acme", 120), ("globex", 100), ("globex", 120),
                ("hooli", 100), ("hooli", 120)]
            await assert_quiet(subscription, 0.05)


async def test_list_limits_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data"
    limits = [Limit(id=f"l{i}", meter_api_name="gb", thresholds=[i + 1, Decimal("2.5"), 0.1],
                    customer_id=None if i % 2 else "acme", period=p, timezone="Asia/Kolkata",
                    filter={"region": ["eu"]} if i == 3 else {})
              for i, p in enumerate(["hour", "day", "week", "month", "total"])]
    async with open_engine(path, shards=2, clock_ms=lambda: NOW,
                           snapshot_on_close=False) as eng:
        await eng.define_meter(Meter(name="gb"))
        for limit in limits:
            await eng.add_limit(limit)
        await eng.remove_limit("l1")
        await eng.snapshot()
        await eng.add_limit(limits[0])  # after the snapshot: from the WAL tail
        expected = [limits[2], limits[3], limits[4], limits[0]]
        assert await eng.list_limits() == expected
    for _ in range(2):  # WAL tail replay, then the snapshot written on close
        async with open_engine(path, shards=3, clock_ms=lambda: NOW) as eng:
            assert await eng.list_limits() == expected
            assert eng.statistics().limit_count == 4


async def test_a_limit_with_decimal_string_thresholds_lists_the_same_after_reopen(
    tmp_path: Path,
) -> None:
    """docs/limits.md allows thresholds as decimal strings."""
    limit = Limit(id="cap", meter_api_name="gb", thresholds=["2.5", 10])
    async with open_engine(tmp_path / "data", shards=2, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="gb"))
        await eng.add_limit(limit)
        before = await eng.list_limits()
    async with open_engine(tmp_path / "data", shards=2, clock_ms=lambda: NOW) as eng:
        assert await eng.list_limits() == before


async def test_of_two_concurrent_removals_only_one_removes() -> None:
    async with memory_engine() as eng:
        await eng.define_meter(Meter(name="gb"))
        await eng.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1]))
        results: list[bool] = []

        async def remove() -> None:
            results.append(await eng.remove_limit("cap"))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(remove)
        assert sorted(results) == [False, False, True]
        assert await eng.list_limits() == []


def limit_periods(state: bytes) -> list[int]:
    """The period starts of every limit state in ``Engine.export_state`` bytes."""
    shards, _ = msgspec.msgpack.decode(state)
    return sorted({start for part in shards for _, periods in part[5]
                   for start, _, _ in periods})


def without_sealing_progress(state: bytes) -> Any:
    """``Engine.export_state`` bytes, decoded, without each shard's ``sealed_before_minute``:
    a live engine's shards seal days that left the hot window between checkpoints (here
    cutting nothing), which a replay from the last checkpoint does again later."""
    shards, engine_state = msgspec.msgpack.decode(state)
    for part in shards:
        part[2] = None
    return shards, engine_state


async def test_the_engine_forgets_limit_periods_beyond_its_late_limit_live_and_in_replay(
    tmp_path: Path,
) -> None:
    """The configured late limit bounds the kept periods, and replay (which checks events
    against no late limit) forgets exactly what the live engine forgot."""
    clock = [TODAY]
    rules = IngestRules(late_ms=2 * HOUR)
    async with open_engine(tmp_path, shards=2, ingest_rules=rules, clock_ms=lambda: clock[0],
                           snapshot_on_close=False) as eng:
        await eng.define_meter(Meter(name="calls", aggregation="sum"))
        await eng.add_limit(Limit(id="hourly", meter_api_name="calls", thresholds=[2],
                                  period="hour"))
        fired = 0
        for hour in range(12):
            clock[0] = TODAY + hour * HOUR + 30 * MINUTE
            events = [ev(customer, 1, clock[0] - MINUTE, "calls") for customer in "abc"]
            fired += len((await eng.ingest(events + events, report_alerts=True)).alerts)
        assert fired == 12 * 3
        live = eng.export_state()
    # At 11:30 an event may be as old as 9:30, so hour 9 is kept; hour 8 is forgotten.
    assert limit_periods(live) == [TODAY + hour * HOUR for hour in (9, 10, 11)]
    async with open_engine(tmp_path, shards=2, ingest_rules=rules,
                           clock_ms=lambda: clock[0]) as eng:  # replays the whole log
        assert without_sealing_progress(eng.export_state()) == without_sealing_progress(live)
