"""The wrong data directory: damaged, foreign, newer, missing, or already in use.

Whatever is wrong, startup stops with ``DataDirError`` saying what and what to do;
the engine never starts empty (or on different data) over an existing store.
Extends tests/test_recovery.py::test_foreign_or_locked_data_dir_is_refused
(a directory of other files; a second engine in the same process).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import lmdb.verify
import pytest
import trio

from engine import DataDirError, Event, Limit, Meter, open_engine
from engine.client import open_client
from engine.storage import data_dir, lmdb_store
from engine.storage.base import FORMAT_VERSION, LEGACY_FORMAT_VERSION
from tests.helpers import serve
from tests.helpers.events import NOW, total
from tests.helpers.internals import checksums_on


async def make_store(path: Path) -> int:
    """A store with a snapshot, a WAL tail, meters, a limit and alerts; its total."""
    async with open_engine(path, shards=2, clock_ms=lambda: NOW, snapshot_every_bytes=30_000,
                           snapshot_on_close=False) as eng:
        await eng.define_meter(Meter(name="calls"))
        await eng.add_limit(Limit(id="l", meter_api_name="calls", thresholds=[5],
                                  period="total"))
        for number in range(60):
            await eng.ingest([Event(meter_api_name="calls", customer_id=f"c{i % 7}",
                                    meter_value=i, meter_time_in_millis=NOW - i,
                                    unique_id=f"{number}-{i}") for i in range(30)])
        assert eng.statistics().snapshots >= 1 and eng.next_alert_seq() == 7
        return await total(eng)


async def refused(path: Path) -> str:
    with pytest.raises(DataDirError) as caught:
        async with open_engine(path, shards=2, clock_ms=lambda: NOW):
            pass
    return str(caught.value)


def page_bytes(path: Path) -> int:
    env = lmdb.open(str(path / "lmdb"), readonly=True, lock=False, max_dbs=5)
    try:
        return int(env.stat()["psize"])
    finally:
        env.close()


def overwrite(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


# ------------------------------------------------------------------ damaged


async def test_garbage_over_the_pages_stops_startup(tmp_path: Path) -> None:
    await make_store(tmp_path / "good")
    page = page_bytes(tmp_path / "good")
    size = (tmp_path / "good" / "lmdb" / "data.mdb").stat().st_size
    cases = {
        "metas": (0, 2 * page, "is not a readable LMDB file"),
        "every data page": (2 * page, size - 2 * page, "is corrupt"),
    }
    for name, (offset, length, message) in cases.items():
        copy = tmp_path / name
        shutil.copytree(tmp_path / "good", copy)
        overwrite(copy / "lmdb" / "data.mdb", offset, random.Random(name).randbytes(length))
        text = await refused(copy)
        assert message in text and "Restore the data directory from a backup" in text, text


WORKER = """
import json, os, random, shutil, sys, trio
from engine import DataDirError, open_engine
NOW = 1_790_000_000_000

async def state(path):
    try:
        async with open_engine(path, shards=2, clock_ms=lambda: NOW,
                               snapshot_on_close=False) as eng:
            return eng.export_state()
    except DataDirError as exc:
        return str(exc)

async def main(good, work, page, trials):
    original = await state(good)
    size = os.path.getsize(os.path.join(good, "lmdb", "data.mdb"))
    rng = random.Random(5)
    outcome = {"same": 0, "refused": 0, "different": [], "messages": []}
    for number in range(2, size // page):
        for _ in range(trials):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(good, work)
            length = rng.choice([1, 16, page])
            with open(os.path.join(work, "lmdb", "data.mdb"), "r+b") as handle:
                handle.seek(number * page + rng.randrange(0, page - length + 1))
                handle.write(rng.randbytes(length))
            result = await state(work)
            if result == original:
                outcome["same"] += 1
            elif isinstance(result, str):
                outcome["refused"] += 1
                outcome["messages"].append(result)
            else:
                outcome["different"].append([number, length])
    print(json.dumps(outcome))

trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
"""


async def test_random_damage_to_any_page_is_refused_or_harmless(tmp_path: Path) -> None:
    """Bytes flipped anywhere in data.mdb (1, 16 or a page of them, at random offsets):
    the engine refuses to start, or the damage hit unused pages and the recovered
    state is byte-identical. Run in a subprocess: a crash (SIGSEGV, SIGBUS) while
    reading damaged pages fails the test instead of ending the test run."""
    await make_store(tmp_path / "good")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, str(script), str(tmp_path / "good"), str(tmp_path / "work"),
         str(page_bytes(tmp_path / "good")), "4"],
        capture_output=True, text=True, timeout=120, env=serve.child_env(),
    ))
    assert done.returncode == 0, f"worker died ({done.returncode}): {done.stderr[-2000:]}"
    outcome = json.loads(done.stdout)
    print("damage outcomes:", {k: v if isinstance(v, int) else len(v) for k, v in outcome.items()})
    assert outcome["different"] == [], "damage changed the recovered state silently"
    assert outcome["refused"] >= 5 and outcome["same"] >= 5  # live pages and unused ones
    for message in outcome["messages"]:
        assert "backup" in message and ("corrupt" in message or "readable" in message), message


async def test_a_truncated_or_emptied_data_file_stops_startup(tmp_path: Path) -> None:
    await make_store(tmp_path / "good")
    page = page_bytes(tmp_path / "good")
    size = (tmp_path / "good" / "lmdb" / "data.mdb").stat().st_size
    cases = {
        "half": (size // 2, "is truncated (pages it needs lie past its end)"),
        "inside a meta page": (page + 100, "is not a readable LMDB file"),
        "empty": (0, "is empty (truncated to 0 bytes)"),
    }
    for name, (length, message) in cases.items():
        copy = tmp_path / name
        shutil.copytree(tmp_path / "good", copy)
        os.truncate(copy / "lmdb" / "data.mdb", length)
        text = await refused(copy)
        assert message in text, text
        assert (copy / "lmdb" / "data.mdb").stat().st_size == length  # left as found


async def test_a_large_store_is_checked_by_its_extent_and_still_refused_truncated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above FULL_VERIFY_MAX_BYTES an open checks the meta pages and the file's extent,
    not every page (a restart must not grow with history): a truncated file is still
    refused before LMDB maps it."""
    monkeypatch.setattr(data_dir, "FULL_VERIFY_MAX_BYTES", 0)
    walked: list[str] = []
    real_verify = lmdb.verify.verify
    monkeypatch.setattr(lmdb.verify, "verify",
                        lambda *a, **k: walked.append("full") or real_verify(*a, **k))
    await make_store(tmp_path / "good")
    async with open_engine(tmp_path / "good", shards=2, clock_ms=lambda: NOW) as eng:
        assert await total(eng) > 0
    size = (tmp_path / "good" / "lmdb" / "data.mdb").stat().st_size
    copy = tmp_path / "half"
    shutil.copytree(tmp_path / "good", copy)
    os.truncate(copy / "lmdb" / "data.mdb", size // 2)
    assert "is truncated (pages it needs lie past its end)" in await refused(copy)
    assert walked == []


async def test_a_missing_store_is_not_started_empty(tmp_path: Path) -> None:
    await make_store(tmp_path / "good")
    gone_file = tmp_path / "no data.mdb"
    shutil.copytree(tmp_path / "good", gone_file)
    (gone_file / "lmdb" / "data.mdb").unlink()
    assert "data.mdb' is missing (deleted or moved?)" in await refused(gone_file)
    assert not (gone_file / "lmdb" / "data.mdb").exists()
    gone_dir = tmp_path / "no lmdb"
    shutil.copytree(tmp_path / "good", gone_dir)
    shutil.rmtree(gone_dir / "lmdb")
    text = await refused(gone_dir)
    assert "was initialised as a metering-engine data directory but its store" in text
    assert "is missing" in text and not (gone_dir / "lmdb").exists()


async def test_an_interrupted_creation_starts_fresh(tmp_path: Path) -> None:
    """A creation that stopped before the store was renamed into place left no data:
    the leftovers are removed and the engine starts empty."""
    (tmp_path / "LOCK").touch()
    (tmp_path / "lmdb.creating").mkdir()
    (tmp_path / "lmdb.creating" / "data.mdb").write_bytes(b"\0" * 100)
    async with open_engine(tmp_path, clock_ms=lambda: NOW) as eng:
        assert eng.meters() == [] and eng.statistics().last_lsn == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK", "lmdb"]


# ------------------------------------------------------------------ foreign


def foreign_env(path: Path, **databases: dict[bytes, bytes]) -> None:
    path.mkdir(parents=True)
    env = lmdb.open(str(path), max_dbs=5)
    with env.begin(write=True) as txn:
        for name, items in databases.items():
            db = env.open_db(name.encode(), txn=txn)
            for key, value in items.items():
                txn.put(key, value, db=db)
    env.close()


async def test_an_lmdb_environment_of_another_program_is_refused(tmp_path: Path) -> None:
    beside = tmp_path / "beside"  # their env is the data directory itself
    foreign_env(beside, users={b"alice": b"1"})
    text = await refused(beside)
    assert "is not a metering-engine data directory (it holds an LMDB environment" in text
    inside = tmp_path / "inside"  # their env where our store would be
    foreign_env(inside / "lmdb", users={b"alice": b"1"})
    assert "without a metering-engine catalogue (no 'meta' database)" in await refused(inside)
    unmarked = tmp_path / "unmarked"  # a 'meta' database, but not ours
    foreign_env(unmarked / "lmdb", meta={b"owner": b"someone else"})
    assert "without a metering-engine format marker" in await refused(unmarked)
    for path in (inside, unmarked):  # untouched: no databases of ours were added
        env = lmdb.open(str(path / "lmdb"), readonly=True, lock=False, max_dbs=5)
        with env.begin() as txn:
            names = sorted(key for key, _ in txn.cursor())
        env.close()
        assert b"wal" not in names and b"snapshot" not in names


def set_format(path: Path, version: bytes) -> None:
    env = lmdb.open(str(path / "lmdb"), max_dbs=5)
    with env.begin(write=True) as txn:
        txn.put(b"format", version, db=env.open_db(b"meta", txn=txn))
    env.close()


async def test_a_newer_or_unknown_format_is_refused(tmp_path: Path) -> None:
    await make_store(tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "newer")
    set_format(tmp_path / "newer", b"metering-engine/6")
    text = await refused(tmp_path / "newer")
    assert "was written by a newer metering-engine (data format 6)" in text
    assert "this version reads formats 1 to 5 only" in text
    shutil.copytree(tmp_path / "good", tmp_path / "other")
    set_format(tmp_path / "other", b"another-program/9")
    assert "without a metering-engine format marker (b'another-program/9')" in await refused(
        tmp_path / "other")


async def test_a_format_1_store_without_checksums_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert FORMAT_VERSION == b"metering-engine/5"
    with monkeypatch.context() as patch:
        patch.setattr(lmdb_store, "FORMAT_VERSION", LEGACY_FORMAT_VERSION)
        before = await make_store(tmp_path)
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW) as eng:
        assert await total(eng) == before
        await eng.ingest([Event(meter_api_name="calls", customer_id="late", meter_value=5,
                                meter_time_in_millis=NOW)])
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW) as eng:
        assert await total(eng) == before + 5
        assert checksums_on(eng) is False


# ------------------------------------------------------------------ in use


async def test_a_second_server_on_the_same_directory_refuses_to_start(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    async with serve.server_process(data, log, shards=None) as first:
        second = await trio.to_thread.run_sync(lambda: subprocess.run(
            [*serve.ENGINE_COMMAND, "serve", "--data-dir", str(data), "--port", "0",
             "--status", "off"],
            capture_output=True, text=True, env=serve.child_env(), timeout=30))
        assert second.returncode != 0
        assert "is in use by another engine process" in second.stderr, second.stderr
        assert "listening" not in second.stdout
        async with open_client("127.0.0.1", first.port) as client:  # the first one still serves
            await client.define_meter(Meter(name="calls"))
            assert [m.name for m in await client.list_meters()] == ["calls"]
        await serve.terminate(first.process, within_s=20)
