"""Storage faults: a full LMDB map, a full disk, and store failures that are not about space.

The contract under test: a batch is either durable and applied, or refused with a
typed error and not applied at all (no counts, no dedup ids, no meter definition,
no alert); running out of space refuses requests but the engine stays up, keeps
answering reads and accepts writes again once there is room; any other store
failure stops the engine (fail-stop) and a restart recovers everything acknowledged.

The disk-full tests mount a small tmpfs (root only; skipped with the reason
otherwise). The same refusal path is covered without root by a map capped with
``max_map_bytes`` and by making the store's transaction raise exactly what LMDB
raised on the tmpfs.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio

import engine.runtime.writer as wal_writer
from engine import (
    Engine,
    EngineClosed,
    Event,
    Limit,
    Meter,
    StorageError,
    StorageFull,
    open_engine,
)
from engine.client import open_client
from engine.storage import lmdb_store
from engine.storage.lmdb_store import LmdbStore
from tests.helpers.events import NOW, total
from tests.helpers.internals import map_size_of, store_of

CALLS = Meter(name="calls", aggregation="sum")
PADDING = {"pad": "p" * 250, "pad2": "q" * 250}  # about 550 bytes per event in the WAL


def batch(tag: str, size: int = 100, customer: str | None = None) -> list[Event]:
    """``size`` events, each a new series (distinct customer), with unique ids."""
    return [Event(meter_api_name="calls", customer_id=customer or f"{tag}-{i}", meter_value=i,
                  meter_time_in_millis=NOW - i, dimensions=PADDING,
                  unique_id=f"{tag}/{i}")
            for i in range(size)]


def batch_total(events: list[Event]) -> int:
    return sum(int(e.meter_value) for e in events)  # type: ignore[arg-type]


async def ingest_until_full(eng: Engine, tag: str, limit_batches: int = 5000
                            ) -> tuple[int, list[Event], StorageFull]:
    """Ingest batches until one is refused; the acknowledged total, the refused batch
    and its error."""
    acked = 0
    for number in range(limit_batches):
        events = batch(f"{tag}{number}")
        try:
            ack = await eng.ingest(events)
        except StorageFull as exc:
            return acked, events, exc
        assert ack.accepted == len(events)
        acked += batch_total(events)
    raise AssertionError(f"storage never filled up after {limit_batches} batches")


# ---------------------------------------------------------------- the LMDB map


async def test_map_grows_from_a_small_initial_map_and_loses_nothing(tmp_path: Path) -> None:
    initial = 64 << 10
    sizes = []
    acked = 0
    async with open_engine(tmp_path, shards=4, clock_ms=lambda: NOW, map_bytes=initial,
                           snapshot_every_bytes=2 << 20, snapshot_on_close=False) as eng:
        assert isinstance(store_of(eng), LmdbStore)
        sizes.append(map_size_of(eng))
        await eng.define_meter(CALLS)
        for number in range(120):
            events = batch(f"b{number}")
            ack = await eng.ingest(events)
            assert ack.accepted == len(events)
            acked += batch_total(events)
            size = map_size_of(eng)
            if size != sizes[-1]:
                sizes.append(size)
        assert await total(eng) == acked
        state = eng.export_state()
        stats = eng.statistics()
    data_bytes = os.path.getsize(tmp_path / "lmdb" / "data.mdb")
    assert sizes[0] == initial
    # By doubling: every size seen is the initial one times a power of two (a checkpoint
    # and a group commit may both grow the map between two looks).
    assert all(before < after and after % before == 0 and (after // before).bit_count() == 1
               for before, after in itertools.pairwise(sizes))
    assert len(sizes) >= 7 and sizes[-1] >= data_bytes > 4 * initial  # grew, by doubling
    assert stats.snapshots >= 1  # snapshots were written while the map grew too
    print("map sizes (KiB):", [size >> 10 for size in sizes], "data.mdb:", data_bytes >> 10)
    async with open_engine(tmp_path, shards=4, clock_ms=lambda: NOW, map_bytes=initial) as eng:
        assert await total(eng) == acked
        assert eng.export_state() == state


async def test_a_capped_map_refuses_batches_but_keeps_serving(tmp_path: Path) -> None:
    """Without root: the map may not grow past ``max_map_bytes``, so it fills like a disk."""
    async with open_engine(tmp_path, shards=4, clock_ms=lambda: NOW, map_bytes=256 << 10,
                           max_map_bytes=1 << 20) as eng:
        await eng.define_meter(CALLS)
        await eng.add_limit(Limit(id="cap", meter_api_name="calls", thresholds=[1],
                                  customer_id="watched", period="total"))
        acked, refused, error = await ingest_until_full(eng, "a")
        assert error.code == "storage_full"
        assert "may not grow past max_map_bytes (1.0 MiB)" in str(error)
        assert "nothing in it was applied" in str(error)
        state, lsn = eng.export_state(), eng.statistics().last_lsn
        # A batch as large that would cross the limit: refused as well, no alert.
        crossing = batch("w", customer="watched")
        for attempt in (refused, crossing):
            with pytest.raises(StorageFull):
                await eng.ingest(attempt)
        assert eng.export_state() == state and eng.statistics().last_lsn == lsn
        assert eng.next_alert_seq() == 0
        assert await total(eng) == acked
        assert [limit.id for limit in await eng.list_limits()] == ["cap"]
    # Room again (a larger cap): the refused batches count in full, nothing of them
    # was remembered as seen, and the crossing alerts now.
    async with open_engine(tmp_path, shards=4, clock_ms=lambda: NOW,
                           max_map_bytes=64 << 20) as eng:
        assert await total(eng) == acked
        ack = await eng.ingest(refused)
        assert (ack.accepted, ack.duplicates) == (len(refused), 0)
        ack = await eng.ingest(crossing, report_alerts=True)
        assert (ack.accepted, ack.duplicates) == (len(crossing), 0)
        assert [(a.seq, a.customer_id) for a in ack.alerts] == [(0, "watched")]
        assert await total(eng) == acked + batch_total(refused) + batch_total(crossing)


async def test_max_map_bytes_alone_caps_the_initial_map_too(tmp_path: Path) -> None:
    async with open_engine(tmp_path / "a", clock_ms=lambda: NOW, max_map_bytes=2 << 20) as eng:
        assert isinstance(store_of(eng), LmdbStore)
        assert map_size_of(eng) == 2 << 20
    with pytest.raises(ValueError, match="map_bytes <= max_map_bytes"):
        async with open_engine(tmp_path / "b", map_bytes=4 << 20, max_map_bytes=2 << 20):
            pass


# ------------------------------------------- what LMDB raises, without root


@contextmanager
def failing_commits(monkeypatch: pytest.MonkeyPatch, error: lmdb.Error,
                    which: str = "_commit_txn") -> Iterator[dict[str, Any]]:
    """Make the store's write transactions raise ``error`` while ``control["on"]``."""
    control: dict[str, Any] = {"on": True, "calls": 0}
    real = getattr(LmdbStore, which)

    def body(self: LmdbStore, txn: Any, *args: Any) -> None:
        control["calls"] += 1
        real(self, txn, *args)  # the transaction has written; now it fails like a commit
        if control["on"]:
            raise error

    monkeypatch.setattr(LmdbStore, which, body)
    yield control


def free_space(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> None:
    real = os.statvfs

    class Stats:
        def __init__(self, path: Any) -> None:
            stats = real(path)
            self.f_frsize = stats.f_frsize
            self.f_bavail = free_bytes // stats.f_frsize

    monkeypatch.setattr(lmdb_store.os, "statvfs", Stats)


ENOSPC_ERROR = lmdb.DiskError("mdb_txn_commit: No space left on device")
SHORT_WRITE_ERROR = lmdb.Error("mdb_txn_commit: Input/output error")


@pytest.mark.parametrize("error", [ENOSPC_ERROR, SHORT_WRITE_ERROR], ids=["ENOSPC", "EIO"])
async def test_out_of_space_refuses_until_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: lmdb.Error,
) -> None:
    free_space(monkeypatch, 4096)
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(CALLS)
        await eng.add_limit(Limit(id="cap", meter_api_name="calls", thresholds=[1],
                                  customer_id="watched", period="total"))
        kept = batch("kept")
        await eng.ingest(kept)
        state = eng.export_state()
        refused = batch("kept")[:50] + batch("new")  # half seen before, half new
        crossing = batch("w", size=3, customer="watched")
        with failing_commits(monkeypatch, error) as control:
            for attempt in (refused, crossing, refused):
                with pytest.raises(StorageFull, match="no space left on the filesystem"):
                    await eng.ingest(attempt)
            with pytest.raises(StorageFull, match="nothing in it was applied"):
                await eng.define_meter(Meter(name="later", aggregation="max"))
            assert eng.export_state() == state and eng.statistics().last_lsn == 2
            assert eng.next_alert_seq() == 0 and [m.name for m in eng.meters()] == ["calls"]
            assert await total(eng) == batch_total(kept)
            assert [limit.id for limit in await eng.list_limits()] == ["cap"]
            control["on"] = False  # space freed
            ack = await eng.ingest(refused)
            assert (ack.accepted, ack.duplicates) == (100, 50)
            ack = await eng.ingest(crossing, report_alerts=True)
            assert [(a.seq, a.customer_id) for a in ack.alerts] == [(0, "watched")]
            assert await eng.define_meter(Meter(name="later", aggregation="max"))
        expected = batch_total(kept) + batch_total(batch("new")) + batch_total(crossing)
        assert await total(eng) == expected
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW) as eng:
        assert await total(eng) == expected
        assert [m.name for m in eng.meters()] == ["calls", "later"]


async def test_storage_full_over_tcp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serving: Any,
) -> None:
    """The client gets the typed error; the connection and the server stay up."""
    free_space(monkeypatch, 0)
    async with open_engine(tmp_path, shards=2, clock_ms=lambda: NOW) as eng, \
            serving(eng) as server, open_client("127.0.0.1", server.port) as client:
        await client.define_meter(CALLS)
        await client.ingest(batch("kept"))
        with failing_commits(monkeypatch, SHORT_WRITE_ERROR) as control:
            with pytest.raises(StorageFull) as caught:
                await client.ingest(batch("refused"))
            assert caught.value.code == "storage_full"
            assert "nothing in it was applied" in str(caught.value)
            assert await total(client) == batch_total(batch("kept"))
            control["on"] = False
            ack = await client.ingest(batch("refused"))
        assert (ack.accepted, ack.duplicates) == (100, 0)
        async with open_client("127.0.0.1", server.port) as other:
            assert await total(other) == 2 * batch_total(batch("kept"))


async def test_eio_with_room_on_the_disk_stops_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real I/O error is not "full": fail-stop, and a restart has every ack."""
    free_space(monkeypatch, 10 << 30)
    caught: list[BaseException] = []
    with trio.fail_after(10):
        try:
            async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW) as eng:
                await eng.define_meter(CALLS)
                await eng.ingest(batch("kept"))
                with failing_commits(monkeypatch, SHORT_WRITE_ERROR):
                    try:
                        await eng.ingest(batch("lost"))
                    except StorageError as exc:
                        caught.append(exc)
                    with pytest.raises(EngineClosed, match="storage failure"):
                        await eng.ingest(batch("after"))
                    await trio.sleep_forever()  # the engine's failure ends this block
        except StorageError as exc:
            caught.append(exc)
    assert len(caught) == 2
    assert not isinstance(caught[0], StorageFull) and caught[0].code == "storage"
    assert "storage failure, the engine stopped (fail-stop)" in str(caught[0])
    assert "Input/output error" in str(caught[0]) and "was not applied" in str(caught[0])
    assert "fail-stop" in str(caught[1])
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW) as eng:
        assert await total(eng) == batch_total(batch("kept"))


async def test_a_snapshot_without_space_keeps_the_wal_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(wal_writer, "SNAPSHOT_RETRY_MIN_S", 0.2)
    acked = 0
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW,
                           snapshot_every_bytes=20_000, snapshot_on_close=False) as eng:
        await eng.define_meter(CALLS)
        with failing_commits(monkeypatch, ENOSPC_ERROR, "_snapshot_txn") as control:
            started = trio.current_time()
            for number in range(40):
                events = batch(f"s{number}", size=20)
                await eng.ingest(events)  # commits have room; only snapshots fail
                acked += batch_total(events)
            elapsed = trio.current_time() - started
            with pytest.raises(StorageFull):
                await eng.snapshot()  # an explicit request fails with the reason
            stats = eng.statistics()
            assert stats.snapshots == 0 and stats.last_lsn == 40
            assert [lsn for lsn, _ in store_of(eng).read_wal(0)] == list(range(1, 41))
            # Retried with a growing wait, not after every one of the 40 commits.
            assert 1 <= control["calls"] <= 2 + elapsed / 0.2, (
                f"{control['calls']} snapshot attempts in {elapsed:.2f} s")
            assert "snapshot at lsn" in caplog.text and "retrying in" in caplog.text
            control["on"] = False  # space freed
            with trio.fail_after(10):
                while eng.statistics().snapshots == 0:  # the next commit after the wait
                    await trio.sleep(0.1)
                    events = batch(f"t{trio.current_time()}", size=20)
                    await eng.ingest(events)
                    acked += batch_total(events)
        stats = eng.statistics()
        # The WAL is also the raw-event log: the snapshot kept it whole (retention), and
        # at most the record committed after it is still to be covered by a snapshot.
        wal = list(store_of(eng).read_wal(0))
        assert stats.snapshots == 1 and len(wal) == stats.last_lsn > 41
        after = list(store_of(eng).read_wal(stats.last_lsn - 1))
        assert stats.wal_bytes_since_snapshot in (0, sum(len(record) for _, record in after))
        state = eng.export_state()
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW) as eng:
        assert await total(eng) == acked
        assert eng.export_state() == state


def test_out_of_space_classification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lmdb").mkdir()
    full = lmdb_store._out_of_space
    assert full(ENOSPC_ERROR, tmp_path, 100)
    assert full(lmdb.Error("mdb_txn_commit: Disk quota exceeded"), tmp_path, 100)
    assert not full(lmdb.CorruptedError("mdb_get: MDB_CORRUPTED"), tmp_path, 100)
    free_space(monkeypatch, 3 << 20)
    assert full(SHORT_WRITE_ERROR, tmp_path, 5 << 20)  # less room than the commit needed
    assert not full(SHORT_WRITE_ERROR, tmp_path, 100 << 10)  # room enough: a real EIO


# ------------------------------------------------- a real full disk (tmpfs)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs mounted at ``tmp_path / "disk"``; skips when mounting is refused."""
    path = tmp_path / "disk"
    path.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount(8) to make a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = (mounted.stderr.strip().splitlines() or ["?"])[0]
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {reason}; the "
                    "capped-map and injected-error tests cover the same refusal path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


async def test_disk_full_on_a_real_filesystem(
    small_tmpfs: Path, serving: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """A 12 MiB tmpfs under a 1 GiB map: LMDB's own errors, over the API and over TCP."""
    caplog.set_level(logging.INFO)
    disk = small_tmpfs
    data = disk / "data"
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (3 << 20))
    figures: dict[str, float] = {}
    async with open_engine(data, shards=4, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(CALLS)
        await eng.add_limit(Limit(id="cap", meter_api_name="calls", thresholds=[1],
                                  customer_id="watched", period="total"))
        acked, refused, error = await ingest_until_full(eng, "a")
        assert "storage full: no space left on the filesystem" in str(error)
        assert "the request was refused and nothing in it was applied" in str(error)
        state, lsn = eng.export_state(), eng.statistics().last_lsn
        crossing = batch("w", customer="watched")
        for attempt in (refused, crossing, refused):
            started = time.perf_counter()
            with pytest.raises(StorageFull):
                await eng.ingest(attempt)
            figures["refuse_ms"] = (time.perf_counter() - started) * 1000
        with pytest.raises(StorageFull):
            await eng.snapshot()  # the state is far larger than the room left
        assert eng.export_state() == state and eng.statistics().last_lsn == lsn
        assert eng.next_alert_seq() == 0
        assert await total(eng) == acked

        async with serving(eng) as server, open_client("127.0.0.1", server.port) as client:
            with pytest.raises(StorageFull, match="no space left"):
                await client.ingest(refused)
            assert await total(client) == acked  # the same connection still answers
            assert [limit.id for limit in await client.list_limits()] == ["cap"]
            async with open_client("127.0.0.1", server.port) as other:
                with pytest.raises(StorageFull):
                    await other.ingest(crossing)
                assert await total(other) == acked

            # Space returns (a file is deleted): the next batch is accepted.
            filler.unlink()
            started = time.perf_counter()
            ack = await client.ingest(refused)
            figures["first_ack_after_delete_ms"] = (time.perf_counter() - started) * 1000
            assert (ack.accepted, ack.duplicates) == (len(refused), 0)
        acked += batch_total(refused)
        ack = await eng.ingest(crossing, report_alerts=True)
        assert [(a.seq, a.customer_id) for a in ack.alerts] == [(0, "watched")]
        acked += batch_total(crossing)
        more, refused, _ = await ingest_until_full(eng, "b")
        acked += more
        assert await total(eng) == acked
    # Closed on a full disk: the snapshot on close failed (logged), the WAL is whole.
    assert "on close failed; the write-ahead log is kept" in caplog.text

    # Reopen on the still-full disk: recovery needs no room; reads work, writes wait.
    async with open_engine(data, shards=4, clock_ms=lambda: NOW) as eng:
        assert await total(eng) == acked
        async with eng.subscribe(0) as alerts:
            assert (await alerts.__anext__()).customer_id == "watched"
        with pytest.raises(StorageFull):
            await eng.ingest(refused)
        remount(disk, "64m")  # the filesystem grows
        ack = await eng.ingest(refused)
        assert (ack.accepted, ack.duplicates) == (len(refused), 0)
        acked += batch_total(refused)
        started = time.perf_counter()
        await eng.snapshot()
        figures["snapshot_ms"] = (time.perf_counter() - started) * 1000
        state = eng.export_state()
    async with open_engine(data, shards=4, clock_ms=lambda: NOW) as eng:
        assert await total(eng) == acked
        assert eng.export_state() == state
    print("disk-full figures:", {k: round(v, 1) for k, v in figures.items()})
