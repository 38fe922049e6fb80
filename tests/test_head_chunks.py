"""The head's checkpoint in hour chunks (engine.domain.head): a checkpoint writes only the
hours that changed, and every restore rebuilds the same head: after a restart, with
another shard count, after a checkpoint that failed, and from a format-3 store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio.testing

from engine import Event, Meter, Query, open_engine
from engine.errors import StorageFull
from engine.runtime import writer as wal_writer
from engine.runtime.blocks import BlockCache
from engine.storage.lmdb_store import LmdbStore
from tests.helpers.internals import format_of

DAY = 86_400_000
HOUR = 3_600_000
START = 1_790_000_000_000 // DAY * DAY
FORMAT3 = Path(__file__).parent / "fixtures" / "format3"
METERS = [Meter(name="calls"), Meter(name="users", aggregation="unique_count",
                                     unique_dimension="user")]


def events(hours: list[int], tag: str) -> list[Event]:
    out = []
    for hour in hours:
        for i in range(6):
            t = START + hour * HOUR + i * 600_000
            out.append(Event(meter_api_name="calls", customer_id=f"c{i % 3}",
                             meter_value=i + hour, meter_time_in_millis=t,
                             unique_id=f"{tag}-{hour}-{i}"))
            out.append(Event(meter_api_name="users", customer_id=f"c{i % 3}", meter_value=1,
                             meter_time_in_millis=t, dimensions={"user": f"u{(hour + i) % 5}"}))
    return out


async def answers(eng: Any, start: int = START, days: int = 6) -> dict[str, list[list[Any]]]:
    out = {}
    for meter in METERS:
        for window in ("hour", "day"):
            result = await eng.query(Query(meter_api_name=meter.name, start_ms=start,
                                           end_ms=start + days * DAY, window=window,
                                           group_by=["customer_id"]))
            out[f"{meter.name}/{window}"] = sorted(
                [r.window_start_ms, r.group["customer_id"], str(r.value)] for r in result.rows)
    return out


class Writes:
    """What each ``write_snapshot`` call put and dropped of the head's chunks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_next: int = 0) -> None:
        self.calls: list[tuple[int, int, bool]] = []  # (chunks put, chunks dropped, reset)
        self.blocks: list[int] = []  # blocks written, per call
        self.fail_next = fail_next
        original = LmdbStore.write_snapshot

        def spy(store: LmdbStore, snapshot: Any, *args: Any, **kwargs: Any) -> None:
            drop_head = kwargs.get("drop_head", args[3] if len(args) > 3 else ())
            reset = kwargs.get("reset_head", args[4] if len(args) > 4 else False)
            if self.fail_next:
                self.fail_next -= 1
                raise StorageFull("storage full: refused on purpose by the test")
            original(store, snapshot, *args, **kwargs)
            self.calls.append((len(snapshot.head), len(drop_head), reset))
            self.blocks.append(len(args[0]) if args else len(kwargs["blocks"]))

        monkeypatch.setattr(LmdbStore, "write_snapshot", spy)


def open_at(path: Path, now: list[int], shards: int = 2) -> Any:
    return open_engine(path, shards=shards, clock_ms=lambda: now[0], snapshot_on_close=False)


async def test_a_checkpoint_writes_only_the_hours_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes = Writes(monkeypatch)
    now = [START + 22 * HOUR]
    async with open_at(tmp_path, now) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest(events(list(range(0, 20, 2)), "a"))  # 10 hours, 2 meters
        await eng.snapshot()
        first = writes.calls[-1]
        stats = eng.statistics()
        assert stats.checkpoint_head_chunks == first[0] > 0
        per_hour = first[0] // 10  # (shard, meter) chunks of an hour: the same every hour
        await eng.ingest(events([4], "b"))  # one hour again (customers c0-c2, both meters)
        await eng.snapshot()
        assert writes.calls[-1] == (per_hour, 0, False)
        assert eng.statistics().checkpoint_bytes < stats.checkpoint_bytes
        await eng.snapshot()  # nothing changed: no chunk
        assert writes.calls[-1] == (0, 0, False)
        await eng.ingest(events([21], "c"))  # a new hour
        before = await answers(eng)
    # Closed without a checkpoint: the restart reads the chunks, then replays hour 21.
    async with open_at(tmp_path, now) as eng:
        assert await answers(eng) == before
        assert eng.statistics().recovered_wal_records == 1
        await eng.snapshot()
        assert writes.calls[-1][1:] == (0, False)
    async with open_at(tmp_path, now) as eng:
        assert await answers(eng) == before


async def test_sealing_drops_the_chunks_of_the_days_it_sealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes = Writes(monkeypatch)
    now = [START + 23 * HOUR]
    async with open_at(tmp_path, now) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest(events([1, 5, 22], "a"))  # day 0
        await eng.snapshot()
        put_day0 = writes.calls[-1][0]
        now[0] = START + 2 * DAY + 2 * HOUR  # day 0 leaves the 48 h hot window
        calls = len(writes.calls)
        blocks = eng.statistics().block_count
        # A day left: the shards seal it one at a time after group commits, no checkpoint
        # with them; its blocks wait, pinned, for the next checkpoint.
        await eng.ingest(events([2 * 24 + 1], "b"))
        with trio.fail_after(10):
            while eng.statistics().block_count == blocks:
                await eng.ingest([])
                await trio.sleep(0.01)
        assert len(writes.calls) == calls
        await eng.snapshot()  # writes the blocks and drops the sealed day's chunks
        assert len(writes.calls) == calls + 1
        assert writes.calls[-1][1:] == (put_day0, False)
        assert eng.statistics().sealed_before_ms == START + DAY
        await eng.ingest(events([3], "late"))  # a late event for the sealed day: a delta
        before = await answers(eng)
    async with open_at(tmp_path, now) as eng:
        assert await answers(eng) == before


async def test_another_shard_count_rewrites_every_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes = Writes(monkeypatch)
    now = [START + 2 * DAY + 2 * HOUR]  # day 0 is sealed: blocks are resharded too
    async with open_at(tmp_path, now, shards=2) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest(events([1, 7, 26, 29, 49], "a"))
        await eng.snapshot()
        assert eng.statistics().block_count > 0
        before = await answers(eng)
    previous = 2
    for shards in (3, 3, 1, 2):
        async with open_at(tmp_path, now, shards=shards) as eng:
            assert await answers(eng) == before
            await eng.snapshot()
            put, _, reset = writes.calls[-1]
            # Another shard count rewrites every chunk; the same one again, none.
            assert reset == (shards != previous)
            assert (put > 0) == reset
        previous = shards


async def test_after_a_failed_checkpoint_the_next_writes_every_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes = Writes(monkeypatch)
    now = [START + 30 * HOUR]
    async with open_at(tmp_path, now) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest(events([1, 7, 26], "a"))
        await eng.snapshot()
        per_hour = writes.calls[-1][0] // 3  # the same customers every hour
        await eng.ingest(events([27], "b"))
        writes.fail_next = 1
        with pytest.raises(StorageFull):
            await eng.snapshot()  # hour 27 was taken off the dirty lists, then not written
        await eng.ingest(events([29], "c"))
        await eng.snapshot()
        put, _, reset = writes.calls[-1]
        assert reset and put == 5 * per_hour  # every chunk: hours 1, 7, 26, 27 and 29
        before = await answers(eng)
    async with open_at(tmp_path, now) as eng:
        assert eng.statistics().recovered_wal_records == 0
        assert await answers(eng) == before


async def test_a_format_3_store_opens_and_moves_its_head_into_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tests/fixtures/format3: written by the engine before hour chunks (main at e5cf9bd):
    sealed days, a delta, a two-day head in the checkpoint's parts and a WAL tail."""
    expected = json.loads((FORMAT3 / "format3.json").read_text())
    path = tmp_path / "store"
    shutil.copytree(FORMAT3 / "store", path)
    assert format_of(path) == b"metering-engine/3"
    writes = Writes(monkeypatch)
    now = [expected["now_ms"]]
    fixture_start = expected["answers"]["calls"][0][0]

    async def old_answers(eng: Any) -> dict[str, list[list[Any]]]:
        out = {}
        for meter in METERS:
            result = await eng.query(Query(meter_api_name=meter.name, start_ms=fixture_start,
                                           end_ms=fixture_start + 6 * DAY, window="day",
                                           group_by=["customer_id"]))
            out[meter.name] = sorted([r.window_start_ms, r.group["customer_id"], str(r.value)]
                                     for r in result.rows)
        return out

    async with open_at(path, now) as eng:
        assert eng.statistics().recovered_wal_records == 1
        assert await old_answers(eng) == expected["answers"]
        await eng.snapshot()
        put, _, reset = writes.calls[-1]
        assert reset and put > 0
    assert format_of(path) == b"metering-engine/5"
    async with open_at(path, now) as eng:
        assert eng.statistics().recovered_wal_records == 0
        assert await old_answers(eng) == expected["answers"]


async def test_large_checkpoints_are_taken_less_often() -> None:
    """A limit's states are written whole by each checkpoint (unique_count limits' aside:
    their chunks hold what changed): a total limit over many customers is a large part.
    The next checkpoint is due only after twice its bytes of WAL (and at least
    ``snapshot_every_bytes``), so checkpoints never rewrite more than half the WAL."""
    from engine import Limit
    from engine.storage import MemoryStore

    now = [START + HOUR]
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: now[0],
                           snapshot_every_bytes=1) as eng:
        await eng.define_meter(METERS[0])
        await eng.add_limit(Limit(id="all-calls", meter_api_name="calls", period="total",
                                  thresholds=[10**9]))
        batch = 0

        async def ingest(customers: int) -> None:
            nonlocal batch
            batch += 1
            await eng.ingest([Event(meter_api_name="calls",
                                    customer_id=f"customer-{i}-" + "x" * 40, meter_value=1,
                                    meter_time_in_millis=START + i, unique_id=f"{batch}-{i}")
                              for i in range(customers)])

        await ingest(2000)
        await eng.snapshot()  # a large state: 2000 customers' totals
        stats = eng.statistics()
        state_bytes = stats.checkpoint_bytes
        assert state_bytes > 2000 * 40
        snapshots = stats.snapshots
        while eng.statistics().snapshots == snapshots:
            before = eng.statistics().wal_bytes_since_snapshot
            await ingest(20)
            await trio.testing.wait_all_tasks_blocked()  # the writer's checkpoint, if due
        # Due once the WAL since it passed twice the state's bytes of the last one.
        assert before < 2 * state_bytes <= before + 20 * 200


async def test_a_unique_count_limit_state_is_not_written_again_by_each_checkpoint() -> None:
    """A total unique_count limit's state is every distinct value; a checkpoint writes the
    values added since the last one (engine.domain.limits), not the whole state."""
    from engine import Limit
    from engine.storage import MemoryStore

    now = [START + 2 * HOUR]
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: now[0]) as eng:
        await eng.define_meter(METERS[1])
        await eng.add_limit(Limit(id="all-users", meter_api_name="users", period="total",
                                  thresholds=[10**9]))

        async def ingest(tag: str, users: int, hour: int) -> None:
            await eng.ingest([Event(meter_api_name="users", customer_id="c", meter_value=1,
                                    meter_time_in_millis=START + hour * HOUR + i,
                                    unique_id=f"{tag}-{i}",
                                    dimensions={"user": f"user-{tag}-{i}-" + "x" * 40})
                              for i in range(users)])

        await ingest("a", 2000, 0)
        await eng.snapshot()
        large = eng.statistics().checkpoint_bytes
        assert large > 2000 * 40
        await ingest("b", 20, 1)  # another hour: its head chunk only, and 20 new values
        await eng.snapshot()
        small = eng.statistics().checkpoint_bytes
        assert small < 20 * 200 < large


async def test_shards_seal_a_day_one_at_a_time_between_group_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sealing is most of a checkpoint's work, so checkpoints leave it out: after a day
    leaves the hot window, each group commit has one more shard seal it in its own turn,
    and the next checkpoint writes the blocks sealed so far. Queries stay exact in
    between, and across a restart with some shards' blocks written, one shard's sealed in
    memory only (lost with the process, sealed again) and the others not sealed."""
    now = [START + 20 * HOUR]
    customers = [f"c{i}" for i in range(40)]

    def day_events(hour: int, tag: str) -> list[Event]:
        return [Event(meter_api_name="calls", customer_id=c, meter_value=i + 1,
                      meter_time_in_millis=START + hour * HOUR + i, unique_id=f"{tag}-{i}")
                for i, c in enumerate(customers)]

    async def totals(eng: Any) -> list[list[Any]]:
        result = await eng.query(Query(meter_api_name="calls", start_ms=START,
                                       end_ms=START + 4 * DAY, window="day",
                                       group_by=["customer_id"]))
        return sorted([r.window_start_ms, r.group["customer_id"], str(r.value)]
                      for r in result.rows)

    async with open_at(tmp_path, now, shards=8) as eng:
        await eng.define_meter(METERS[0])
        await eng.ingest(day_events(3, "a"))
        await eng.snapshot()
        expected = await totals(eng)
    writes = Writes(monkeypatch)
    # Group commits large enough that each is followed by a checkpoint, then by one
    # shard's sealing.
    async with open_engine(tmp_path, shards=8, clock_ms=lambda: now[0],
                           snapshot_on_close=False, snapshot_every_bytes=1) as eng:
        now[0] = START + 2 * DAY + HOUR  # day 0 left the hot window
        blocks = []
        for step in range(3):
            await eng.ingest(day_events(49, f"b{step}"))
            await trio.testing.wait_all_tasks_blocked()
            # The shard's block is built; its encoding runs on a worker thread. Done
            # before the next group commit, the checkpoint after it writes the block
            # (a checkpoint waits for it a little, then encodes it itself).
            with trio.fail_after(10):
                while eng.statistics().blocks_unencoded:
                    await trio.sleep(0.001)
            blocks.append(eng.statistics().block_count)
            day2 = [[START + 2 * DAY, c, str((i + 1) * (step + 1))]
                    for i, c in enumerate(customers)]
            assert await totals(eng) == sorted([*expected, *day2])
        assert blocks == [1, 2, 3]  # one shard each (every shard has customers of day 0)
        # Each checkpoint wrote the blocks sealed before it: shard 0's, then shard 1's.
        assert writes.blocks == [0, 1, 1]
        assert eng.statistics().sealed_before_ms < START + DAY  # not yet on every shard
        before = await totals(eng)
    async with open_at(tmp_path, now, shards=8) as eng:  # some shards sealed, some not
        assert await totals(eng) == before
        await eng.ingest(day_events(5, "late"))  # late, into day 0 on every shard
        await eng.snapshot()
        assert eng.statistics().sealed_before_ms == START + DAY
        after = await totals(eng)
    day0 = {row[1]: row for row in before if row[0] == START}
    for row in after:
        if row[0] == START:
            index = customers.index(row[1])
            assert row[2] == str(int(day0[row[1]][2]) + index + 1)


async def test_a_requested_checkpoint_lets_ingest_go_on_while_the_shards_seal(
    tmp_path: Path,
) -> None:
    """``snapshot()`` seals and compacts every shard first, one shard at a time between
    group commits: a batch sent while it waits is committed (and covered by the
    checkpoint that answers it), not held until the sealing is done."""
    now = [START + 20 * HOUR]
    customers = [f"c{i}" for i in range(40)]
    async with open_at(tmp_path, now, shards=8) as eng:
        await eng.define_meter(METERS[0])
        await eng.ingest([Event(meter_api_name="calls", customer_id=c, meter_value=1,
                                meter_time_in_millis=START + HOUR + i)
                          for i, c in enumerate(customers)])
        now[0] = START + 2 * DAY + HOUR  # day 0 left the hot window: 8 shards to seal
        answered: list[int] = []

        async def snapshot() -> None:
            answered.append(await eng.snapshot())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(snapshot)
            await trio.testing.wait_all_tasks_blocked()  # the first shard sealed
            assert not answered and eng.statistics().block_count < 8
            ack = await eng.ingest([Event(meter_api_name="calls", customer_id="c0",
                                          meter_value=5, meter_time_in_millis=now[0])])
        assert answered and ack.lsn <= answered[0]  # committed before the checkpoint
        assert eng.statistics().block_count == 8
        assert eng.statistics().sealed_before_ms == START + DAY


async def test_a_checkpoint_encodes_blocks_itself_when_the_encoder_lags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sealed blocks are encoded on a worker thread; a due checkpoint waits for that only
    a while (``ENCODE_WAIT_S``), and so does the next shard's sealing. With an encoder
    that never gets to them, sealing, checkpoints and ``snapshot()`` still go on,
    encoding the blocks themselves, and a restart answers the same."""

    async def stalled_encoder(cache: BlockCache) -> None:
        cache._encoder_wake = trio.Event()  # "running", and never encodes anything
        await trio.sleep_forever()

    monkeypatch.setattr(BlockCache, "encode_in_background", stalled_encoder)
    monkeypatch.setattr(wal_writer, "ENCODE_WAIT_S", 0.2)
    now = [START + 20 * HOUR]
    async with open_at(tmp_path, now) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest(events(list(range(20)), "a"))
        now[0] = START + 2 * DAY + 2 * HOUR  # day 0 left the hot window
        await eng.ingest(events([49], "b"))
        await trio.testing.wait_all_tasks_blocked()
        await eng.ingest(events([49], "c"))  # (each shard seals after a group commit)
        await trio.testing.wait_all_tasks_blocked()
        assert eng.statistics().blocks_unencoded > 0
        await eng.snapshot()
        stats = eng.statistics()
        assert stats.blocks_unwritten == stats.blocks_unencoded == 0
        assert stats.sealed_before_ms == START + DAY and stats.block_count >= 2
        expected = await answers(eng)
    async with open_at(tmp_path, now) as eng:
        assert await answers(eng) == expected
