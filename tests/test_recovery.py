"""Recovery: reopen, snapshots, WAL truncation, reshard, and kill -9 of a real process."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from engine import DataDirError, Event, Limit, Meter, Query, open_engine
from tests.helpers.events import DAY, NOW
from tests.helpers.internals import store_of
from tests.helpers.serve import child_env

METERS = [
    Meter(name="calls", aggregation="sum"),
    Meter(name="peak", aggregation="max"),
    Meter(name="mean", aggregation="avg"),
    Meter(name="last", aggregation="latest"),
    Meter(name="users", aggregation="unique_count", unique_dimension="user"),
]


def batches(seed: int, count: int) -> list[list[Event]]:
    rng = random.Random(seed)
    out = []
    for b in range(count):
        batch = []
        for i in range(rng.randint(1, 40)):
            meter = rng.choice(METERS)
            batch.append(Event(
                meter_api_name=meter.name,
                customer_id=f"c{rng.randint(0, 30)}",
                meter_value=rng.choice([rng.randint(0, 1000), rng.randint(0, 10**4) / 100]),
                meter_time_in_millis=NOW - rng.randint(0, 3 * DAY),
                dimensions={"region": rng.choice("ab"), "user": f"u{rng.randint(0, 9)}"},
                unique_id=rng.choice([None, f"id-{b}-{i}", f"id-{rng.randint(0, b)}-{i}"]),
            ))
        out.append(batch)
    return out


async def answers(eng: object) -> list[object]:
    rows = []
    for meter in METERS:
        for window in (None, "hour", "day"):
            result = await eng.query(Query(  # type: ignore[attr-defined]
                meter_api_name=meter.name, start_ms=NOW - 4 * DAY, end_ms=NOW + DAY,
                window=window, timezone="Europe/Berlin", group_by=["customer_id", "region"]))
            rows.append(result.rows)
    return rows


async def fill(path: Path, seed: int, *, snapshot_every_bytes: int, shards: int = 4,
               snapshot_at: int | None = None, **options: object) -> tuple:
    """Ingest a seeded workload; returns (answers, canonical logical export, statistics).
    ``snapshot_at``: also ask for a checkpoint after that batch (automatic checkpoints
    merge late events into blocks only every 256 MiB of WAL; a requested one does)."""
    async with open_engine(path, shards=shards, clock_ms=lambda: NOW,
                           snapshot_every_bytes=snapshot_every_bytes,
                           snapshot_on_close=False, **options) as eng:  # type: ignore[arg-type]
        for meter in METERS:
            await eng.define_meter(meter)
        # Limits keep per-period states, which snapshots carry and replay rebuilds.
        for limit_id, meter_name, period in (("month-users", "users", "month"),
                                             ("daily-calls", "calls", "day"),
                                             ("hourly-last", "last", "hour")):
            await eng.add_limit(Limit(id=limit_id, meter_api_name=meter_name,
                                      thresholds=[10**12], period=period,
                                      timezone="Europe/Berlin"))
        for index, batch in enumerate(batches(seed, 60)):
            await eng.ingest(batch)
            if index == snapshot_at:
                await eng.snapshot()
            if index == 20:  # added mid-stream: evaluated from the buckets at once
                await eng.add_limit(Limit(id="mean-total", meter_api_name="mean",
                                          thresholds=[10**12], period="total"))
        return await answers(eng), eng.export_logical(), eng.statistics()


async def test_reopen_answers_as_before_and_keeps_dedup(tmp_path: Path) -> None:
    before, state, _ = await fill(tmp_path, 1, snapshot_every_bytes=1 << 40)
    async with open_engine(tmp_path, shards=4, clock_ms=lambda: NOW) as eng:
        assert await answers(eng) == before
        assert eng.export_logical() == state
        replayed = batches(1, 60)
        ack = await eng.ingest(replayed[0])
        assert ack.accepted == sum(1 for e in replayed[0] if e.unique_id is None)
        assert ack.duplicates == sum(1 for e in replayed[0] if e.unique_id is not None)


async def test_checkpoint_plus_tail_equals_full_replay(tmp_path: Path) -> None:
    """Replay determinism: checkpoints that sealed days, plus the WAL tail, give the same
    canonical logical export as a replay from empty of the whole log (retention 0,
    nothing ever sealed)."""
    full, state, stats_full = await fill(tmp_path / "full", 2, snapshot_every_bytes=1 << 40,
                                         hot_window_ms=None, raw_retention_ms=0)
    snap, snap_state, stats_snap = await fill(tmp_path / "snap", 2, snapshot_every_bytes=4096,
                                              snapshot_at=40)
    assert stats_full.snapshots == 0 and stats_snap.snapshots >= 3
    assert stats_full.block_count == 0 and stats_snap.block_count > 0
    assert snap == full and snap_state == state
    states = []
    for name, hot_window in (("full", None), ("snap", 2 * DAY), ("full", None)):
        async with open_engine(tmp_path / name, shards=4, clock_ms=lambda: NOW,
                               snapshot_on_close=False, hot_window_ms=hot_window) as eng:
            assert await answers(eng) == full
            states.append(eng.export_logical())
    assert states[0] == states[1] == states[2] == state  # replaying twice: identical bytes


async def test_the_wal_is_kept_for_the_raw_retention_then_trimmed(tmp_path: Path) -> None:
    now = [NOW]
    async with open_engine(tmp_path, shards=4, clock_ms=lambda: now[0],
                           raw_retention_ms=DAY) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        for batch in batches(3, 20):
            await eng.ingest(batch)
        lsn = await eng.snapshot()
        assert lsn == 20  # meters live in the catalogue, not the WAL
        store = store_of(eng)
        assert [lsn for lsn, _ in store.read_wal(0)] == list(range(1, 21))  # raw events kept
        assert eng.statistics().wal_bytes_since_snapshot == 0
        now[0] += DAY // 2
        await eng.ingest(batches(4, 1)[0])
        await eng.snapshot()
        assert store.first_lsn() == 1  # not a day yet since the first checkpoint
        now[0] += DAY // 2 + 3_600_000
        await eng.ingest(batches(5, 1)[0])
        await eng.snapshot()
        # Trimmed through the newest checkpoint older than the retention, not past it.
        assert store.first_lsn() == 21


async def test_reopen_with_another_shard_count(tmp_path: Path) -> None:
    before, _, _ = await fill(tmp_path, 4, snapshot_every_bytes=8192)
    for shards in (1, 7):
        async with open_engine(tmp_path, shards=shards, clock_ms=lambda: NOW) as eng:
            assert await answers(eng) == before


async def test_foreign_or_locked_data_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    with pytest.raises(DataDirError, match="not a metering-engine data directory"):
        async with open_engine(tmp_path / "foreign"):
            pass
    async with open_engine(tmp_path / "ours"):
        with pytest.raises(DataDirError, match="in use by another engine process"):
            async with open_engine(tmp_path / "ours"):
                pass


WORKER = """
import sys, trio
from engine import Event, Meter, open_engine
NOW = 1_790_000_000_000

async def main(path, first, last):
    async with open_engine(path, shards=3, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls", aggregation="sum"))
        for b in range(first, last):
            await eng.ingest([Event(meter_api_name="calls", customer_id=f"b{b}", meter_value=1,
                                    meter_time_in_millis=NOW, unique_id=f"{b}-{i}")
                              for i in range(100)])
            print(b, flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
"""


async def per_batch_totals(path: Path) -> dict[str, object]:
    async with open_engine(path, shards=5, clock_ms=lambda: NOW) as eng:
        result = await eng.query(Query(meter_api_name="calls", start_ms=0, end_ms=NOW + DAY,
                                       group_by=["customer_id"]))
    return {row.group["customer_id"]: row.value for row in result.rows}


@pytest.mark.parametrize("kills", [
    3,
    pytest.param(25, marks=pytest.mark.slow, id="soak-25-kills"),
])
async def test_sigkill_loses_nothing_acknowledged(tmp_path: Path, kills: int) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    data = tmp_path / "data"
    env = child_env()
    rng = random.Random(7 + kills)
    total_batches = 400
    for _kill in range(kills):
        acked: set[int] = set()
        wanted = rng.randint(5, 60)
        with subprocess.Popen(
            [sys.executable, str(script), str(data), "0", str(total_batches)],
            stdout=subprocess.PIPE, text=True, env=env,
        ) as process:
            assert process.stdout is not None
            with trio.fail_after(60):
                while len(acked) < wanted:
                    line = await trio.to_thread.run_sync(process.stdout.readline)
                    if not line:
                        break
                    acked.add(int(line))
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert len(acked) == wanted, "the worker stopped before it was killed"
        totals = await per_batch_totals(data)
        for b in acked:
            assert totals.get(f"b{b}") == 100, f"acknowledged batch {b} lost"
        assert all(v == 100 for v in totals.values()), "a batch was applied in part"
    # Retrying everything with the same unique ids reaches exactly the totals sent.
    finished = subprocess.run(
        [sys.executable, str(script), str(data), "0", str(total_batches)],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    assert finished.stdout.count("\n") == total_batches
    totals = await per_batch_totals(data)
    assert len(totals) == total_batches and set(totals.values()) == {100}
