"""The dedup index: unique ids remembered in the store, decided by the WAL writer.

A duplicate is caught in the same batch, the same group commit, a later batch, after a
clean restart and after SIGKILL, also when the retry carries another timestamp. After
the horizon an id is forgotten (expiry in slices, never the entries the WAL tail still
needs): a retry with the same timestamp is then refused as late, one with a changed,
in-window timestamp is counted again. Replay gives the live decisions; stores written
before the index (data formats 1 and 2, fixtures in tests/fixtures/old_stores) open,
get their index in one transaction, and keep their ids.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio

from engine import BatchRejected, DataDirError, Event, Meter, Query, StorageError, open_engine
from engine.runtime.dedup import MAX_KEY_BYTES, id_key
from engine.runtime.idindex import BITS_PER_KEY
from engine.storage import LmdbStore, MemoryStore
from engine.storage.base import ID_VALUE
from tests.helpers.events import DAY, MINUTE, NOW, event, total
from tests.helpers.internals import format_of, recovered_of, store_of, writer_of
from tests.helpers.serve import child_env

OLD_STORES = Path(__file__).parent / "fixtures" / "old_stores"


def ids(prefix: str, count: int, ts: int = NOW, customer: str = "acme") -> list[Event]:
    return [event(unique_id=f"{prefix}{i}", meter_time_in_millis=ts, customer_id=customer)
            for i in range(count)]


# ------------------------------------------------------------ key layout


def test_keys_are_natural_short_and_hashed_when_long_or_ambiguous() -> None:
    assert id_key("calls", "acme", "e1") == b"calls\0acme\0e1"
    assert id_key("calls", "acme", "e1") < id_key("calls", "acme", "e2") < id_key(
        "calls", "acmf", "a")  # one customer's ids sit together
    long_a, long_b = id_key("calls", "c" * 300, "x" * 300), id_key("calls", "c" * 300, "y" * 300)
    assert len(long_a) == len(long_b) == MAX_KEY_BYTES and long_a != long_b
    assert long_a.startswith(b"calls\0" + b"c" * 300) and b"\xff" in long_a
    # A NUL inside a part would make the split ambiguous: such keys are hashed apart.
    assert id_key("m", "a\0b", "c") != id_key("m", "a", "b\0c")
    assert id_key("m", "ü" * 200, "é" * 100) == id_key("m", "ü" * 200, "é" * 100)


@pytest.mark.parametrize("kind", ["memory", "lmdb"])
def test_store_commit_flags_duplicates_atomically(tmp_path: Path, kind: str) -> None:
    store = MemoryStore() if kind == "memory" else LmdbStore(tmp_path)
    try:
        first, second = ID_VALUE.pack(1, 7), ID_VALUE.pack(2, 7)
        flags = store.commit([(1, b"one"), (2, b"two")], [], None,
                             [(b"k1", first), (b"k2", first), (b"k1", first), (b"k2", second)])
        assert flags == [False, False, True, True]
        assert store.read_ids([b"k1", b"k2", b"k3"]) == [1, 1, None]
        assert store.id_index_statistics()[0] == 2
        with pytest.raises(StorageError):  # out of order: nothing of it is written
            store.commit([(1, b"again")], [], None, [(b"k3", second)])
        assert store.read_ids([b"k3"]) == [None]
    finally:
        store.close()


# ------------------------------------------------------------ live decisions


async def test_duplicates_in_a_batch_a_group_and_a_later_batch(tmp_path: Path) -> None:
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls"))
        ack = await eng.ingest([*ids("a", 5), *ids("a", 3), *ids("a", 2, customer="other")])
        assert (ack.accepted, ack.duplicates) == (7, 3)
        # Two batches in one group commit: the one logged first keeps the id.
        commits = eng.statistics().group_commits
        acks = []

        async def send(batch: list[Event]) -> None:
            acks.append(await eng.ingest(batch))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, ids("g", 4))
            nursery.start_soon(send, ids("g", 4))
        assert eng.statistics().group_commits == commits + 1  # really one transaction
        assert sorted((a.accepted, a.duplicates) for a in acks) == [(0, 4), (4, 0)]
        first = min(acks, key=lambda a: a.lsn)
        assert (first.accepted, first.duplicates) == (4, 0)
        # A later batch, even with other timestamps (earlier today, yesterday in UTC).
        ack = await eng.ingest([*ids("a", 5, ts=NOW - MINUTE), *ids("g", 4, ts=NOW - DAY),
                                *ids("new", 1)])
        assert (ack.accepted, ack.duplicates) == (1, 9)
        assert await total(eng) == 7 + 4 + 1
        stats = eng.statistics()
        assert stats.dedup_index_entries == 5 + 2 + 4 + 1
        # No checkpoint yet: every id is in the memtable, none in a run on disk.
        assert (stats.dedup_memtable_ids, stats.dedup_runs) == (12, 0)
        assert (stats.events_accepted, stats.events_duplicate) == (12, 16)


async def test_a_restart_keeps_the_ids_and_replay_decides_alike(tmp_path: Path) -> None:
    """Closed with and without a snapshot: the WAL tail is replayed against the index,
    giving the live accepted/duplicate counts and the same answers and state."""
    sent: list[list[Event]] = [
        [*ids(f"b{b}-", 20), *ids(f"b{max(b - 1, 0)}-", 5), *ids(f"b{b}-", 2)]
        for b in range(8)
    ]
    for snapshot_on_close in (True, False):
        path = tmp_path / str(snapshot_on_close)
        async with open_engine(path, shards=3, clock_ms=lambda: NOW,
                               snapshot_on_close=snapshot_on_close) as eng:
            await eng.define_meter(Meter(name="calls"))
            acks = [await eng.ingest(batch) for batch in sent[:5]]
            await eng.snapshot()  # then a WAL tail of three batches
            acks += [await eng.ingest(batch) for batch in sent[5:]]
            state, answer = eng.export_state(), await total(eng)
        live = (sum(a.accepted for a in acks), sum(a.duplicates for a in acks))
        assert live == (20 * 8, 27 * 8 - 20 * 8)
        async with open_engine(path, shards=2, clock_ms=lambda: NOW) as eng:
            recovered = recovered_of(eng)
            assert eng.export_state() != b"" and await total(eng) == answer
            if not snapshot_on_close:
                tail = acks[-recovered.wal_records:]
                assert recovered.wal_records > 0
                assert (recovered.replayed_accepted, recovered.replayed_duplicates) == (
                    sum(a.accepted for a in tail), sum(a.duplicates for a in tail))
            again = [await eng.ingest(batch) for batch in sent]
            assert sum(a.accepted for a in again) == 0 and await total(eng) == answer
        async with open_engine(path, shards=3, clock_ms=lambda: NOW,
                               snapshot_on_close=False) as eng:
            if snapshot_on_close:
                assert eng.export_state() == state  # same shard count, same bytes


WORKER = """
import sys, trio
from engine import Event, Meter, open_engine
NOW = 1_790_000_000_000

async def main(path):
    async with open_engine(path, shards=3, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls", aggregation="sum"))
        for b in range(1000):
            events = [Event(meter_api_name="calls", customer_id=f"b{b}", meter_value=1,
                            meter_time_in_millis=NOW, unique_id=f"{b}-{i}") for i in range(50)]
            if b:  # a retry of the batch before's first event: a duplicate
                events.append(Event(meter_api_name="calls", customer_id=f"b{b - 1}",
                                    meter_value=1, meter_time_in_millis=NOW - 1,
                                    unique_id=f"{b - 1}-0"))
            ack = await eng.ingest(events)
            print(b, ack.accepted, ack.duplicates, flush=True)

trio.run(main, sys.argv[1])
"""


async def test_sigkill_keeps_every_acknowledged_id(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    data = tmp_path / "data"
    acked: dict[int, tuple[int, int]] = {}
    with subprocess.Popen([sys.executable, str(script), str(data)], stdout=subprocess.PIPE,
                          text=True, env=child_env()) as process:
        assert process.stdout is not None
        with trio.fail_after(60):
            while len(acked) < 30:
                line = await trio.to_thread.run_sync(process.stdout.readline)
                assert line, "the worker stopped before it was killed"
                b, accepted, duplicates = map(int, line.split())
                acked[b] = (accepted, duplicates)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert all(acked[b] == (50, 1 if b else 0) for b in acked)
    async with open_engine(data, shards=2, clock_ms=lambda: NOW) as eng:
        result = await eng.query(Query(meter_api_name="calls", start_ms=0, end_ms=NOW + DAY,
                                       group_by=["customer_id"]))
        totals = {row.group["customer_id"]: row.value for row in result.rows}
        assert all(totals[f"b{b}"] == 50 for b in acked)  # the retries were not replayed in
        assert set(totals.values()) == {50}  # a batch past the last ack: all of it or none
        for b in acked:  # every acknowledged id is still known, also at another timestamp
            ack = await eng.ingest([event(customer_id=f"b{b}", unique_id=f"{b}-{i}",
                                          meter_time_in_millis=NOW - DAY - i)
                                    for i in range(50)])
            assert (ack.accepted, ack.duplicates) == (0, 50)


# ------------------------------------------------------------ horizon and expiry


async def test_after_the_horizon_an_id_is_forgotten_with_its_run(tmp_path: Path) -> None:
    """Ids move from the memtable to a run per arrival day, written in slices; a run
    wholly past the horizon is dropped (its entries deleted in slices)."""
    clock = [NOW]
    with pytest.raises(ValueError, match="at least the late-event limit"):
        async with open_engine(tmp_path, clock_ms=lambda: clock[0],
                               dedup_horizon_ms=30 * DAY):
            pass
    # hot_window_ms=None: no checkpoint when a day leaves the hot window, so this test
    # decides when checkpoints happen.
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: clock[0],
                           dedup_horizon_ms=36 * DAY, hot_window_ms=None) as eng:
        writer = writer_of(eng)
        await eng.define_meter(Meter(name="calls"))
        old = ids("old", 100, ts=NOW - MINUTE)
        assert (await eng.ingest(old)).accepted == 100
        assert eng.statistics().dedup_memtable_ids == 100
        clock[0] = NOW + 10 * DAY
        recent = ids("recent", 10, ts=clock[0])
        # A new arrival day: the old day's memtable is frozen and written as a run.
        assert (await eng.ingest(recent)).accepted == 10
        with trio.fail_after(10):
            while eng.statistics().dedup_runs < 1:
                await trio.sleep(0.01)
        stats = eng.statistics()
        assert (stats.dedup_runs, stats.dedup_memtable_ids, stats.dedup_index_entries) == (
            1, 10, 110)
        assert stats.dedup_filter_bytes >= 100 * BITS_PER_KEY // 8
        # From the run (through its filter), also with another timestamp.
        ack = await eng.ingest([event(unique_id="old7", meter_time_in_millis=NOW)])
        assert (ack.accepted, ack.duplicates) == (0, 1)
        # Past the horizon of the old ids (plus the future tolerance, to the next day),
        # the next checkpoint drops their run.
        clock[0] = NOW + 37 * DAY + 10 * MINUTE
        slices = writer.index_slices
        await eng.snapshot()
        with trio.fail_after(10):
            while eng.statistics().dedup_runs > 1 or writer.index.pending():
                await trio.sleep(0.01)
        assert writer.index_slices > slices
        assert run_numbers(writer) == [1]  # the recent day's run: the old one is deleted
        assert eng.statistics().dedup_index_entries == 10
        # A retry of a forgotten id: with its timestamp it is late; with a new one, counted.
        with pytest.raises(BatchRejected, match="older than the oldest accepted"):
            await eng.ingest(old[:1])
        ack = await eng.ingest([event(unique_id="old0", meter_time_in_millis=clock[0])])
        assert (ack.accepted, ack.duplicates) == (1, 0)
        ack = await eng.ingest(ids("recent", 10, ts=clock[0]))  # within the horizon: kept
        assert (ack.accepted, ack.duplicates) == (0, 10)


def run_numbers(writer: Any) -> list[int]:
    return list(writer._store.run_numbers())


# ------------------------------------------------------------ stores from before the index


@pytest.mark.parametrize("version", [2, 1])
async def test_a_store_from_before_the_index_opens_and_keeps_its_ids(
    tmp_path: Path, version: int,
) -> None:
    """tests/fixtures/old_stores/make_old_stores.py wrote these with the engine before
    the index: a snapshot remembering ids in ``MeterPart.seen``, a WAL tail after it."""
    made = json.loads((OLD_STORES / "old_stores.json").read_text())
    old = made[f"format{version}"]
    path = tmp_path / "store"
    shutil.copytree(OLD_STORES / f"format{version}", path)
    assert format_of(path) == f"metering-engine/{version}".encode()
    batches = [[Event(**e) for e in batch] for batch in made["batches"]]
    distinct = {(e.customer_id, e.unique_id) for b in batches for e in b if e.unique_id}
    async with open_engine(path, shards=3, clock_ms=lambda: NOW) as eng:
        recovered = recovered_of(eng)
        assert recovered.migrated_ids == len(distinct)
        tail = old["acks"][5:]  # batches 5-11 were after the snapshot
        assert (recovered.replayed_accepted, recovered.replayed_duplicates) == (
            sum(a for a, _ in tail), sum(d for _, d in tail))
        result = await eng.query(Query(meter_api_name="calls", start_ms=0, end_ms=NOW + DAY,
                                       group_by=["customer_id"]))
        assert {r.group["customer_id"]: r.value for r in result.rows} == old["totals"]
        assert eng.statistics().dedup_index_entries == len(distinct)
        for batch in batches:  # snapshot ids and tail ids alike: all known
            ack = await eng.ingest(batch)
            assert ack.accepted == sum(1 for e in batch if e.unique_id is None)
    assert format_of(path) == (b"metering-engine/5" if version == 2 else b"metering-engine/1")
    async with open_engine(path, shards=3, clock_ms=lambda: NOW) as eng:
        assert recovered_of(eng).migrated_ids == -1  # built once
        ack = await eng.ingest(batches[7])
        assert (ack.accepted, ack.duplicates) == (3, 17)  # 3 events without an id


async def test_a_migration_that_fails_leaves_the_store_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "store"
    shutil.copytree(OLD_STORES / "format2", path)

    def fail_midway(self: LmdbStore, txn: lmdb.Transaction[bytes],
                    entries: list[tuple[bytes, bytes]]) -> None:
        built(self, txn, entries[:10])
        raise lmdb.Error("power cut")

    built = LmdbStore._build_ids_txn
    with monkeypatch.context() as patch:
        patch.setattr(LmdbStore, "_build_ids_txn", fail_midway)
        with pytest.raises(StorageError):
            async with open_engine(path, shards=3, clock_ms=lambda: NOW):
                pass
    assert format_of(path) == b"metering-engine/2"
    async with open_engine(path, shards=3, clock_ms=lambda: NOW) as eng:
        assert recovered_of(eng).migrated_ids > 10
        assert isinstance(store_of(eng), LmdbStore)
    assert format_of(path) == b"metering-engine/5"


async def test_a_format_3_store_without_its_index_is_damage(tmp_path: Path) -> None:
    async with open_engine(tmp_path, clock_ms=lambda: NOW):
        pass
    env = lmdb.open(str(tmp_path / "lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"ids", txn=txn), delete=True)
    env.close()
    with pytest.raises(DataDirError, match="has no dedup index"):
        async with open_engine(tmp_path, clock_ms=lambda: NOW):
            pass


async def test_a_clean_close_writes_out_the_memtable(tmp_path: Path) -> None:
    """The close's checkpoint freezes the memtable and the writer finishes writing it, so
    the next start rebuilds nothing from before the checkpoint."""
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls"))
        assert (await eng.ingest(ids("a", 50))).accepted == 50
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: NOW) as eng:
        stats = eng.statistics()
        assert (stats.dedup_memtable_ids, stats.dedup_runs, stats.dedup_index_entries) == (
            0, 1, 50)
        assert recovered_of(eng).wal_records == 0
        ack = await eng.ingest(ids("a", 50))
        assert (ack.accepted, ack.duplicates) == (0, 50)
