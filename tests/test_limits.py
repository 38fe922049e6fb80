"""Limits and alert subscriptions, end to end: periods in time zones (under a virtual
clock), every aggregation, threshold semantics, limit management, durability and
resume (embedded, over TCP, across a SIGKILL of a real server process), slow
subscribers, customer-bound keys and push latency.

The naive-model property test is tests/test_limits_model.py; the cases here are
hand-checked scenarios with the expected values written out.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import trio

from engine import Alert, Engine, Event, Limit, Meter, Query, open_engine
from engine.auth import parse_keys
from engine.client import ClientSubscription, open_client
from engine.errors import ConnectionLost, Forbidden
from engine.protocol.framing import HEADER, FrameDecoder
from engine.protocol.messages import (
    PROTOCOL_VERSION,
    AlertsPush,
    Hello,
    Subscribe,
    Subscribed,
    Welcome,
    decode_server_message,
    encode_message,
)
from engine.storage import MemoryStore
from tests.conftest import HOST, NOW

REPO = Path(__file__).resolve().parents[1]
MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000
TODAY = NOW - NOW % DAY  # UTC midnight of the fixed engine clock (NOW is 14:13 UTC)


# ------------------------------------------------------------------ helpers


def local_ms(zone: str, *fields: int) -> int:
    """Epoch ms of a local wall-clock time (fold=0) in ``zone``."""
    return int(datetime(*fields, tzinfo=ZoneInfo(zone)).timestamp()) * 1000


def utc_ms(*fields: int) -> int:
    return int(datetime(*fields, tzinfo=UTC).timestamp()) * 1000


def ev(customer: str, value: Any, ts: int, meter: str = "gb", **fields: Any) -> Event:
    return Event(meter_api_name=meter, customer_id=customer, meter_value=value,
                 meter_time_in_millis=ts, **fields)


def key(alert: Alert) -> tuple[Any, ...]:
    """What an alert says, without its seq and arrival time."""
    return (alert.limit_id, alert.customer_id, alert.threshold, alert.value,
            alert.period_start_ms)


async def take(subscription: Any, count: int, timeout_s: float = 10.0) -> list[Alert]:
    """Exactly ``count`` alerts from an embedded or TCP subscription."""
    alerts = []
    with trio.fail_after(timeout_s):
        for _ in range(count):
            alerts.append(await subscription.__anext__())
    return alerts


async def assert_quiet(subscription: Any, wait_s: float = 0.2) -> None:
    """Nothing more arrives within ``wait_s``."""
    with trio.move_on_after(wait_s):
        extra = await subscription.__anext__()
        pytest.fail(f"unexpected alert {extra}")


def assert_gap_free(alerts: list[Alert], first: int = 0) -> None:
    assert [a.seq for a in alerts] == list(range(first, first + len(alerts)))


@asynccontextmanager
async def memory_engine(clock_ms: Callable[[], int] = lambda: NOW,
                        shards: int = 3) -> AsyncIterator[Engine]:
    async with open_engine(store=MemoryStore(), shards=shards, clock_ms=clock_ms) as eng:
        yield eng


# ------------------------------------------------- periods under a virtual clock


async def test_daily_limit_rolls_over_at_local_midnight_and_late_events_count_for_their_day(
    autojump_clock: Any,
) -> None:
    """Asia/Kathmandu (+05:45): the day starts at 18:15 UTC. Usage of the new day starts
    from zero, the same threshold fires again for the new period, and a late event for
    yesterday fires yesterday's next threshold with yesterday's period start."""
    zone = "Asia/Kathmandu"
    start_ms = local_ms(zone, 2025, 6, 10, 22, 0)
    t0 = trio.current_time()

    def clock() -> int:
        return start_ms + round((trio.current_time() - t0) * 1000)

    day1 = local_ms(zone, 2025, 6, 10)
    day2 = local_ms(zone, 2025, 6, 11)
    assert day2 - day1 == DAY and day2 % HOUR == 15 * MINUTE  # a quarter past, in UTC

    async with memory_engine(clock) as eng:
        await eng.define_meter(Meter(name="gb"))
        await eng.add_limit(Limit(id="daily", meter_api_name="gb", thresholds=[10, 20],
                                  period="day", timezone=zone))
        async with eng.subscribe(0) as subscription:
            assert (await eng.ingest([ev("acme", 6, clock())], report_alerts=True)).alerts == []
            await trio.sleep(30 * 60)
            first = (await eng.ingest([ev("acme", 4, clock())], report_alerts=True)).alerts
            assert [key(a) for a in first] == [("daily", "acme", 10, 10, day1)]
            assert first[0].crossed_at_ms == start_ms + 30 * MINUTE
            for _ in range(5):  # fired once per period, however many events follow
                assert (await eng.ingest([ev("acme", 1, clock())], report_alerts=True)).alerts == []

            await trio.sleep(2 * 3600)  # 00:30 on day 2, local time
            assert clock() > day2
            ack = await eng.ingest([ev("acme", 4, clock())], report_alerts=True)
            assert ack.alerts == []  # day 2 starts from zero, not from day 1's 15
            result = await eng.query(Query(meter_api_name="gb", start_ms=day1,
                                           end_ms=day2 + DAY, window="day", timezone=zone))
            assert [(r.window_start_ms, r.value) for r in result.rows] == [(day1, 15), (day2, 4)]
            second = (await eng.ingest([ev("acme", 6, clock())], report_alerts=True)).alerts
            assert [key(a) for a in second] == [("daily", "acme", 10, 10, day2)]

            # Late: an event for yesterday (22:00 on day 1) pushes day 1 from 15 to 20.
            late = await eng.ingest([ev("acme", 5, day1 + 22 * HOUR)], report_alerts=True)
            assert [key(a) for a in late.alerts] == [("daily", "acme", 20, 20, day1)]
            assert late.alerts[0].crossed_at_ms == clock()

            streamed = await take(subscription, 3)
            assert streamed == first + second + late.alerts
            assert_gap_free(streamed)


async def test_daily_limit_in_new_york_rolls_over_at_local_midnight(autojump_clock: Any) -> None:
    zone = "America/New_York"
    start_ms = local_ms(zone, 2025, 1, 15, 23, 50)
    t0 = trio.current_time()

    def clock() -> int:
        return start_ms + round((trio.current_time() - t0) * 1000)

    async with memory_engine(clock) as eng:
        await eng.define_meter(Meter(name="gb", aggregation="count"))
        await eng.add_limit(Limit(id="daily", meter_api_name="gb", thresholds=[2],
                                  timezone=zone))
        alerts = []
        for _ in range(4):  # 23:50, 23:55, 00:00, 00:05 local
            alerts += (await eng.ingest([ev("acme", 1, clock())], report_alerts=True)).alerts
            await trio.sleep(5 * 60)
        jan15, jan16 = local_ms(zone, 2025, 1, 15), local_ms(zone, 2025, 1, 16)
        assert jan16 - jan15 == DAY and jan16 == utc_ms(2025, 1, 16, 5)
        assert [key(a) for a in alerts] == [("daily", "acme", 2, 2, jan15),
                                            ("daily", "acme", 2, 2, jan16)]


async def test_hourly_limit_across_dst_changes_in_berlin(autojump_clock: Any) -> None:
    """Hour periods are real hours: at fall-back the local hour 02:00 happens twice and
    each occurrence is its own period; at spring-forward 02:00 never happens."""
    zone = "Europe/Berlin"
    fall_start = utc_ms(2025, 10, 25, 23, 30)  # 01:30 CEST; clocks go back at 01:00 UTC
    t0 = trio.current_time()
    offset = {"ms": fall_start}

    def clock() -> int:
        return offset["ms"] + round((trio.current_time() - t0) * 1000)

    async with memory_engine(clock) as eng:
        await eng.define_meter(Meter(name="gb"))
        await eng.add_limit(Limit(id="hourly", meter_api_name="gb", thresholds=[5],
                                  period="hour", timezone=zone))
        await eng.add_limit(Limit(id="daily", meter_api_name="gb", thresholds=[25],
                                  period="day", timezone=zone))
        fired = []
        for _ in range(5):  # 01:30 CEST, 02:30 CEST, 02:30 CET, 03:30 CET, 04:30 CET
            fired += (await eng.ingest([ev("acme", 5, clock())], report_alerts=True)).alerts
            await trio.sleep(3600)
        hourly = [a.period_start_ms for a in fired if a.limit_id == "hourly"]
        assert hourly == [utc_ms(2025, 10, 25, 23) + k * HOUR for k in range(5)]
        local_hours = [datetime.fromtimestamp(p / 1000, ZoneInfo(zone)).strftime("%H:%M %Z")
                       for p in hourly]
        assert local_hours == ["01:00 CEST", "02:00 CEST", "02:00 CET", "03:00 CET",
                               "04:00 CET"]
        # The 25-hour day: Oct 26 starts at 22:00 UTC on Oct 25 and ends at 23:00 UTC.
        assert [key(a) for a in fired if a.limit_id == "daily"] == [
            ("daily", "acme", 25, 25, utc_ms(2025, 10, 25, 22))]
        await trio.sleep((utc_ms(2025, 10, 26, 22, 35) - clock()) / 1000)
        late_in_day = await eng.ingest([ev("globex", 30, utc_ms(2025, 10, 26, 22, 30))],
                                       report_alerts=True)  # 23:30 CET, still Oct 26
        assert ("daily", "globex", 25, 30, utc_ms(2025, 10, 25, 22)) in [
            key(a) for a in late_in_day.alerts]

        # Spring forward: 2025-03-30, 01:00 UTC, 02:00 CET becomes 03:00 CEST.
        offset["ms"] = utc_ms(2025, 3, 29, 23, 30) - round((trio.current_time() - t0) * 1000)
        fired = []
        for _ in range(3):  # 00:30 CET, 01:30 CET, 03:30 CEST
            fired += (await eng.ingest([ev("acme", 5, clock())], report_alerts=True)).alerts
            await trio.sleep(3600)
        hourly = [a.period_start_ms for a in fired if a.limit_id == "hourly"]
        assert hourly == [utc_ms(2025, 3, 29, 23) + k * HOUR for k in range(3)]
        assert [datetime.fromtimestamp(p / 1000, ZoneInfo(zone)).hour for p in hourly] == [
            0, 1, 3]


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


# ------------------------------------------------------ durability and resume


def crossing_batch(prefix: str, customers: int, value: Any = 3,
                   ts: int = NOW) -> list[Event]:
    return [ev(f"{prefix}{i}", value, ts, unique_id=f"{prefix}{i}-{value}")
            for i in range(customers)]


async def test_alerts_survive_reopen_and_snapshot_and_resume_from_any_seq(tmp_path: Path) -> None:
    path = tmp_path / "data"
    acked: list[Alert] = []

    async def produce(eng: Engine, prefix: str, batches: int) -> None:
        for b in range(batches):
            ack = await eng.ingest(crossing_batch(f"{prefix}{b}-", 4), report_alerts=True)
            acked.extend(ack.alerts)

    # Session 1: limits, alerts, an explicit snapshot, more alerts; closed without a
    # snapshot, so the last group's alerts exist only through WAL replay.
    async with open_engine(path, shards=3, clock_ms=lambda: NOW,
                           snapshot_on_close=False) as eng:
        await eng.define_meter(Meter(name="gb"))
        await eng.add_limit(Limit(id="daily", meter_api_name="gb", thresholds=[1, 2, 3]))
        await eng.add_limit(Limit(id="total", meter_api_name="gb", thresholds=["2.5"],
                                  period="total"))
        async with eng.subscribe(0) as live:
            await produce(eng, "a", 3)
            await eng.snapshot()
            await produce(eng, "b", 3)
            streamed = await take(live, len(acked))
        assert streamed == acked
        assert_gap_free(acked)
        assert len(acked) == 6 * 4 * 4
    session1 = list(acked)

    # Session 2: every stored alert, from any seq, identical; then live ones continue.
    async with open_engine(path, shards=3, clock_ms=lambda: NOW) as eng:
        assert eng.next_alert_seq() == len(session1)
        for k in (0, 1, 47, len(session1) - 1, len(session1)):
            async with eng.subscribe(from_seq=k) as subscription:
                assert await take(subscription, len(session1) - k) == session1[k:]
                await assert_quiet(subscription, 0.02)
        async with eng.subscribe(from_seq=90) as subscription:
            await produce(eng, "c", 2)
            assert await take(subscription, len(acked) - 90) == acked[90:]
        await eng.snapshot()
        await produce(eng, "d", 1)
    assert_gap_free(acked)

    # Session 3 (snapshot on close of session 2 plus its tail): the whole log, identical.
    async with open_engine(path, shards=5, clock_ms=lambda: NOW) as eng:
        assert eng.next_alert_seq() == len(acked)
        async with eng.subscribe(from_seq=0) as subscription:
            assert await take(subscription, len(acked)) == acked
            # Already-fired thresholds stay fired after reopen (fired state is durable).
            ack = await eng.ingest(crossing_batch("a0-", 4, value=1), report_alerts=True)
            assert ack.alerts == []
            ack = await eng.ingest(crossing_batch("e", 1), report_alerts=True)
            assert [a.seq for a in ack.alerts] == list(range(len(acked), len(acked) + 4))
            assert await take(subscription, 4) == ack.alerts


async def test_alerts_of_an_add_limit_keep_their_seqs_after_crash_recovery(
    tmp_path: Path,
) -> None:
    """A snapshot during the session, then a limit added (customers already over it),
    then a crash (no snapshot on close): replay must give every alert its old seq."""
    path = tmp_path / "data"
    async with open_engine(path, shards=1, clock_ms=lambda: NOW,
                           snapshot_on_close=False) as eng:
        await eng.define_meter(Meter(name="gb"))
        await eng.ingest([ev(name, 5, NOW) for name in ("zeta", "alpha", "mu")])
        await eng.snapshot()
        await eng.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1]))
        async with eng.subscribe(0) as subscription:
            before = await take(subscription, 3)
        assert [a.customer_id for a in before] == ["alpha", "mu", "zeta"]  # canonical order
        await eng.ingest([ev("omega", 0, NOW)])  # a commit that stores those alerts
    async with open_engine(path, shards=1, clock_ms=lambda: NOW) as eng:
        async with eng.subscribe(0) as subscription:
            assert await take(subscription, 3) == before


async def test_acked_alerts_keep_their_seqs_when_reopened_with_another_shard_count(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data"
    async with open_engine(path, shards=2, clock_ms=lambda: NOW,
                           snapshot_on_close=False) as eng:  # as after a crash
        await eng.define_meter(Meter(name="gb"))
        await eng.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1]))
        ack = await eng.ingest([ev(f"c{i}", 1, NOW) for i in range(8)], report_alerts=True)
        await eng.ingest([ev("z", 0, NOW)])
    async with open_engine(path, shards=5, clock_ms=lambda: NOW) as eng:
        async with eng.subscribe(0) as subscription:
            assert await take(subscription, 8) == ack.alerts


async def test_an_idle_subscriber_never_slows_ingest_and_later_gets_everything(
    tmp_path: Path,
) -> None:
    """Thousands of alerts while one subscriber never reads and another reads one alert
    a second: ingest takes about as long as without them; afterwards both read every
    alert, in order, the idle one partly from the store (``lagged``)."""
    async with open_engine(tmp_path / "data", shards=4, clock_ms=lambda: NOW) as eng:
        # White-box: shrink the in-memory window so that catching up needs the store
        # (the public default keeps 65,536 alerts; there is no public knob).
        eng._hub._recent_limit = 64
        await eng.define_meter(Meter(name="gb"))
        await eng.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1, 2]))
        batches, per_batch = 15, 100

        async def ingest_all(prefix: str) -> tuple[float, list[Alert]]:
            alerts = []
            started = time.perf_counter()
            with trio.fail_after(30):
                for b in range(batches):
                    batch = [ev(f"{prefix}{b}-{i}", 2, NOW) for i in range(per_batch)]
                    alerts += (await eng.ingest(batch, report_alerts=True)).alerts
            return time.perf_counter() - started, alerts

        baseline_s, first = await ingest_all("warm")
        assert len(first) == 2 * batches * per_batch
        from_seq = eng.next_alert_seq()
        slow_read: list[Alert] = []
        async with eng.subscribe(from_seq) as idle, eng.subscribe(from_seq) as slow:
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    for _ in range(1000):
                        slow_read.append(await slow.__anext__())
                        await trio.sleep(1)

                nursery.start_soon(trickle)
                with_idle_s, alerts = await ingest_all("idle")
                nursery.cancel_scope.cancel()
            print(f"\ningest {batches} batches: {baseline_s:.2f} s alone, {with_idle_s:.2f} s"
                  " beside an idle and a slow subscriber")
            # Measured with a busy core beside it: 0.03-0.16 s alone, 0.03-0.23 s beside
            # them; the slack covers a stall of the whole process (up to ~1.9 s seen on
            # this shared machine), which would hit either run.
            assert with_idle_s < 3 * baseline_s + 3.0, (
                f"with an idle subscriber {with_idle_s:.2f} s, alone {baseline_s:.2f} s")
            assert idle.behind_by() == len(alerts) == 2 * batches * per_batch
            got = await take(idle, len(alerts), timeout_s=20)
            assert got == alerts
            assert idle.lagged > 0  # it fell out of the in-memory window and read the store
            assert idle.behind_by() == 0
            rest = await take(slow, len(alerts) - len(slow_read), timeout_s=20)
            assert slow_read + rest == alerts


# -------------------------------------------------------------------- over TCP


async def test_tcp_stored_then_live_then_resume_after_disconnect(
    engine: Engine, serving: Any
) -> None:
    async with serving(engine) as server:
        async with open_client(HOST, server.port) as admin:
            await admin.define_meter(Meter(name="gb"))
            await admin.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1, 2, 3]))
            acked: list[Alert] = []

            async def produce(prefix: str, batches: int) -> None:
                for b in range(batches):
                    ack = await admin.ingest(crossing_batch(f"{prefix}{b}-", 4),
                                             report_alerts=True)
                    assert len(ack.alerts) == 12
                    acked.extend(ack.alerts)

            await produce("stored", 5)  # 60 alerts before anyone subscribes
            async with open_client(HOST, server.port) as reader:
                async with reader.subscribe(from_seq=0) as subscription:
                    assert await take(subscription, 60) == acked
                    await produce("live", 5)  # 60 more, pushed live
                    first = await take(subscription, 25)
                    assert first == acked[60:85]
                    resume_at = subscription.next_seq
                # The client closes with alerts 85.. pushed but unread (or in flight).
            assert resume_at == first[-1].seq + 1 == 85
            async with open_client(HOST, server.port) as reader:
                async with reader.subscribe(from_seq=resume_at) as subscription:
                    await produce("after", 2)
                    rest = await take(subscription, len(acked) - resume_at)
                    await assert_quiet(subscription)
            assert acked[:60] + first + rest == acked
            assert_gap_free(acked)
            assert {key(a) for a in acked} == {
                ("cap", f"{p}{b}-{i}", t, 3, TODAY) for p, n in (("stored", 5), ("live", 5),
                                                                 ("after", 2))
                for b in range(n) for i in range(4) for t in (1, 2, 3)}


async def test_tcp_customer_bound_key_sees_only_its_customers_alerts(
    engine: Engine, serving: Any
) -> None:
    keys = parse_keys({"keys": [
        {"key": "admin-key", "scopes": ["admin", "ingest", "query"]},
        {"key": "acme-key", "scopes": ["ingest", "query"], "customer_id": "acme"},
    ]})
    async with serving(engine, keys=keys) as server:
        async with open_client(HOST, server.port, "admin-key") as admin, \
                open_client(HOST, server.port, "acme-key") as acme:
            await admin.define_meter(Meter(name="gb"))
            everyone = Limit(id="everyone", meter_api_name="gb", thresholds=[1, 5])
            globex_only = Limit(id="globex", meter_api_name="gb", thresholds=[1],
                                customer_id="globex")
            acme_only = Limit(id="acme", meter_api_name="gb", thresholds=[2],
                              customer_id="acme")
            for limit in (everyone, globex_only, acme_only):
                await admin.add_limit(limit)
            with pytest.raises(Forbidden):
                await acme.add_limit(Limit(id="mine", meter_api_name="gb", thresholds=[1]))
            assert await acme.list_limits() == [everyone, acme_only]
            all_alerts: list[Alert] = []
            async with acme.subscribe(0) as acme_alerts, admin.subscribe(0) as admin_alerts:
                for step in range(6):
                    for customer in ("globex", "acme", "initech"):
                        ack = await admin.ingest([ev(customer, 1, NOW - step * MINUTE)],
                                                 report_alerts=True)
                        all_alerts += ack.alerts
                ack = await acme.ingest([ev("acme", 1, NOW)], report_alerts=True)
                assert ack.alerts == []  # acme's usage is 7: everything fired already
                assert await take(admin_alerts, len(all_alerts)) == all_alerts
                mine = [a for a in all_alerts if a.customer_id == "acme"]
                assert [key(a)[:3] for a in mine] == [("everyone", "acme", 1),
                                                      ("acme", "acme", 2),
                                                      ("everyone", "acme", 5)]
                assert len(all_alerts) > len(mine) + 3
                assert await take(acme_alerts, len(mine)) == mine
                await assert_quiet(acme_alerts, 0.3)


async def test_tcp_a_subscription_keeps_an_otherwise_idle_connection_open(
    engine: Engine, serving: Any
) -> None:
    await engine.define_meter(Meter(name="gb"))
    await engine.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1]))
    async with serving(engine, idle_timeout_s=0.3) as server:
        async with open_client(HOST, server.port) as reader:
            async with reader.subscribe(0) as subscription:
                await trio.sleep(1.0)  # no request from the reader for over 3 idle timeouts
                ack = await engine.ingest([ev("acme", 1, NOW)], report_alerts=True)
                assert await take(subscription, 1, timeout_s=5) == ack.alerts


async def test_tcp_server_shutdown_ends_a_subscription_with_connection_lost(
    engine: Engine, serving: Any
) -> None:
    await engine.define_meter(Meter(name="gb"))
    await engine.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1]))
    async with serving(engine) as server:
        async with open_client(HOST, server.port) as reader:
            async with reader.subscribe(0) as subscription:
                ack = await engine.ingest([ev("acme", 1, NOW)], report_alerts=True)
                assert await take(subscription, 1) == ack.alerts
                server.shutdown()
                with trio.fail_after(5), pytest.raises(ConnectionLost, match="from seq 1"):
                    await subscription.__anext__()
                assert subscription.next_seq == 1


async def test_tcp_alert_reaches_a_subscriber_soon_after_the_ack(
    engine: Engine, serving: Any
) -> None:
    arrivals: dict[int, float] = {}
    async with serving(engine) as server:
        async with open_client(HOST, server.port) as admin, \
                open_client(HOST, server.port) as reader:
            await admin.define_meter(Meter(name="gb"))
            await admin.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[10]))
            async with reader.subscribe(0) as subscription, trio.open_nursery() as nursery:

                async def receive() -> None:
                    async for alert in subscription:
                        arrivals[alert.seq] = trio.current_time()

                nursery.start_soon(receive)
                delays = []
                for i in range(20):
                    ack = await admin.ingest([ev(f"c{i}", 10, NOW)], report_alerts=True)
                    acked_at = trio.current_time()
                    [alert] = ack.alerts
                    with trio.fail_after(10):  # only bounds the wait; the delay is asserted
                        while alert.seq not in arrivals:
                            await trio.sleep(0.001)
                    delays.append(arrivals[alert.seq] - acked_at)
                nursery.cancel_scope.cancel()
    print(f"\nack to alert push: max {1000 * max(delays):.1f} ms over {len(delays)} alerts")
    assert max(delays) < 0.2, f"ack to push {[round(1000 * d, 1) for d in delays]} ms"


async def test_tcp_a_subscriber_that_does_not_read_never_slows_ingest(
    engine: Engine, serving: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscribing application does not read while another client ingests: ingests
    complete, its client's local buffer overflows (shrunk here to 300 alerts), and when
    it reads it reopens from its next seq and gets every alert once, in order."""
    monkeypatch.setattr(ClientSubscription, "buffer_alerts", 300)
    async with serving(engine) as server:
        async with open_client(HOST, server.port) as admin, \
                open_client(HOST, server.port) as reader:
            await admin.define_meter(Meter(name="gb"))
            await admin.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1, 2]))
            acked: list[Alert] = []
            async with reader.subscribe(0) as subscription:
                with trio.fail_after(20):
                    for b in range(20):
                        ack = await admin.ingest(crossing_batch(f"b{b}-", 50, value=2),
                                                 report_alerts=True)
                        acked += ack.alerts
                assert len(acked) == 2000
                got = await take(subscription, len(acked), timeout_s=20)
                assert got == acked
                assert subscription.lagged >= 1
                await assert_quiet(subscription)


async def test_tcp_a_small_client_buffer_still_makes_progress(
    engine: Engine, serving: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ClientSubscription, "buffer_alerts", 100)
    async with serving(engine) as server:
        async with open_client(HOST, server.port) as admin, \
                open_client(HOST, server.port) as reader:
            await admin.define_meter(Meter(name="gb"))
            await admin.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1]))
            ack = await admin.ingest(crossing_batch("c", 300), report_alerts=True)
            async with reader.subscribe(0) as subscription:
                await trio.sleep(0.2)  # the first pushes arrive unread and overflow
                # The timeout only bounds the wait (a shared machine stalls for seconds).
                assert await take(subscription, 300, timeout_s=10) == ack.alerts


async def test_tcp_a_connection_that_never_reads_is_dropped_and_can_resume(
    engine: Engine, serving: Any
) -> None:
    """A raw subscriber that reads nothing: the server stops pushing into it, ingest from
    another client goes on, the connection is closed after ``send_timeout_s``, and a new
    subscription from the last seq received gets the rest, once each."""
    long = "x" * 200  # big alerts fill the socket buffers with fewer of them
    rcvbuf = 4096
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 << 20
    alert_bytes = 700
    needed = 2 * (wmem_max + 65536) // alert_bytes
    if needed > 20_000:
        pytest.skip(f"kernel send buffers too large ({wmem_max} bytes) to fill quickly")
    per_batch = 500
    batches = -(-needed // per_batch)
    async with serving(engine, send_timeout_s=0.5, max_in_flight=4) as server:
        async with open_client(HOST, server.port) as admin:
            await admin.define_meter(Meter(name="gb"))
            await admin.add_limit(Limit(id="L" + long, meter_api_name="gb", thresholds=[1]))
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            try:
                with trio.fail_after(5):
                    await sock.connect((HOST, server.port))
            except BaseException:
                sock.close()
                raise
            async with trio.SocketStream(sock) as raw:
                decoder = FrameDecoder()

                async def receive() -> Any:
                    while True:
                        payload = decoder.next_frame()
                        if payload is not None:
                            return decode_server_message(payload)
                        try:
                            data = await raw.receive_some(1 << 16)
                        except trio.BrokenResourceError:
                            return None
                        if not data:
                            return None
                        decoder.feed(data)

                for message in (Hello(version=PROTOCOL_VERSION, client="never-reads"),
                                Subscribe(id=1, from_seq=0)):
                    payload = encode_message(message)
                    await raw.send_all(HEADER.pack(len(payload)) + payload)
                with trio.fail_after(5):
                    assert isinstance(await receive(), Welcome)
                    assert isinstance(await receive(), Subscribed)
                acked: list[Alert] = []
                received: list[Alert] = []

                async def ingest(b: int) -> None:
                    ack = await admin.ingest(
                        [ev(f"{long}{b}-{i}", 1, NOW) for i in range(per_batch)],
                        report_alerts=True)
                    acked.extend(ack.alerts)

                await ingest(0)
                with trio.fail_after(5):  # read the first push, then never read again
                    message = await receive()
                    assert isinstance(message, AlertsPush)
                    received += message.alerts
                started = trio.current_time()
                with trio.fail_after(30):
                    for b in range(1, batches):
                        await ingest(b)
                ingest_s = trio.current_time() - started
                with trio.fail_after(10):
                    while server.stats.connections > 1:
                        await trio.sleep(0.05)
                # Read what the kernel buffered before the server gave up, up to EOF.
                with trio.fail_after(10):
                    for _ in range(100_000):
                        message = await receive()
                        if message is None:
                            break
                        assert isinstance(message, AlertsPush), message
                        received += message.alerts
            assert received and received == acked[:len(received)]
            assert len(received) < len(acked), "the buffers held everything: nothing tested"
            async with admin.subscribe(from_seq=len(received)) as subscription:
                rest = await take(subscription, len(acked) - len(received), timeout_s=20)
                await assert_quiet(subscription)
            assert received + rest == acked
            print(f"\n{batches - 1} ingests beside a subscriber that does not read: {ingest_s:.2f} s")
            assert ingest_s < 20, f"{ingest_s:.2f} s"


# ------------------------------------------------ a real server, killed with -9


SERVE_LINE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@asynccontextmanager
async def server_process(data: Path, log: Path) -> AsyncIterator[tuple[subprocess.Popen[str],
                                                                     int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("METER_API_KEYS", None)
    with log.open("a") as stderr, subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--data-dir", str(data), "--port", "0",
         "--shards", "3", "--status", "off"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
    ) as process:
        try:
            assert process.stdout is not None
            port = None
            with trio.fail_after(30):
                for _ in range(20):
                    line = await trio.to_thread.run_sync(process.stdout.readline)
                    match = SERVE_LINE.search(line)
                    if match or not line:
                        port = int(match.group(1)) if match else None
                        break
            assert port is not None, log.read_text()
            yield process, port
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


async def test_alerts_survive_sigkill_of_the_server_and_resume_exactly(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    now = time.time_ns() // 1_000_000  # the server runs on the wall clock
    per_batch = 5 * 3  # 5 customers, 3 thresholds each

    def batch(b: int) -> list[Event]:
        return [ev(f"b{b}-{i}", 3, now, unique_id=f"{b}-{i}") for i in range(5)]

    acked: list[Alert] = []
    async with server_process(data, log) as (process, port):
        async with open_client(HOST, port) as admin, open_client(HOST, port) as reader:
            await admin.define_meter(Meter(name="gb"))
            await admin.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1, 2, 3],
                                        period="total"))
            async with reader.subscribe(0) as subscription:
                for b in range(6):
                    acked += (await admin.ingest(batch(b), report_alerts=True)).alerts
                seen = await take(subscription, 40)
                assert seen == acked[:40]

                async def keep_ingesting() -> None:
                    for b in range(6, 200):
                        try:
                            ack = await admin.ingest(batch(b), report_alerts=True)
                        except ConnectionLost:
                            return
                        acked.extend(ack.alerts)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_ingesting)
                    with trio.fail_after(10):
                        while len(acked) < 10 * per_batch:
                            await trio.sleep(0.001)
                    process.send_signal(signal.SIGKILL)
                    await trio.to_thread.run_sync(process.wait)
    assert len(acked) >= 10 * per_batch
    assert_gap_free(acked)
    resume_at = seen[-1].seq + 1

    async with server_process(data, log) as (process, port):
        async with open_client(HOST, port) as client:
            total = (await client.stats())["alerts"]
            # Every acknowledged alert is there; at most the one batch in flight is added.
            assert total in (len(acked), len(acked) + per_batch)
            async with client.subscribe(from_seq=resume_at) as subscription:
                rest = await take(subscription, total - resume_at)
                assert_gap_free(rest, first=resume_at)
                assert rest[:len(acked) - resume_at] == acked[resume_at:]  # identical content
                # Live alerts continue the log.
                ack = await client.ingest(batch(1000), report_alerts=True)
                assert [a.seq for a in ack.alerts] == list(range(total, total + per_batch))
                assert await take(subscription, per_batch) == ack.alerts
                await assert_quiet(subscription)
            async with client.subscribe(from_seq=0) as subscription:
                assert (await take(subscription, len(acked)))[:len(acked)] == acked
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await trio.to_thread.run_sync(process.wait)
        assert process.returncode == 0, log.read_text()


async def test_a_period_starting_inside_a_minute_gives_the_same_alerts_after_a_restart(
    tmp_path: Path,
) -> None:
    """Africa/Monrovia was UTC-0:44:30 until 1972, so its days started at 00:44:30 UTC,
    inside a minute. Usage for such a period is read from whole-minute buckets, live and
    after a restart alike: the same events give the same alerts either way."""
    day = int(datetime(1971, 6, 15, tzinfo=UTC).timestamp() * 1000)
    now = day + 12 * 3_600_000
    second, minute = 1000, 60_000

    def event(ms: int, uid: str) -> Event:
        return Event(meter_api_name="calls", customer_id="acme", meter_value=1,
                     meter_time_in_millis=ms, unique_id=uid)

    async with open_engine(tmp_path, shards=1, clock_ms=lambda: now,
                           snapshot_on_close=False) as eng:
        await eng.define_meter(Meter(name="calls", aggregation="sum"))
        await eng.add_limit(Limit(id="daily", meter_api_name="calls", thresholds=[2],
                                  period="day", timezone="Africa/Monrovia"))
        await eng.ingest([event(day + 44 * minute + 50 * second, "e1")])
        await eng.ingest([event(day + 46 * minute, "e2")])
        await eng.snapshot()
        live = await eng.ingest([event(day + 44 * minute + 55 * second, "e3")],
                                report_alerts=True)
        live_seq = eng.next_alert_seq()
    async with open_engine(tmp_path, shards=1, clock_ms=lambda: now) as eng:
        assert eng.next_alert_seq() == live_seq
        later = await eng.ingest([event(day + 47 * minute, "e4")], report_alerts=True)
        async with eng.subscribe(0) as subscription:
            stored = await subscription.receive_batch(100) if eng.next_alert_seq() else []
    crossings = [(a.threshold, a.period_start_ms) for a in [*live.alerts, *later.alerts]]
    assert [(a.threshold, a.period_start_ms) for a in stored] == crossings
    assert len(set(crossings)) == len(crossings) == 1, "the threshold fires exactly once"
