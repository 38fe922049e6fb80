"""LMDB-backed write-ahead log, meter catalogue, snapshots and dedup index.

Storage layer: imports the standard library, lmdb, msgspec (the snapshot
header) and ``engine.errors`` only. One process owns a data directory (an
exclusive ``flock`` on ``LOCK``); within it, one task (the WAL writer) calls
``commit``, ``write_snapshot`` and ``expire_ids`` (recovery, before it runs,
``build_id_index``), each a complete write transaction within one call (an LMDB
write transaction must begin and end on one thread).

A data directory holds ``LOCK`` (whose content records that the directory was
initialised) and ``lmdb/``, created complete under a temporary name and then
renamed. Layout of ``lmdb/`` (named databases):

- ``wal``: 8-byte big-endian lsn → one encoded batch. Appended with
  ``append=True`` (whose ``False`` return on an out-of-order key is checked).
- ``meta``: ``format`` → format version; ``last_lsn`` → 8-byte lsn; ``meter:NAME``
  → encoded ``Meter``.
- ``snapshot``: ``header`` → encoded (lsn, shard count, part count);
  ``part`` + 4-byte index → one shard's encoded state; ``engine`` → engine-wide state.
- ``alerts``: 8-byte big-endian seq → one encoded alert.
- ``ids`` (format 3 and 4): the legacy dedup tree, one entry per (meter, customer,
  unique id); key as ``engine.runtime.dedup.id_key`` builds it, value
  ``base.ID_VALUE`` (lsn of the first batch that carried it, its arrival day). Put
  with ``overwrite=False`` in a batch's commit by format-3/4 engines (and by
  ``build_id_index``); from format 5 on only read, and deleted by ``expire_ids``.
- ``idruns`` (format 5): the dedup index's sorted runs (``engine.runtime.idindex``):
  ``run(4) key`` → an empty value, appended in key order by ``write_run`` or within a group commit;
  each run's metadata and Bloom filter are ``meta`` entries (``idrun:``, ``idbloom:``).
- ``dups`` (format 5): 8-byte lsn → the logged dedup decisions of a batch that had
  duplicates, put in the batch's own commit.
- ``blocks``: sealed history, ``meter NUL day(4) part(2)`` → one compressed
  ``BlockRecord`` (``engine.domain.blocks``); written only with a snapshot, in its
  transaction, so blocks and the checkpoint that refers to them are one state.

The write-ahead log is not truncated at a snapshot: it is also the raw-event
log, kept for the retention the writer passes as ``trim_wal_through``.

Every value but ``format`` starts with a 4-byte CRC-32 of the rest (format 2 and 3;
format 1 stores, without checksums, are still read and written as they are). A
store without ``ids`` (format 1 or 2) is opened with ``needs_id_index()`` true, and
recovery fills the index with ``build_id_index`` before anything else is written.

The environment is opened with ``sync=True, metasync=True``: a returned commit
has been fsynced. Errors: ``DataDirError`` when the directory is not a usable
store (foreign, locked, missing, truncated, corrupt, newer format), checked
before LMDB maps the file; ``StorageFull`` when a write finds no room (the map
may not grow further, or the filesystem is full), nothing of it written;
``StorageError`` for any other failed write. The checks of a directory before it
is opened live in ``engine.storage.data_dir``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from io import BufferedRandom
from pathlib import Path

import lmdb
import msgspec

from engine.errors import DataDirError, InvalidRequest, StorageError, StorageFull
from engine.faults import fault_point
from engine.storage.base import (
    DEDUP_FORMAT_VERSION,
    FORMAT_VERSION,
    HEAD_FORMAT_VERSION,
    ID_VALUE,
    LEGACY_FORMAT_VERSION,
    PREVIOUS_FORMAT_VERSION,
    ExpirySlice,
    RunSlice,
    StoredBackup,
    StoredSnapshot,
)
from engine.storage.data_dir import check_data_file, check_format

log = logging.getLogger(__name__)

LSN = struct.Struct(">Q")
RUN = struct.Struct(">I")  # the dedup index's run number, the first bytes of its keys
CHECKSUM = struct.Struct(">I")
PART_INDEX = struct.Struct(">I")
LMDB_DIR = "lmdb"
LMDB_BUILDING_DIR = "lmdb.creating"
OUR_ENTRIES = {LMDB_DIR, LMDB_BUILDING_DIR, "LOCK"}
# Files others keep in the data directory that a backup copies too: the HTTP server's
# webhook delivery progress (engine.http). Copied before the store, so a restored
# server resumes its deliveries at or before the store's alerts: it may send an alert
# again, never skip one.
BACKUP_EXTRA_FILES = ("webhooks.json",)
# The named databases of a new store. A new database is added here (and opened in
# ``_open_databases``); MAX_DBS leaves room for two more before it must grow.
DB_NAMES = (b"wal", b"meta", b"snapshot", b"alerts", b"ids", b"blocks", b"head", b"idruns",
            b"dups")
MAX_DBS = len(DB_NAMES) + 2
# WAL records deleted per checkpoint at most when trimming past the raw-event retention:
# bounds the checkpoint's transaction; the rest goes at the next checkpoint.
MAX_TRIM_RECORDS = 20_000
DEFAULT_MAP_BYTES = 1 << 30
DEFAULT_MAX_MAP_BYTES = 1 << 40
INITIALISED_MARK = b"metering-engine data directory\n"
# A commit that failed with EIO counts as "out of space" when the filesystem has less
# than this much room beyond the bytes the commit wrote (see ``_out_of_space``).
SPACE_SLACK_BYTES = 1 << 20
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class LmdbStore:
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        map_bytes: int = DEFAULT_MAP_BYTES,
        max_map_bytes: int = DEFAULT_MAX_MAP_BYTES,
        verify: bool = True,
    ) -> None:
        if not 0 < map_bytes <= max_map_bytes:
            raise ValueError(f"need 0 < map_bytes <= max_map_bytes, got {map_bytes} and "
                             f"{max_map_bytes}")
        self.path = Path(data_dir)
        self.max_map_bytes = max_map_bytes
        # LMDB may only be resized while no transaction is open in the process: should
        # a reader ever run on another thread, it and the resize take this lock.
        self._resize_lock = threading.Lock()
        self._lock_file = self._lock(self.path)
        try:
            self._open(map_bytes, verify)
        except BaseException:
            self._lock_file.close()
            raise

    @staticmethod
    def _lock(path: Path) -> BufferedRandom:
        try:
            path.mkdir(parents=True, exist_ok=True)
            entries = {p.name for p in path.iterdir()}
        except OSError as exc:
            raise DataDirError(f"cannot use data directory {str(path)!r}: {exc}") from None
        foreign = sorted(entries - OUR_ENTRIES)
        if foreign and LMDB_DIR not in entries:
            kind = ("an LMDB environment of another program"
                    if "data.mdb" in entries else "other files")
            raise DataDirError(
                f"{str(path)!r} is not a metering-engine data directory (it holds {kind}: "
                f"{', '.join(foreign[:5])}); refusing to start over existing files. "
                "Point --data-dir / data_dir at an empty or new directory."
            )
        try:
            lock_file = open(path / "LOCK", "a+b")
        except OSError as exc:
            raise DataDirError(f"cannot create {str(path / 'LOCK')!r}: {exc}") from None
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise DataDirError(
                f"data directory {str(path)!r} is in use by another engine process "
                "(it holds the lock on LOCK); stop that process or use another directory"
            ) from None
        return lock_file

    def _open(self, map_bytes: int, verify: bool) -> None:
        lmdb_dir = self.path / LMDB_DIR
        if not lmdb_dir.exists():
            if self._initialised():
                raise DataDirError(
                    f"{str(self.path)!r} was initialised as a metering-engine data directory "
                    f"but its store {str(lmdb_dir)!r} is missing (deleted or moved?); refusing "
                    "to start empty over it. Restore the directory from a backup, or remove "
                    "it to start with no data."
                )
            self._create(lmdb_dir, map_bytes)
        else:
            check_data_file(lmdb_dir / "data.mdb", verify)
        try:
            self.env = lmdb.open(
                str(lmdb_dir),
                map_size=map_bytes,
                max_dbs=MAX_DBS,
                sync=True,
                metasync=True,
                subdir=True,
                create=False,
                readahead=False,
                max_spare_txns=2,
            )
        except lmdb.Error as exc:
            raise DataDirError(_unusable(lmdb_dir, exc)) from None
        try:
            # Grow to the size the file already has, if it was grown before.
            info_size = self.env.info()["map_size"]
            if info_size < map_bytes:
                self.env.set_mapsize(map_bytes)
            self._open_databases(lmdb_dir)
        except lmdb.Error as exc:
            self.env.close()
            raise DataDirError(_unusable(lmdb_dir, exc)) from None
        except BaseException:
            self.env.close()
            raise
        self._mark_initialised()

    def _open_databases(self, lmdb_dir: Path) -> None:
        with self.env.begin(write=True) as txn:
            try:
                self.meta_db = self.env.open_db(b"meta", txn=txn, create=False)
            except lmdb.NotFoundError:
                raise DataDirError(
                    f"{str(lmdb_dir)!r} is an LMDB environment without a metering-engine "
                    "catalogue (no 'meta' database): it belongs to another program. Point the "
                    "engine at its own data directory."
                ) from None
            version = txn.get(b"format", db=self.meta_db)
            check_format(lmdb_dir, version)
            # Format 1 stores carry no checksums; they keep being written without.
            self._checksums = version != LEGACY_FORMAT_VERSION
            # ``create`` only writes when a database is missing (none are, in a store
            # this version created).
            self.wal_db = self.env.open_db(b"wal", txn=txn)
            self.snapshot_db = self.env.open_db(b"snapshot", txn=txn)
            self.alerts_db = self.env.open_db(b"alerts", txn=txn)
            # Sealed history (absent from stores written before it existed: created here).
            self.blocks_db = self.env.open_db(b"blocks", txn=txn)
            # The head's hour chunks (format 4; created in older stores).
            self.head_db = self.env.open_db(b"head", txn=txn)
            # The dedup index's sorted runs and logged decisions (format 5; created in
            # older stores).
            self.runs_db = self.env.open_db(b"idruns", txn=txn)
            self.dups_db = self.env.open_db(b"dups", txn=txn)
            if version in (DEDUP_FORMAT_VERSION, HEAD_FORMAT_VERSION):
                # Format 3 or 4 -> 5: nothing to convert (the ``ids`` tree is read as it is).
                txn.put(b"format", FORMAT_VERSION, db=self.meta_db)
                version = FORMAT_VERSION
            self._format = version
            try:
                self.ids_db: lmdb._Database | None = self.env.open_db(
                    b"ids", txn=txn, create=False)
            except lmdb.NotFoundError:
                self.ids_db = None  # an older store: recovery builds it (build_id_index)
            if self.ids_db is None and version == FORMAT_VERSION:
                raise DataDirError(
                    f"{str(lmdb_dir)!r} is marked data format 3 or later but has no dedup index "
                    "('ids' database): the data directory was damaged. Restore it from a "
                    "backup; the engine will not start over it."
                )

    def _create(self, lmdb_dir: Path, map_bytes: int) -> None:
        """Create the store atomically: built and given its format marker under a
        temporary name, then renamed. So a ``lmdb`` directory always holds a complete,
        marked store, and one without ``data.mdb`` is damage, never a new store."""
        building = self.path / LMDB_BUILDING_DIR
        try:
            shutil.rmtree(building, ignore_errors=True)  # an earlier creation that stopped
            env = lmdb.open(str(building), map_size=map_bytes, max_dbs=MAX_DBS, sync=True,
                            metasync=True, subdir=True)
            try:
                with env.begin(write=True) as txn:
                    for name in DB_NAMES:
                        env.open_db(name, txn=txn)
                    txn.put(b"format", FORMAT_VERSION, db=env.open_db(b"meta", txn=txn))
            finally:
                env.close()
            os.rename(building, lmdb_dir)
            _fsync_dir(self.path)
        except (lmdb.Error, OSError) as exc:
            shutil.rmtree(building, ignore_errors=True)
            raise DataDirError(
                f"cannot create the store in {str(self.path)!r}: {exc}"
            ) from None

    def _initialised(self) -> bool:
        self._lock_file.seek(0)
        return self._lock_file.read(len(INITIALISED_MARK)) == INITIALISED_MARK

    def _mark_initialised(self) -> None:
        """Record in ``LOCK`` that this directory holds a store, so a store that later
        goes missing is reported instead of silently recreated empty."""
        if self._initialised():
            return
        try:
            self._lock_file.truncate(0)
            self._lock_file.write(INITIALISED_MARK)
            self._lock_file.flush()
            os.fsync(self._lock_file.fileno())
        except OSError as exc:  # the store itself is fine; only the guard is missing
            log.warning("cannot mark %s as initialised: %s", self.path / "LOCK", exc)

    # ------------------------------------------------------------ writing

    def commit(
        self,
        wal: list[tuple[int, bytes]],
        meta: list[tuple[bytes, bytes]],
        alerts: list[tuple[int, bytes]] | None = None,
        ids: list[tuple[bytes, bytes]] | None = None,
        decisions: list[tuple[int, bytes]] | None = None,
        run_slice: RunSlice | None = None,
    ) -> list[bool]:
        alerts = alerts or []
        ids = ids or []
        decisions = decisions or []
        size_bytes = (sum(len(record) for _, record in wal) + sum(len(v) for _, v in meta)
                      + sum(len(alert) for _, alert in alerts) + 32 * len(ids)
                      + sum(len(d) for _, d in decisions)
                      + (sum(len(key) + 8 for key in run_slice.keys) if run_slice else 0))
        duplicates: list[bool] = []
        self._write(size_bytes, self._commit_txn, wal, meta, alerts, ids, decisions, run_slice,
                    duplicates)
        return duplicates

    def _commit_txn(
        self,
        txn: lmdb.Transaction[bytes],
        wal: list[tuple[int, bytes]],
        meta: list[tuple[bytes, bytes]],
        alerts: list[tuple[int, bytes]],
        ids: list[tuple[bytes, bytes]],
        decisions: list[tuple[int, bytes]],
        run_slice: RunSlice | None,
        duplicates: list[bool],
    ) -> None:
        duplicates.clear()  # a retry after growing the map starts over
        if run_slice is not None:
            self._run_slice_txn(txn, run_slice)
        for lsn, decided in decisions:
            txn.put(LSN.pack(lsn), self._seal(decided), db=self.dups_db)
        if ids:
            if self.ids_db is None:
                raise StorageError("the dedup index was not built (build_id_index)")
            put = txn.cursor(db=self.ids_db).put
            duplicates.extend([False] * len(ids))
            sealed_of: dict[bytes, bytes] = {}  # one value per batch: sealed once
            # In key order (neighbouring keys share pages: about 7% less time per commit
            # of 4,000 keys into 1M, measured), stable, so of equal keys the earliest
            # still comes first. Without overwriting: False means the key was there (or was put
            # earlier in this very list), i.e. a duplicate.
            keys = [key for key, _ in ids]
            for index in sorted(range(len(ids)), key=keys.__getitem__):
                key, value = ids[index]
                sealed = sealed_of.get(value)
                if sealed is None:
                    sealed = sealed_of[value] = self._seal(value)
                duplicates[index] = not put(key, sealed, overwrite=False)
        for seq, alert in alerts:
            txn.put(LSN.pack(seq), self._seal(alert), db=self.alerts_db)
        if wal:
            cursor = txn.cursor(db=self.wal_db)
            for lsn, record in wal:
                if not cursor.put(LSN.pack(lsn), self._seal(record), append=True):
                    raise StorageError(f"WAL append out of order at lsn {lsn}")
            txn.put(b"last_lsn", self._seal(LSN.pack(wal[-1][0])), db=self.meta_db)
        for key, value in meta:
            txn.put(key, self._seal(value), db=self.meta_db)

    def write_snapshot(self, snapshot: StoredSnapshot, blocks: Sequence[tuple[bytes, bytes]] = (),
                       trim_wal_through: int = 0, drop_blocks: Sequence[bytes] = (),
                       drop_head: Sequence[bytes] = (), reset_head: bool = False) -> None:
        size_bytes = (sum(len(part) for part in snapshot.parts) + len(snapshot.engine_state)
                      + sum(len(raw) for _, raw in blocks)
                      + sum(len(raw) for _, raw in snapshot.head))
        self._write(size_bytes, self._snapshot_txn, snapshot, blocks, trim_wal_through,
                    drop_blocks, drop_head, reset_head)

    def _snapshot_txn(self, txn: lmdb.Transaction[bytes], snapshot: StoredSnapshot,
                      blocks: Sequence[tuple[bytes, bytes]], trim_wal_through: int,
                      drop_blocks: Sequence[bytes], drop_head: Sequence[bytes],
                      reset_head: bool) -> None:
        if reset_head:
            txn.drop(self.head_db, delete=False)
        for key in drop_head:
            txn.delete(key, db=self.head_db)
        for key, raw in snapshot.head:
            txn.put(key, self._seal(raw), db=self.head_db)
        txn.drop(self.snapshot_db, delete=False)
        for index, part in enumerate(snapshot.parts):
            txn.put(b"part" + PART_INDEX.pack(index), self._seal(part), db=self.snapshot_db)
        header = msgspec.msgpack.encode([snapshot.lsn, snapshot.shard_count, len(snapshot.parts)])
        txn.put(b"header", self._seal(header), db=self.snapshot_db)
        txn.put(b"engine", self._seal(snapshot.engine_state), db=self.snapshot_db)
        for key in drop_blocks:
            txn.delete(key, db=self.blocks_db)
        for key, raw in blocks:
            txn.put(key, self._seal(raw), db=self.blocks_db)
        fault_point("checkpoint.in_txn")
        if trim_wal_through:
            cursor = txn.cursor(db=self.wal_db)
            last_key = LSN.pack(min(trim_wal_through, snapshot.lsn))
            deleted = 0
            if cursor.first():
                while cursor.key() <= last_key and deleted < MAX_TRIM_RECORDS:
                    deleted += 1
                    if not cursor.delete():
                        break

    def block_keys(self) -> list[bytes]:
        with self._reading("the block index"), self.env.begin(db=self.blocks_db) as txn:
            return list(txn.cursor().iternext(keys=True, values=False))

    def read_block(self, key: bytes) -> bytes | None:
        with self._reading("a sealed block"), self.env.begin(db=self.blocks_db) as txn:
            raw = txn.get(key)
        return None if raw is None else self._unseal(raw, f"sealed block {key!r}")

    def first_lsn(self) -> int:
        """The oldest lsn still in the write-ahead log (0 if it is empty)."""
        with self._reading("the write-ahead log"), self.env.begin(db=self.wal_db) as txn:
            cursor = txn.cursor()
            return LSN.unpack(cursor.key())[0] if cursor.first() else 0

    def disk_bytes(self) -> dict[str, int]:
        """Bytes of pages each database uses (the data file is larger: free pages)."""
        sizes = {}
        with self.env.begin() as txn:
            for name, db in (("wal", self.wal_db), ("blocks", self.blocks_db),
                             ("snapshot", self.snapshot_db), ("alerts", self.alerts_db)):
                stat = txn.stat(db)
                pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
                sizes[name] = pages * stat["psize"]
        return sizes

    def expire_ids(self, start_key: bytes, before_day: int, max_lsn: int,
                   max_keys: int) -> ExpirySlice:
        found: list[ExpirySlice] = []
        self._write(0, self._expire_txn, start_key, before_day, max_lsn, max_keys, found)
        return found[-1]

    def _expire_txn(self, txn: lmdb.Transaction[bytes], start_key: bytes, before_day: int,
                    max_lsn: int, max_keys: int, found: list[ExpirySlice]) -> None:
        if self.ids_db is None:
            raise StorageError("the dedup index was not built (build_id_index)")
        cursor = txn.cursor(db=self.ids_db)
        examined = deleted = 0
        positioned = cursor.set_range(start_key)
        unpack, unseal = ID_VALUE.unpack, self._unseal
        while positioned and examined < max_keys:
            examined += 1
            lsn, day = unpack(unseal(cursor.value(), "dedup index entry"))
            if day < before_day and lsn <= max_lsn:
                deleted += 1
                cursor.delete()  # moves to the next entry, or past the last (key b"")
                positioned = cursor.key() != b""
            else:
                positioned = cursor.next()
        found.append(ExpirySlice(cursor.key() if positioned else None, examined, deleted))

    def build_id_index(self, entries: list[tuple[bytes, bytes]]) -> None:
        size_bytes = 32 * len(entries)
        self._write(size_bytes, self._build_ids_txn, entries)
        # Committed: the handle is valid from now on (one from an aborted try is not).
        self.ids_db = self.env.open_db(b"ids", create=False)
        if self._format == PREVIOUS_FORMAT_VERSION:
            self._format = FORMAT_VERSION

    def _build_ids_txn(self, txn: lmdb.Transaction[bytes],
                       entries: list[tuple[bytes, bytes]]) -> None:
        ids_db = self.env.open_db(b"ids", txn=txn)
        txn.drop(ids_db, delete=False)  # a leftover of an unfinished earlier build
        cursor = txn.cursor(db=ids_db)
        for key, value in entries:
            cursor.put(key, self._seal(value), overwrite=False)
        if self._format == PREVIOUS_FORMAT_VERSION:
            txn.put(b"format", FORMAT_VERSION, db=self.meta_db)

    def _write(self, size_bytes: int, body: Callable[..., None], *args: object) -> None:
        """Run ``body(txn, *args)`` in one write transaction, growing the map when full.

        Raises ``StorageFull`` when the map may not grow further or the filesystem is
        out of space; the transaction was aborted, so nothing of it was written (LMDB
        only publishes a transaction by its meta page, written after the data pages
        were written and fsynced). Raises ``StorageError`` for any other failure.
        """
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    body(txn, *args)
                return
            except lmdb.MapFullError:
                size = self.env.info()["map_size"]
                if size >= self.max_map_bytes:
                    raise StorageFull(
                        f"storage full: the LMDB map of {str(self.path)!r} is full at "
                        f"{_mib(size)} and may not grow past max_map_bytes "
                        f"({_mib(self.max_map_bytes)}); {REFUSED}"
                    ) from None
                new_size = min(size * 2, self.max_map_bytes)
                log.info("LMDB map full at %d bytes, growing to %d", size, new_size)
                try:
                    with self._resize_lock:
                        self.env.set_mapsize(new_size)
                except lmdb.Error as exc:
                    raise StorageFull(
                        f"storage full: cannot grow the LMDB map of {str(self.path)!r} from "
                        f"{_mib(size)} to {_mib(new_size)} ({exc}); {REFUSED}"
                    ) from None
            except lmdb.Error as exc:
                if _out_of_space(exc, self.path, size_bytes):
                    log.warning("write refused, out of space in %s: %s", self.path, exc)
                    raise StorageFull(
                        f"storage full: no space left on the filesystem holding "
                        f"{str(self.path)!r} ({exc}); {REFUSED}"
                    ) from None
                raise StorageError(f"LMDB write to {str(self.path)!r} failed: {exc}") from None

    # ------------------------------------------------------------ reading

    def read_wal(self, after_lsn: int) -> Iterator[tuple[int, bytes]]:
        with self._reading("the write-ahead log"), self.env.begin(db=self.wal_db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(LSN.pack(after_lsn + 1)):
                return
            for key, value in cursor:
                lsn = LSN.unpack(key)[0]
                yield lsn, self._unseal(value, f"write-ahead log record {lsn}")

    def read_wal_page(self, from_lsn: int, max_records: int) -> list[tuple[int, bytes]]:
        """Up to ``max_records`` WAL records from ``from_lsn`` on, in one read transaction
        that a map resize waits for (``read_wal`` is for recovery, before any write)."""
        records: list[tuple[int, bytes]] = []
        with (self._reading("the write-ahead log"), self._resize_lock,
              self.env.begin(db=self.wal_db) as txn):
            cursor = txn.cursor()
            if not cursor.set_range(LSN.pack(from_lsn)):
                return records
            for key, value in cursor:
                lsn = LSN.unpack(key)[0]
                records.append((lsn, self._unseal(value, f"write-ahead log record {lsn}")))
                if len(records) >= max_records:
                    break
        return records

    def last_lsn(self) -> int:
        with self._reading("the catalogue"), self.env.begin() as txn:
            raw = txn.get(b"last_lsn", db=self.meta_db)
        return 0 if raw is None else LSN.unpack(self._unseal(raw, "last_lsn"))[0]

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        with self._reading("the catalogue"), self.env.begin(db=self.meta_db) as txn:
            cursor = txn.cursor()
            items = []
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    items.append((key, self._unseal(value, f"catalogue entry {key!r}")))
        return items

    def load_snapshot(self) -> StoredSnapshot | None:
        with self._reading("the snapshot"), self.env.begin(db=self.snapshot_db) as txn:
            sealed_header = txn.get(b"header")
            if sealed_header is None:
                return None
            header = self._unseal(sealed_header, "snapshot header")
            try:
                lsn, shard_count, part_count = msgspec.msgpack.decode(header)
            except (msgspec.DecodeError, ValueError, TypeError):
                raise DataDirError("snapshot header is corrupt") from None
            parts = []
            for index in range(part_count):
                part = txn.get(b"part" + PART_INDEX.pack(index))
                if part is None:
                    raise DataDirError(f"snapshot part {index} of {part_count} is missing")
                parts.append(self._unseal(part, f"snapshot part {index}"))
            sealed_engine = txn.get(b"engine")
            engine_state = b"" if sealed_engine is None else self._unseal(
                sealed_engine, "snapshot engine state")
            head = [(key, self._unseal(value, f"head chunk {key!r}"))
                    for key, value in txn.cursor(db=self.head_db)]
        return StoredSnapshot(lsn, shard_count, parts, engine_state, head)

    def read_ids(self, keys: list[bytes]) -> list[int | None]:
        if self.ids_db is None:
            raise StorageError("the dedup index was not built (build_id_index)")
        lsns: list[int | None] = []
        with self._reading("the dedup index"), self.env.begin(db=self.ids_db) as txn:
            get = txn.get
            for key in keys:
                value = get(key)
                lsns.append(None if value is None else ID_VALUE.unpack(
                    self._unseal(value, "dedup index entry"))[0])
        return lsns

    def id_index_statistics(self) -> tuple[int, int]:
        if self.ids_db is None:
            return 0, 0
        with self._reading("the dedup index"), self.env.begin() as txn:
            stat = txn.stat(self.ids_db)
            runs = txn.stat(self.runs_db)
        pages = sum(part["branch_pages"] + part["leaf_pages"] + part["overflow_pages"]
                    for part in (stat, runs))
        return int(stat["entries"]), int(pages * stat["psize"])

    def needs_id_index(self) -> bool:
        return self.ids_db is None

    def read_decisions(self, lsn: int) -> bytes | None:
        with self._reading("the dedup decisions"), self.env.begin(db=self.dups_db) as txn:
            raw = txn.get(LSN.pack(lsn))
        return None if raw is None else self._unseal(raw, f"dedup decisions of batch {lsn}")

    def runs_contain(self, pairs: list[tuple[int, bytes]]) -> list[bool]:
        with self._reading("the dedup index"), self.env.begin(db=self.runs_db) as txn:
            get, pack = txn.get, RUN.pack
            return [get(pack(run) + key) is not None for run, key in pairs]

    def read_run(self, run: int, after: bytes | None, max_keys: int) -> list[bytes]:
        prefix = RUN.pack(run)
        keys: list[bytes] = []
        with self._reading("the dedup index"), self.env.begin(db=self.runs_db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix + (after or b"")):
                return keys
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix) or len(keys) >= max_keys:
                    break
                if after is not None and key == prefix + after:
                    continue
                keys.append(key[len(prefix):])
        return keys

    def write_run(self, work: RunSlice) -> None:
        size_bytes = sum(len(key) + 8 for key in work.keys) + sum(len(v) for _, v in work.meta)
        self._write(size_bytes, self._run_slice_txn, work)

    def _run_slice_txn(self, txn: lmdb.Transaction[bytes], work: RunSlice) -> None:
        prefix = RUN.pack(work.run)
        if work.keys:
            # One putmulti, not a put per key: py-lmdb releases the interpreter lock
            # around each put, and beside a busy thread each release can cost a switch
            # interval (engine.runtime.gc_tuning); 2,000 keys took about a quarter of
            # the time of single puts so (docs/benchmarks.md).
            empty = self._seal(b"")
            cursor = txn.cursor(db=self.runs_db)
            _, added = cursor.putmulti([(prefix + key, empty) for key in work.keys],
                                       append=work.append)
            if work.append and added != len(work.keys):
                raise StorageError(f"dedup index run {work.run} appended out of order")
        if work.delete:
            cursor = txn.cursor(db=self.runs_db)
            deleted = 0
            positioned = cursor.set_range(prefix)
            while positioned and cursor.key().startswith(prefix) and deleted < work.delete:
                cursor.delete()
                deleted += 1
                positioned = cursor.key() != b""
        fault_point("dedup.run_slice")
        for key, value in work.meta:
            txn.put(key, self._seal(value), db=self.meta_db)
        for key in work.drop_meta:
            txn.delete(key, db=self.meta_db)

    def run_numbers(self) -> list[int]:
        numbers: list[int] = []
        with self._reading("the dedup index"), self.env.begin(db=self.runs_db) as txn:
            cursor = txn.cursor()
            positioned = cursor.first()
            while positioned:
                number = RUN.unpack(cursor.key()[:RUN.size])[0]
                numbers.append(number)
                positioned = cursor.set_range(RUN.pack(number + 1)) if number < 0xFFFFFFFF \
                    else False
        return numbers

    def read_alerts(self, from_seq: int, max_count: int) -> list[bytes]:
        alerts: list[bytes] = []
        with (self._reading("the alert log"), self._resize_lock,
              self.env.begin(db=self.alerts_db) as txn):
            cursor = txn.cursor()
            if not cursor.set_range(LSN.pack(from_seq)):
                return alerts
            for value in cursor.iternext(keys=False, values=True):
                alerts.append(self._unseal(value, "stored alert"))
                if len(alerts) >= max_count:
                    break
        return alerts

    def _seal(self, value: bytes) -> bytes:
        """A stored value: its CRC-32 then the value (LMDB itself checks no data)."""
        if not self._checksums:
            return value
        return CHECKSUM.pack(zlib.crc32(value)) + value

    def _unseal(self, stored: bytes, what: str) -> bytes:
        if not self._checksums:
            return stored
        value = stored[CHECKSUM.size:]
        if len(stored) < CHECKSUM.size or CHECKSUM.unpack_from(stored)[0] != zlib.crc32(value):
            raise DataDirError(
                f"{what} in {str(self.path)!r} is corrupt (checksum mismatch): the data "
                "directory was damaged. Restore it from a backup; the engine will not "
                "start over it."
            )
        return value

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        try:
            yield
        except lmdb.Error as exc:
            raise DataDirError(
                f"reading {what} from {str(self.path)!r} failed: {exc}; the store may be "
                "corrupt: restore the directory from a backup"
            ) from None

    def close(self) -> None:
        try:
            self.env.close()
        finally:
            self._lock_file.close()

    # ------------------------------------------------------------ backup

    def backup(self, dest: str | os.PathLike[str]) -> StoredBackup:
        """Copy the whole store into a new data directory ``dest`` (the contract is
        ``Store.backup``'s); meant to run on a worker thread while the writer commits.

        ``Environment.copy(compact=True)`` walks every database inside one read
        transaction of its own, so the copy is that transaction's snapshot, however
        many databases the store has, while the WAL writer keeps committing. py-lmdb
        releases the GIL for the whole copy, so the event loop keeps running. The lsn
        the copy covers is read back from the copy itself: exactly its snapshot's.

        The copy is built in ``.NAME.backup-XXXXXXXX`` next to ``dest`` (so the final
        rename stays on one filesystem, whichever holds the store), fsynced, then
        renamed to ``dest``: a backup that stopped half way never looks like a data
        directory, and the temporary directory it leaves may be deleted.

        A map resize (``_write`` growing a full map) waits for the copy to end:
        py-lmdb 3.0 excludes ``set_mapsize`` while it copies (measured); an older one
        may not, so there the copy takes ``_resize_lock`` instead.
        """
        dest_path = Path(os.path.abspath(dest))
        try:
            _check_backup_dest(dest_path)
            building = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.backup-",
                                             dir=dest_path.parent))
        except (PermissionError, FileExistsError) as exc:  # a place we may not write
            raise InvalidRequest(f"cannot back up to {str(dest_path)!r}: {exc}") from None
        except OSError as exc:
            raise StorageError(f"cannot back up to {str(dest_path)!r}: {exc}") from None
        try:
            for name in BACKUP_EXTRA_FILES:
                try:
                    shutil.copyfile(self.path / name, building / name)
                except FileNotFoundError:
                    continue
                _fsync_file(building / name)
            lmdb_copy = building / LMDB_DIR
            lmdb_copy.mkdir()
            with _copy_guard(self._resize_lock):
                self.env.copy(str(lmdb_copy), compact=True)
            data_file = lmdb_copy / "data.mdb"
            _fsync_file(data_file)
            lsn = self._copied_lsn(lmdb_copy)
            with open(building / "LOCK", "wb") as lock_file:  # initialised, as a store's
                lock_file.write(INITIALISED_MARK)
                lock_file.flush()
                os.fsync(lock_file.fileno())
            _fsync_dir(lmdb_copy)
            _fsync_dir(building)
            size_bytes = data_file.stat().st_size
            try:
                os.rename(building, dest_path)  # onto nothing, or onto an empty directory
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise InvalidRequest(_backup_dest_taken(dest_path)) from None
                raise
        except (lmdb.Error, OSError) as exc:
            shutil.rmtree(building, ignore_errors=True)
            raise StorageError(
                f"backup to {str(dest_path)!r} failed, nothing was written there (the store "
                f"itself is untouched): {exc}"
            ) from None
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        try:
            _fsync_dir(dest_path.parent)
        except OSError as exc:
            raise StorageError(f"the backup {str(dest_path)!r} is complete, but the directory "
                               f"holding it could not be fsynced: {exc}") from None
        log.info("backup of %s written to %s: lsn %d, %d bytes", self.path, dest_path, lsn,
                 size_bytes)
        return StoredBackup(str(dest_path), lsn, size_bytes)

    def _copied_lsn(self, lmdb_copy: Path) -> int:
        """``last_lsn`` as the copy in ``lmdb_copy`` holds it (read-only, no lock file)."""
        env = lmdb.open(str(lmdb_copy), readonly=True, lock=False, max_dbs=MAX_DBS,
                        subdir=True, create=False)
        try:
            meta_db = env.open_db(b"meta", create=False)
            with env.begin(db=meta_db) as txn:
                raw = txn.get(b"last_lsn")
        finally:
            env.close()
        return 0 if raw is None else LSN.unpack(self._unseal(raw, "the backup's last_lsn"))[0]


REFUSED = ("the request was refused and nothing in it was applied; the engine keeps "
           "answering queries; retry once space is freed")


def _mib(size_bytes: int) -> str:
    return f"{size_bytes / (1 << 20):,.1f} MiB"


def _out_of_space(exc: lmdb.Error, path: Path, size_bytes: int) -> bool:
    """Whether a failed LMDB write means "the filesystem is full".

    Measured on Linux (tmpfs, LMDB 0.9.x through py-lmdb): a commit whose first write
    gets no byte raises ``lmdb.DiskError`` ("No space left on device"); one whose
    ``pwrite`` is cut short by the full disk raises a plain ``lmdb.Error``
    ("Input/output error": LMDB reports any short write as EIO). A real I/O error
    gives the same EIO, so EIO counts as full only if the filesystem has no room left
    for what the commit wrote.
    """
    message = str(exc)
    if isinstance(exc, lmdb.DiskError) or any(
        os.strerror(code) in message for code in _SPACE_ERRNOS
    ):
        return True
    if os.strerror(errno.EIO) not in message:
        return False
    try:
        stats = os.statvfs(path / LMDB_DIR)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < size_bytes + SPACE_SLACK_BYTES


def _unusable(lmdb_dir: Path, exc: lmdb.Error) -> str:
    return (f"cannot open the LMDB store in {str(lmdb_dir)!r}: {exc}. If the data directory "
            "was damaged, restore it from a backup.")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_backup_dest(dest: Path) -> None:
    """Refuse a backup destination that exists with content, or has no parent."""
    where = f"cannot back up to {str(dest)!r}"
    if not dest.parent.is_dir():
        raise InvalidRequest(f"{where}: its parent directory {str(dest.parent)!r} does not "
                             "exist; create it first")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise InvalidRequest(f"{where}: it exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise InvalidRequest(_backup_dest_taken(dest))


def _backup_dest_taken(dest: Path) -> str:
    return (f"cannot back up to {str(dest)!r}: it exists and is not empty; a backup never "
            "writes over files: name a new directory (or an empty one)")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_guard(resize_lock: threading.Lock) -> AbstractContextManager[object]:
    """What a copy on another thread holds against a map resize (see ``backup``)."""
    return nullcontext() if _LMDB_COPY_EXCLUDES_RESIZE else resize_lock


_LMDB_COPY_EXCLUDES_RESIZE = tuple(
    int(part) for part in re.findall(r"\d+", lmdb.__version__)[:2]) >= (3, 0)
