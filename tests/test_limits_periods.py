"""Limit periods in time zones: daily and hourly limits roll over at local midnight and
across DST changes (under trio's virtual clock, on the in-memory store), late events
count for their own period, and a period that starts inside a minute gives the same
alerts after a restart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import trio

from engine import Event, Limit, Meter, Query, open_engine
from engine.storage.memory import MemoryStore
from tests.helpers.alerts import (
    assert_gap_free,
    key,
    memory_engine,
    take,
)
from tests.helpers.events import DAY, HOUR, MINUTE, ev, local_ms, utc_ms

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


async def test_engine_limit_period_gives_the_period_a_limit_is_evaluated_in() -> None:
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: 0) as eng:
        berlin_day = Limit(id="d", meter_api_name="m", thresholds=[1], period="day",
                           timezone="Europe/Berlin")
        # 2026-03-29 is 23 hours long in Berlin (clocks go forward at 02:00).
        noon = local_ms("Europe/Berlin", 2026, 3, 29, 12)
        assert eng.limit_period(berlin_day, noon) == (
            local_ms("Europe/Berlin", 2026, 3, 29), local_ms("Europe/Berlin", 2026, 3, 30))
        span = eng.limit_period(berlin_day, noon)
        assert span[1] - span[0] == 23 * 3_600_000
        total = Limit(id="t", meter_api_name="m", thresholds=[1], period="total")
        assert eng.limit_period(total, noon)[0] == 0
