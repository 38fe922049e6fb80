"""Online backup: ``Engine.backup``, the ``backup`` request and ``meter backup``.

The main guard compares a backup taken while three tasks ingest with a
reference engine that applied exactly the acknowledged batches with lsn <= the
backup's lsn (in lsn order): every query, the limits, the customers, the
alerts and the canonical state bytes must agree. The others check what a
backup refuses, that a failed one leaves nothing behind, and the TCP and CLI
shells.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
    redirect_stderr,
    redirect_stdout,
)
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

import engine.storage.lmdb_store as lmdb_store
from engine import (
    Backup,
    Customer,
    Engine,
    Event,
    Forbidden,
    InvalidRequest,
    Limit,
    Meter,
    Query,
    StorageError,
    open_engine,
)
from engine.auth import parse_keys
from engine.cli import main
from engine.client import open_client
from engine.server import MeterServer, ServerConfig
from engine.storage import MemoryStore
from engine.sync_client import SyncClient
from tests.helpers.alerts import take
from tests.helpers.events import DAY, HOUR, MINUTE, NOW, now_ms
from tests.helpers.serve import HOST, server_process

SHARDS = 4
METERS = [
    Meter(name="gb", aggregation="sum"),
    Meter(name="calls", aggregation="count"),
    Meter(name="peak", aggregation="max"),
    Meter(name="users", aggregation="unique_count", unique_dimension="user"),
]
CUSTOMERS = [f"c{n:02d}" for n in range(12)]
REGIONS = ["eu", "us", "ap"]
LIMITS = [
    Limit(id="gb-daily", meter_api_name="gb", thresholds=[50, 200]),
    Limit(id="c01-calls", meter_api_name="calls", thresholds=[10], customer_id="c01",
          period="total"),
]


def batch(number: int, size: int = 30, clock_ms: int = NOW) -> list[Event]:
    """Batch ``number``: events over the last two days on every meter; every fifth batch
    repeats unique ids of the one before (client retries, counted once)."""
    base = number - 1 if number % 5 == 4 else number
    events = []
    for index in range(size):
        n = base * size + index
        meter = METERS[n % len(METERS)]
        value: int | Decimal = 1 if meter.name == "calls" else Decimal(n % 97) / 10
        events.append(Event(
            meter_api_name=meter.name, customer_id=CUSTOMERS[n % len(CUSTOMERS)],
            meter_value=value, meter_time_in_millis=clock_ms - (n * 7_919) % (2 * DAY),
            dimensions={"region": REGIONS[n % 3], "user": f"u{n % 17}"},
            unique_id=f"e-{n}"))
    return events


async def define_meters(target: Any) -> None:
    """Define ``METERS`` on an engine or through a client."""
    for meter in METERS:
        await target.define_meter(meter)


async def prepare(eng: Engine) -> None:
    """What both engines get before any batch (in the same order, so the same lsns)."""
    await define_meters(eng)
    await eng.add_customer(Customer(id="c00", name="Acme", traits={"tier": "gold"}))
    await eng.add_customer(Customer(id="c03", name="Globex"))
    for limit in LIMITS:
        await eng.add_limit(limit)


async def answers(eng: Engine) -> list[Any]:
    """Every meter, windows from minute to day, grouped by customer and a dimension."""
    results = []
    for meter in METERS:
        for window, zone in ((None, "UTC"), ("minute", "UTC"), ("hour", "UTC"),
                             ("day", "UTC"), ("day", "America/New_York")):
            for group_by in ([], ["customer_id"], ["customer_id", "region"]):
                query = Query(meter_api_name=meter.name, start_ms=NOW - 3 * DAY,
                              end_ms=NOW + HOUR, window=window, timezone=zone,
                              group_by=group_by)
                results.append((meter.name, window, zone, group_by,
                                (await eng.query(query)).rows))
    return results


async def everything(eng: Engine) -> dict[str, Any]:
    """All an engine shows: queries, meters, limits, customers, alerts, state bytes."""
    alert_count = eng.next_alert_seq()
    async with eng.subscribe(0) as subscription:
        alerts = await take(subscription, alert_count)
    return {"answers": await answers(eng), "meters": eng.meters(), "limits": eng.limits(),
            "customers": await eng.list_customers(), "alerts": alerts,
            "last_lsn": eng.statistics().last_lsn, "state": eng.export_state()}


def fixed_clock() -> int:
    return NOW


async def test_backup_while_ingesting_holds_exactly_the_wal_up_to_its_lsn(
        tmp_path: Path) -> None:
    acked: dict[int, list[Event]] = {}  # lsn -> batch, for every acknowledged batch
    with trio.fail_after(60):
        async with open_engine(tmp_path / "data", shards=SHARDS,
                               clock_ms=fixed_clock) as eng:
            await prepare(eng)
            for number in range(8):
                events = batch(number)
                acked[(await eng.ingest(events)).lsn] = events
            await eng.snapshot()  # the copy holds a snapshot and a WAL tail
            for number in range(8, 12):
                events = batch(number)
                acked[(await eng.ingest(events)).lsn] = events

            enough_acked = trio.Event()
            backups: list[tuple[int, Backup, int]] = []

            async def ingest(first: int) -> None:
                # Until a few batches after the backup returned (at most 100 each).
                after_backup = 0
                for number in range(first, first + 300, 3):
                    events = batch(number)
                    acked[(await eng.ingest(events)).lsn] = events
                    if len(acked) >= 20:
                        enough_acked.set()
                    after_backup += bool(backups)
                    if after_backup >= 3:
                        break

            async def back_up() -> None:
                await enough_acked.wait()
                before = max(acked)
                backup = await eng.backup(tmp_path / "backup")
                backups.append((before, backup, max(acked)))

            async with trio.open_nursery() as nursery:
                for first in (12, 13, 14):
                    nursery.start_soon(ingest, first)
                nursery.start_soon(back_up)

            [(acked_before, backup, acked_after)] = backups
            final_lsn = eng.statistics().last_lsn
            assert acked_before <= backup.lsn <= acked_after <= final_lsn
            assert backup.lsn < final_lsn  # batches were acknowledged after the copy
            assert backup.path == str(tmp_path / "backup")
            assert backup.size_bytes == (tmp_path / "backup" / "lmdb" / "data.mdb").stat(
                ).st_size > 0
            assert sorted(os.listdir(tmp_path)) == ["backup", "data"]  # no temporary left

            # At a quiet moment a backup is the source, to the byte.
            quiet = await eng.backup(tmp_path / "quiet")
            assert quiet.lsn == final_lsn
            source = await everything(eng)

        async with open_engine(tmp_path / "quiet", shards=SHARDS, clock_ms=fixed_clock) as copy:
            assert await everything(copy) == source

        async with open_engine(store=MemoryStore(), shards=SHARDS,
                               clock_ms=fixed_clock) as reference:
            await prepare(reference)
            for lsn in sorted(lsn for lsn in acked if lsn <= backup.lsn):
                assert (await reference.ingest(acked[lsn])).lsn == lsn
            expected = await everything(reference)
        assert expected["last_lsn"] == backup.lsn
        assert len(expected["alerts"]) >= 2 and len(expected["customers"]) >= 2

        async with open_engine(tmp_path / "backup", shards=SHARDS,
                               clock_ms=fixed_clock) as restored:
            assert restored.statistics().recovered_wal_records > 0  # the tail was replayed
            got = await everything(restored)
        assert got["answers"] == expected["answers"]
        assert got == expected


async def test_a_backup_refuses_a_destination_in_use_or_without_a_parent(
        tmp_path: Path) -> None:
    async with open_engine(tmp_path / "data", shards=2, clock_ms=fixed_clock) as eng:
        await define_meters(eng)
        await eng.ingest(batch(0))
        taken = tmp_path / "taken"
        taken.mkdir()
        (taken / "notes.txt").write_text("keep me")
        with pytest.raises(InvalidRequest, match="exists and is not empty"):
            await eng.backup(taken)
        assert [p.name for p in taken.iterdir()] == ["notes.txt"]
        (tmp_path / "a-file").write_text("x")
        with pytest.raises(InvalidRequest, match="exists and is not a directory"):
            await eng.backup(tmp_path / "a-file")
        with pytest.raises(InvalidRequest, match=r"parent directory .* does not exist"):
            await eng.backup(tmp_path / "missing" / "backup")
        assert not (tmp_path / "missing").exists()

        empty = tmp_path / "empty"
        empty.mkdir()
        backup = await eng.backup(empty)  # an empty directory is as good as none
        assert backup.lsn == eng.statistics().last_lsn == 1
        assert sorted(p.name for p in empty.iterdir()) == ["LOCK", "lmdb"]
        assert sorted(os.listdir(tmp_path)) == ["a-file", "data", "empty", "taken"]
        await eng.ingest(batch(1))  # the engine serves on after refusals
    async with open_engine(empty, shards=2, clock_ms=fixed_clock) as copy:
        assert copy.statistics().last_lsn == 1


async def test_a_failed_backup_leaves_nothing_that_looks_like_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(path: Path) -> None:
        raise OSError(5, "Input/output error (injected)")

    async with open_engine(tmp_path / "data", shards=2, clock_ms=fixed_clock) as eng:
        await define_meters(eng)
        await eng.ingest(batch(0))
        with monkeypatch.context() as patch:
            patch.setattr(lmdb_store, "_fsync_file", failing_fsync)
            with pytest.raises(StorageError, match=r"nothing was written there.*injected"):
                await eng.backup(tmp_path / "backup")
        assert sorted(os.listdir(tmp_path)) == ["data"]
        assert (await eng.ingest(batch(1))).lsn == 2  # the store itself is untouched
        assert (await eng.backup(tmp_path / "backup")).lsn == 2


async def test_a_backup_to_another_filesystem(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem here")
    parent = Path(tempfile.mkdtemp(prefix="backup-test-", dir=other))
    try:
        async with open_engine(tmp_path / "data", shards=2, clock_ms=fixed_clock) as eng:
            await define_meters(eng)
            lsn = (await eng.ingest(batch(0))).lsn
            assert (await eng.backup(parent / "backup")).lsn == lsn
            source = eng.export_state()
        async with open_engine(parent / "backup", shards=2, clock_ms=fixed_clock) as copy:
            assert copy.export_state() == source
        assert os.listdir(parent) == ["backup"]
    finally:
        shutil.rmtree(parent)


async def test_an_engine_on_the_memory_store_refuses_to_back_up(tmp_path: Path) -> None:
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=fixed_clock) as eng:
        with pytest.raises(InvalidRequest, match="in-memory store"):
            await eng.backup(tmp_path / "backup")
    assert not (tmp_path / "backup").exists()


# ------------------------------------------------------------------ TCP and CLI


async def test_backup_over_tcp_needs_the_admin_scope(
        tmp_path: Path, serving: Callable[..., AbstractAsyncContextManager[MeterServer]],
) -> None:
    keys = parse_keys({"keys": [
        {"key": "admin-key", "scopes": ["admin", "ingest", "query"]},
        {"key": "reader-key", "scopes": ["ingest", "query"]},
    ]})
    async with open_engine(tmp_path / "data", shards=2, clock_ms=fixed_clock) as eng, \
            serving(eng, keys=keys) as server:
        async with open_client(HOST, server.port, api_key="reader-key") as reader:
            with pytest.raises(Forbidden, match="may not admin"):
                await reader.backup(str(tmp_path / "by-reader"))
        assert not (tmp_path / "by-reader").exists()
        async with open_client(HOST, server.port, api_key="admin-key") as admin:
            await define_meters(admin)
            ack = await admin.ingest(batch(0))
            backup = await admin.backup(str(tmp_path / "backup"))
            assert (backup.path, backup.lsn) == (str(tmp_path / "backup"), ack.lsn)
            assert backup.size_bytes == (tmp_path / "backup" / "lmdb" / "data.mdb").stat(
                ).st_size
            with pytest.raises(InvalidRequest, match="exists and is not empty"):
                await admin.backup(str(tmp_path / "backup"))
            await admin.ping()  # the connection is fine after a refusal

        def blocking_backup() -> Backup:
            with SyncClient(HOST, server.port, api_key="admin-key") as client:
                return client.backup(str(tmp_path / "by-sync-client"))

        assert (await trio.to_thread.run_sync(blocking_backup)).lsn == ack.lsn
        source = eng.export_state()
    for name in ("backup", "by-sync-client"):
        async with open_engine(tmp_path / name, shards=2, clock_ms=fixed_clock) as copy:
            assert copy.export_state() == source


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@asynccontextmanager
async def server_on(data: Path) -> AsyncIterator[tuple[Engine, int]]:
    async with open_engine(data, shards=SHARDS) as eng:
        server = MeterServer(eng, ServerConfig(host=HOST, port=0))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            try:
                yield eng, port
            finally:
                server.shutdown()


async def test_meter_backup_against_a_server_and_serving_the_copy(tmp_path: Path) -> None:
    dest = tmp_path / "backup"
    clock = now_ms()
    with trio.fail_after(60):
        async with server_on(tmp_path / "data") as (eng, port):
            await define_meters(eng)
            lsn = (await eng.ingest(batch(0, clock_ms=clock))).lsn
            code, out, _ = await trio.to_thread.run_sync(
                run_cli, ["backup", str(dest), "--port", str(port)])
            assert code == 0
            assert out.startswith(f"backup written to {dest}: the write-ahead log up to "
                                  f"lsn {lsn}, ")
            code, out, _ = await trio.to_thread.run_sync(
                run_cli, ["backup", str(tmp_path / "again"), "--port", str(port), "--json"])
            assert code == 0
            assert json.loads(out) == {"path": str(tmp_path / "again"), "lsn": lsn,
                                       "sizeBytes": (tmp_path / "again" / "lmdb" / "data.mdb"
                                                     ).stat().st_size}
            code, out, err = await trio.to_thread.run_sync(
                run_cli, ["backup", str(dest), "--port", str(port)])
            assert (code, out) == (1, "")
            assert "meter backup: cannot back up to" in err and "not empty" in err
            query = Query(meter_api_name="gb", start_ms=clock - 3 * DAY,
                          end_ms=clock + MINUTE, group_by=["customer_id"])
            expected = (await eng.query(query)).rows
        assert expected
        async with server_process(dest, tmp_path / "copy.log", shards=SHARDS) as copy, \
                open_client(HOST, copy.port) as client:
            assert copy.recovered_lsn == lsn
            assert (await client.query(query)).rows == expected


async def test_a_backup_carries_the_webhook_progress(tmp_path: Path) -> None:
    """The HTTP server keeps its webhook delivery progress in the data directory; a
    backup copies it (before the store), so a restored server skips no alert."""
    progress = {"version": 1, "urls": {"http://127.0.0.1:9/hook": 7}}
    async with open_engine(tmp_path / "data", shards=2, clock_ms=fixed_clock) as eng:
        await define_meters(eng)
        await eng.ingest(batch(0))
        (tmp_path / "data" / "webhooks.json").write_text(json.dumps(progress))
        await eng.backup(tmp_path / "backup")
    assert json.loads((tmp_path / "backup" / "webhooks.json").read_text()) == progress
    (tmp_path / "data" / "webhooks.json").unlink()
    async with open_engine(tmp_path / "data", shards=2, clock_ms=fixed_clock) as eng:
        await eng.backup(tmp_path / "backup-3")  # no progress file: none in the copy
    assert not (tmp_path / "backup-3" / "webhooks.json").exists()
    async with open_engine(tmp_path / "backup", shards=2, clock_ms=fixed_clock):
        pass  # the copy opens as a data directory, the progress file beside the store
