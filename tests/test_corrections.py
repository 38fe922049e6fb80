"""Corrections on the real store: durability, the audit list, re-admission after a
restart, limits re-arming, refusals, and ingest running concurrently with a cancel."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from engine import Event, InvalidRequest, Limit, Meter, Query, open_engine
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR, MINUTE

START_MS = 1_760_000_000_000 // DAY * DAY + 5 * DAY
METERS = [Meter(name="calls", aggregation="sum"), Meter(name="peak", aggregation="max")]


def event(meter: str, customer: str, value: int, ts: int, uid: str | None = None,
          region: str = "eu") -> Event:
    return Event(meter_api_name=meter, customer_id=customer, meter_value=value,
                 meter_time_in_millis=ts, dimensions={"region": region}, unique_id=uid)


async def total(eng: Any, meter: str, customer: str | None = None) -> Any:
    query = Query(meter_api_name=meter, start_ms=START_MS - 10 * DAY, end_ms=START_MS + DAY,
                  filter={"customer_id": [customer]} if customer else {})
    rows = (await eng.query(query)).rows
    return rows[0].value if rows else None


async def test_cancel_is_durable_and_listed_and_readmits_after_restart(tmp_path: Path) -> None:
    now = [START_MS]
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: now[0],
                           snapshot_on_close=False) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest([event(m.name, "acme", v, START_MS - v * MINUTE, f"e-{v}")
                          for m in METERS for v in (1, 5, 9)])
        assert await eng.cancel("peak", "acme", unique_ids=["e-9", "nope"], by="ops") == 1
        assert await eng.cancel_where("calls", customer_id="acme", start_ms=START_MS - 6 * MINUTE,
                                      end_ms=START_MS, dimensions={"region": ["eu"]},
                                      by="ops") == 2
        assert (await total(eng, "peak"), await total(eng, "calls")) == (5, 9)
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: now[0]) as eng:  # replay
        assert (await total(eng, "peak"), await total(eng, "calls")) == (5, 9)
        listed = await eng.corrections()
        assert [(c.kind, c.meter_api_name, c.by, c.cancelled) for c in listed] == [
            ("cancel", "peak", "ops", 1), ("cancel_where", "calls", "ops", 2)]
        assert await eng.corrections("peak") == listed[:1]
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: now[0]) as eng:  # snapshot
        assert (await total(eng, "peak"), await total(eng, "calls")) == (5, 9)
        # The cancelled ids are accepted once more, then are duplicates again.
        ack = await eng.ingest([event("peak", "acme", 9, START_MS - 9 * MINUTE, "e-9"),
                                event("calls", "acme", 5, START_MS - 5 * MINUTE, "e-5"),
                                event("calls", "acme", 9, START_MS - 9 * MINUTE, "e-9")])
        assert (ack.accepted, ack.duplicates) == (2, 1)
        ack = await eng.ingest([event("peak", "acme", 9, START_MS - 9 * MINUTE, "e-9")])
        assert (ack.accepted, ack.duplicates) == (0, 1)
        assert (await total(eng, "peak"), await total(eng, "calls")) == (9, 14)
        page = await eng.raw_events(START_MS - DAY, START_MS + DAY, meter_api_name="calls")
        assert sorted(e.unique_id or "" for e in page.events) == ["e-5", "e-9"]


async def test_amend_replaces_one_event_atomically_and_bypasses_the_late_limit() -> None:
    now = [START_MS]
    store = MemoryStore()
    async with open_engine(store=store, shards=3, clock_ms=lambda: now[0]) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest([event("peak", "acme", 50, START_MS - 2 * HOUR, "e-1"),
                          event("peak", "acme", 7, START_MS - HOUR, "e-2")])
        now[0] += 40 * DAY  # past the 35-day late limit, within the 60-day retention
        ack = await eng.amend("peak", "acme", "e-1",
                              event("peak", "acme", 3, START_MS - 2 * HOUR), by="me")
        assert ack.accepted == 1
        assert await total(eng, "peak") == 7
        with pytest.raises(InvalidRequest):
            await eng.amend("peak", "acme", "missing", event("peak", "acme", 3, START_MS))
        with pytest.raises(InvalidRequest):
            await eng.amend("peak", "acme", "e-2", event("peak", "globex", 3, START_MS))
        listed = await eng.corrections(customer_id="acme")
        assert [(c.kind, c.by, c.amended is not None) for c in listed] == [("amend", "me", True)]


async def test_a_threshold_re_arms_after_a_correction_and_fires_again_with_a_new_seq() -> None:
    now = [START_MS]
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: now[0]) as eng:
        await eng.define_meter(METERS[0])
        await eng.add_limit(Limit(id="cap", meter_api_name="calls", thresholds=[10],
                                  period="day"))
        ack = await eng.ingest([event("calls", "acme", 12, START_MS + MINUTE, "a")],
                               report_alerts=True)
        assert [a.seq for a in ack.alerts] == [0]
        assert await eng.cancel("calls", "acme", unique_ids=["a"]) == 1
        ack = await eng.ingest([event("calls", "acme", 4, START_MS + 2 * MINUTE, "b")],
                               report_alerts=True)
        assert ack.alerts == []  # 4 < 10: re-armed, not crossed
        ack = await eng.ingest([event("calls", "acme", 8, START_MS + 3 * MINUTE, "c")],
                               report_alerts=True)
        assert [(a.seq, a.value) for a in ack.alerts] == [(1, 12)]


@pytest.mark.parametrize("restart", ["checkpoint", "replay"])
async def test_a_cancel_reaches_sealed_history_and_survives_a_restart(
        tmp_path: Path, restart: str) -> None:
    """A cancel of an event in a sealed day rewrites that day's block (pinned until the
    next checkpoint writes it); a late event into the same minute, logged before the
    cancel, stays counted; one logged after it adds on top."""
    now = [START_MS]
    old = START_MS - 3 * DAY

    def opened() -> Any:
        return open_engine(tmp_path, shards=1, clock_ms=lambda: now[0], hot_window_ms=DAY,
                           snapshot_on_close=restart == "checkpoint")

    async with opened() as eng:
        await eng.define_meter(METERS[1])  # max: a cancel cannot be subtracted
        await eng.ingest([event("peak", "acme", 9, old, "old"),
                          event("peak", "acme", 2, START_MS, "new")])
        await eng.snapshot()
        assert eng.statistics().sealed_before_ms > old
        await eng.ingest([event("peak", "acme", 4, old + 1000, "late")])  # into the delta
        assert await total(eng, "peak") == 9
        assert await eng.cancel("peak", "acme", unique_ids=["old"]) == 1
        assert await total(eng, "peak") == 4
        await eng.ingest([event("peak", "acme", 3, old + 2000, "later")])
        assert await total(eng, "peak") == 4
    async with opened() as eng:
        assert await total(eng, "peak") == 4
        assert await eng.cancel("peak", "acme", unique_ids=["late"]) == 1
        assert await total(eng, "peak") == 3
        minute = Query(meter_api_name="peak", start_ms=old, end_ms=old + MINUTE,
                       window="minute")
        assert [r.value for r in (await eng.query(minute)).rows] == [3]
        await eng.snapshot()  # writes the corrected block
    async with opened() as eng:
        assert await total(eng, "peak") == 3


async def test_ingest_concurrent_with_a_cancel_where_is_neither_lost_nor_doubled() -> None:
    now = [START_MS]
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: now[0]) as eng:
        await eng.define_meter(METERS[0])
        await eng.ingest([event("calls", customer, 1, START_MS - i * 1000, f"{customer}-{i}")
                          for customer in ("acme", "globex") for i in range(3000)])
        cancelled: list[int] = []

        async def cancel() -> None:
            cancelled.append(await eng.cancel_where(
                "calls", customer_id="acme", start_ms=START_MS - DAY, end_ms=START_MS + 1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel)
            for batch in range(20):  # the same minutes, for both customers
                await eng.ingest([event("calls", customer, 10, START_MS - batch * 1000)
                                  for customer in ("acme", "globex")])
                await trio.sleep(0)
        assert 3000 <= cancelled[0] <= 3020
        # What the cancel did not take of acme's concurrent events is still counted (when
        # it took them all, acme has no usage left: no row).
        left = 10 * (20 - (cancelled[0] - 3000))
        assert await total(eng, "calls", "acme") == (left or None)
        assert await total(eng, "calls", "globex") == 3000 + 200


async def test_amberflo_cancel_previous_resource_event_replaces_the_earlier_event() -> None:
    now = [START_MS]
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: now[0]) as eng:
        await eng.define_meter(METERS[1])
        await eng.ingest([event("peak", "acme", 90, START_MS - MINUTE, "r-1"),
                          event("peak", "acme", 20, START_MS - 2 * MINUTE, "r-2")])
        resent = Event(meter_api_name="peak", customer_id="acme", meter_value=5,
                       meter_time_in_millis=START_MS - MINUTE, unique_id="r-1",
                       dimensions={"region": "eu",
                                   "aflo.cancel_previous_resource_event": "true"})
        ack = await eng.ingest([resent])
        assert (ack.accepted, ack.duplicates) == (1, 0)
        assert await total(eng, "peak") == 20
        page = await eng.raw_events(START_MS - DAY, START_MS + DAY)
        assert sorted((e.unique_id, e.meter_value, tuple(e.dimensions)) for e in page.events) == [
            ("r-1", 5, ("region",)), ("r-2", 20, ("region",))]
        assert [c.by for c in await eng.corrections()] == ["aflo.cancel_previous_resource_event"]


async def test_a_correction_past_the_raw_event_retention_is_refused_whole() -> None:
    """Once the log was trimmed past ``raw_retention_ms``, a ``cancel_where`` reaching
    before what it still holds whole is refused, naming the oldest time it can correct
    (a whole minute); at that time it is accepted. Nothing changes when it is refused."""
    now = [START_MS]
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: now[0],
                           hot_window_ms=DAY, raw_retention_ms=DAY) as eng:
        await eng.define_meter(METERS[0])
        await eng.ingest([event("calls", "acme", 1, START_MS - HOUR, "old")])
        await eng.snapshot()
        for _ in range(3):  # the memtable's runs flushed, the marks past the retention
            now[0] += DAY
            await eng.ingest([event("calls", "acme", 10, now[0] - 30 * MINUTE - 7)])
            await eng.snapshot()
        now[0] += HOUR
        await eng.ingest([event("calls", "acme", 100, now[0], "fresh")])
        query = Query(meter_api_name="calls", start_ms=START_MS - DAY, end_ms=now[0] + DAY)
        assert (await eng.query(query)).rows[0].value == 131
        with pytest.raises(InvalidRequest, match="oldest time a correction can reach") as info:
            await eng.cancel_where("calls", customer_id=None, start_ms=START_MS - DAY,
                                   end_ms=now[0] + DAY)
        oldest = int(str(info.value).rsplit("reach is ", 1)[1].split(" ms")[0])
        assert oldest % MINUTE == 0 and START_MS - HOUR < oldest <= now[0]  # a whole minute
        assert (await eng.query(query)).rows[0].value == 131  # refused whole
        assert await eng.cancel("calls", "acme", unique_ids=["old"]) == 0  # trimmed: gone
        assert await eng.cancel_where("calls", customer_id=None, start_ms=oldest,
                                      end_ms=now[0] + DAY) == 1
        assert (await eng.query(query)).rows[0].value == 31


def flagged(value: Any, ts: int, uid: str, customer: str = "acme", meter: str = "peak",
            flag: str = "true") -> Event:
    return Event(meter_api_name=meter, customer_id=customer, meter_value=value,
                 meter_time_in_millis=ts, unique_id=uid,
                 dimensions={"region": "eu", "aflo.cancel_previous_resource_event": flag})


async def test_cancel_previous_is_one_record_per_meter_and_customer_and_survives_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flagged event and the cancel of its predecessor are one WAL record: a crash
    before the rest of the batch is logged leaves every replacement whole (old event
    gone, new one counted, after a replay without a checkpoint), and a retry of the
    batch replaces the same events again and logs the rest, as one ingest would have."""
    from engine.runtime.engine import Engine

    now = [START_MS]

    def opened() -> Any:
        return open_engine(tmp_path, shards=2, clock_ms=lambda: now[0],
                           snapshot_on_close=False)

    batch = [flagged(5, START_MS - MINUTE, "r-1"),  # replaces 90: the max falls to 20
             flagged(Decimal("7.5"), START_MS - 3 * MINUTE, "g-1", customer="globex"),
             flagged(1, START_MS - 4 * MINUTE, "new", flag="false"),  # flag stripped only
             flagged(3, START_MS - 5 * MINUTE, "r-9"),  # nothing to replace: ingested
             event("peak", "acme", 4, START_MS - 6 * MINUTE, "plain")]
    async with opened() as eng:
        await eng.define_meter(METERS[1])
        await eng.ingest([event("peak", "acme", 90, START_MS - MINUTE, "r-1"),
                          event("peak", "acme", 20, START_MS - 2 * MINUTE, "r-2"),
                          event("peak", "globex", 70, START_MS - 3 * MINUTE, "g-1")])

        async def crash(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("crashed before the rest of the batch was logged")

        with monkeypatch.context() as patch:
            patch.setattr(Engine, "_log_batch", crash)
            with pytest.raises(RuntimeError, match="crashed"):
                await eng.ingest(batch)
    async with opened() as eng:  # replayed from the log alone
        assert (await total(eng, "peak", "acme"), await total(eng, "peak", "globex")) == (
            20, Decimal("7.5"))
        page = await eng.raw_events(START_MS - DAY, START_MS + DAY, customer_id="acme")
        assert sorted((e.unique_id, e.meter_value) for e in page.events) == [
            ("r-1", 5), ("r-2", 20)]  # the replacement is in, the rest of the batch is not
        kinds = [(c.kind, c.customer_id, c.cancelled) for c in await eng.corrections()]
        assert kinds == [("cancel_previous", "acme", 1), ("cancel_previous", "globex", 1)]
        ack = await eng.ingest(batch)  # the retry
        assert (ack.accepted, ack.duplicates) == (5, 0)
        assert (await total(eng, "peak", "acme"), await total(eng, "peak", "globex")) == (
            20, Decimal("7.5"))
        page = await eng.raw_events(START_MS - DAY, START_MS + DAY, meter_api_name="peak")
        assert sorted((e.customer_id, e.unique_id, e.meter_value) for e in page.events) == [
            ("acme", "new", 1), ("acme", "plain", 4), ("acme", "r-1", 5), ("acme", "r-2", 20),
            ("acme", "r-9", 3), ("globex", "g-1", Decimal("7.5"))]
        assert all("aflo.cancel_previous_resource_event" not in e.dimensions
                   for e in page.events)
        ack = await eng.ingest([event("peak", "acme", 99, START_MS - MINUTE, "r-1")])
        assert (ack.accepted, ack.duplicates) == (0, 1)  # the replacement keeps its id live


async def test_a_flagged_event_is_found_whatever_the_dimension_memo_holds() -> None:
    """The flag is found where a dimension set misses the memo: a set seen before without
    the flag, a unique_count meter's set, and an event only the slow path checks."""
    now = [START_MS]
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: now[0]) as eng:
        await eng.define_meter(METERS[0])
        await eng.define_meter(Meter(name="users", aggregation="unique_count",
                                     unique_dimension="user"))
        await eng.ingest([event("calls", "acme", 10, START_MS - MINUTE, "a"),
                          Event(meter_api_name="users", customer_id="acme", meter_value=1,
                                meter_time_in_millis=START_MS - MINUTE, unique_id="u",
                                dimensions={"user": "x", "region": "eu"})])
        for _ in range(2):  # the second time round every set has been met before
            ack = await eng.ingest([
                flagged(3, START_MS - MINUTE, "a", meter="calls"),
                Event(meter_api_name="users", customer_id="acme", meter_value=1,
                      meter_time_in_millis=START_MS - MINUTE, unique_id="u",
                      dimensions={"user": "y", "region": "eu",
                                  "aflo.cancel_previous_resource_event": "true"})])
            assert (ack.accepted, ack.duplicates) == (2, 0)
            assert await total(eng, "calls") == 3
            assert await total(eng, "users") == 1
        ack = await eng.ingest([flagged(Decimal("2.5"), START_MS - MINUTE, "a", meter="calls")])
        assert ack.accepted == 1
        assert await total(eng, "calls") == Decimal("2.5")
        ack = await eng.ingest([flagged(10**20, START_MS - MINUTE, "a", meter="calls")])
        assert ack.accepted == 1  # logged as a decimal, replaced once, not ingested again
        assert await total(eng, "calls") == 10**20
        with pytest.raises(InvalidRequest, match="cannot carry"):
            await eng.amend("calls", "acme", "a", flagged(1, START_MS - MINUTE, "a",
                                                          meter="calls"))


async def test_a_sealed_correction_after_opening_with_another_shard_count(
        tmp_path: Path) -> None:
    """Opened with another shard count (the blocks resharded at open, late events of a
    sealed day in the deltas of the checkpoint), a cancel_where of that day takes block
    and delta buckets alike; later events add on top, also after a restart."""
    now = [START_MS]
    old = START_MS - 2 * DAY
    customers = [f"c-{i}" for i in range(6)]
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest([event(m.name, c, 5 + i, old + i * MINUTE, f"{c}-a")
                          for m in METERS for i, c in enumerate(customers)])
        await eng.snapshot()
        await eng.ingest([event(m.name, c, 50, old + i * MINUTE + 1, f"{c}-b")
                          for m in METERS for i, c in enumerate(customers)])  # deltas
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        for customer in customers:
            assert (await total(eng, "calls", customer), await total(eng, "peak", customer)
                    ) in {(55 + i, 50) for i in range(6)}
        for meter in METERS:
            assert await eng.cancel_where(meter.name, customer_id=None, start_ms=old,
                                          end_ms=old + DAY, dimensions={"region": ["eu"]},
                                          received_start_ms=START_MS,
                                          received_end_ms=START_MS + 1) == 12
        # Both batches were received at START_MS: everything went.
        assert await total(eng, "calls") is None and await total(eng, "peak") is None
        await eng.ingest([event(m.name, "c-0", 3, old, "c-0-c") for m in METERS])
        assert (await total(eng, "calls"), await total(eng, "peak")) == (3, 3)
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        assert (await total(eng, "calls"), await total(eng, "peak")) == (3, 3)


async def test_a_threshold_re_arms_after_a_correction_of_a_sealed_day() -> None:
    """A month limit crossed by an event of a sealed day: cancelling it re-arms the
    threshold (the month's usage is read again, sealed blocks included), and usage
    crossing it again fires a new alert."""
    month_start = int(datetime(2025, 11, 1, tzinfo=UTC).timestamp() * 1000)
    now = [month_start + 10 * DAY]
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        await eng.define_meter(METERS[0])
        await eng.add_limit(Limit(id="cap", meter_api_name="calls", thresholds=[10],
                                  period="month"))
        ack = await eng.ingest([event("calls", "acme", 12, month_start + DAY, "a")],
                               report_alerts=True)
        assert [a.seq for a in ack.alerts] == [0]
        await eng.snapshot()
        assert eng.statistics().sealed_before_ms > month_start + DAY
        assert await eng.cancel("calls", "acme", unique_ids=["a"]) == 1
        ack = await eng.ingest([event("calls", "acme", 4, now[0], "b")], report_alerts=True)
        assert ack.alerts == []  # 4 < 10: re-armed, not crossed
        ack = await eng.ingest([event("calls", "acme", 8, month_start + 2 * DAY, "c")],
                               report_alerts=True)  # into a sealed day: the delta
        assert [(a.seq, a.value) for a in ack.alerts] == [(1, 12)]
