"""Alerts, embedded: the alert log survives reopen, snapshots and crash recovery with the
same seqs (also with another shard count), subscriptions resume from any seq, and an
idle subscriber never slows ingest.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from engine import Alert, Engine, Limit, Meter, open_engine
from tests.helpers.alerts import (
    assert_gap_free,
    assert_quiet,
    crossing_batch,
    take,
)
from tests.helpers.events import NOW, ev
from tests.helpers.internals import keep_recent_alerts

# ------------------------------------------------------ durability and resume


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
        keep_recent_alerts(eng, 64)
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
