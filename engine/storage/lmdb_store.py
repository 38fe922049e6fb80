"""LMDB-backed write-ahead log, meter catalogue and snapshots.

Storage layer: imports lmdb and the standard library only. One process owns a
data directory (an exclusive ``flock`` on ``LOCK``); within it, one task (the
WAL writer) calls ``commit`` and ``write_snapshot``, each a complete write
transaction within one call (an LMDB write transaction must begin and end on
one thread).

Layout of ``DATA_DIR/lmdb`` (named databases):

- ``wal``: 8-byte big-endian lsn → one encoded batch. Appended with
  ``append=True`` (whose ``False`` return on an out-of-order key is checked).
- ``meta``: ``format`` → format version; ``last_lsn`` → 8-byte lsn; ``meter:NAME``
  → encoded ``Meter``.
- ``snapshot``: ``header`` → encoded (lsn, shard count, part count);
  ``part`` + 4-byte index → one shard's encoded state; ``engine`` → engine-wide state.
- ``alerts``: 8-byte big-endian seq → one encoded alert.

The environment is opened with ``sync=True, metasync=True``: a returned commit
has been fsynced.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from io import BufferedRandom
from pathlib import Path

import lmdb
import msgspec

from engine.errors import DataDirError, StorageError, StorageFull
from engine.storage.base import FORMAT_VERSION, StoredSnapshot

log = logging.getLogger(__name__)

LSN = struct.Struct(">Q")
PART_INDEX = struct.Struct(">I")
OUR_ENTRIES = {"lmdb", "LOCK"}
DEFAULT_MAP_BYTES = 1 << 30
DEFAULT_MAX_MAP_BYTES = 1 << 40


class LmdbStore:
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        map_bytes: int = DEFAULT_MAP_BYTES,
        max_map_bytes: int = DEFAULT_MAX_MAP_BYTES,
    ) -> None:
        self.path = Path(data_dir)
        self.max_map_bytes = max_map_bytes
        # LMDB may only be resized while no transaction is open in the process: should
        # a reader ever run on another thread, it and the resize take this lock.
        self._resize_lock = threading.Lock()
        self._lock_file = self._lock(self.path)
        try:
            self._open(map_bytes)
        except BaseException:
            self._lock_file.close()
            raise

    @staticmethod
    def _lock(path: Path) -> BufferedRandom:
        try:
            path.mkdir(parents=True, exist_ok=True)
            foreign = sorted(p.name for p in path.iterdir() if p.name not in OUR_ENTRIES)
        except OSError as exc:
            raise DataDirError(f"cannot use data directory {str(path)!r}: {exc}") from None
        if foreign and not (path / "lmdb").exists():
            raise DataDirError(
                f"{str(path)!r} is not a metering-engine data directory (it holds "
                f"{', '.join(foreign[:5])}); refusing to start over existing files"
            )
        lock_file = open(path / "LOCK", "a+b")
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise DataDirError(
                f"data directory {str(path)!r} is in use by another engine process"
            ) from None
        return lock_file

    def _open(self, map_bytes: int) -> None:
        lmdb_dir = self.path / "lmdb"
        existed = (lmdb_dir / "data.mdb").exists()
        try:
            self.env = lmdb.open(
                str(lmdb_dir),
                map_size=map_bytes,
                max_dbs=5,
                sync=True,
                metasync=True,
                subdir=True,
                readahead=False,
                max_spare_txns=2,
            )
            # Grow to the size the file already has, if it was grown before.
            info_size = self.env.info()["map_size"]
            if info_size < map_bytes:
                self.env.set_mapsize(map_bytes)
            self.wal_db = self.env.open_db(b"wal")
            self.meta_db = self.env.open_db(b"meta")
            self.snapshot_db = self.env.open_db(b"snapshot")
            self.alerts_db = self.env.open_db(b"alerts")
            with self.env.begin(write=True) as txn:
                version = txn.get(b"format", db=self.meta_db)
                if version is None:
                    if existed and (
                        txn.stat(self.wal_db)["entries"] or txn.stat(self.snapshot_db)["entries"]
                    ):
                        raise DataDirError(
                            f"{str(lmdb_dir)!r} holds data but no format marker: not ours"
                        )
                    txn.put(b"format", FORMAT_VERSION, db=self.meta_db)
                elif version != FORMAT_VERSION:
                    raise DataDirError(
                        f"{str(lmdb_dir)!r} was written in format {version!r}; this engine "
                        f"reads {FORMAT_VERSION!r}. Use a matching engine version."
                    )
        except lmdb.Error as exc:
            raise DataDirError(f"cannot open LMDB store in {str(lmdb_dir)!r}: {exc}") from None

    # ------------------------------------------------------------ writing

    def commit(
        self,
        wal: list[tuple[int, bytes]],
        meta: list[tuple[bytes, bytes]],
        alerts: list[tuple[int, bytes]] | None = None,
    ) -> None:
        self._write(self._commit_txn, wal, meta, alerts or [])

    def _commit_txn(
        self,
        txn: lmdb.Transaction[bytes],
        wal: list[tuple[int, bytes]],
        meta: list[tuple[bytes, bytes]],
        alerts: list[tuple[int, bytes]],
    ) -> None:
        for seq, alert in alerts:
            txn.put(LSN.pack(seq), alert, db=self.alerts_db)
        if wal:
            cursor = txn.cursor(db=self.wal_db)
            for lsn, record in wal:
                if not cursor.put(LSN.pack(lsn), record, append=True):
                    raise StorageError(f"WAL append out of order at lsn {lsn}")
            txn.put(b"last_lsn", LSN.pack(wal[-1][0]), db=self.meta_db)
        for key, value in meta:
            txn.put(key, value, db=self.meta_db)

    def write_snapshot(self, snapshot: StoredSnapshot) -> None:
        self._write(self._snapshot_txn, snapshot)

    def _snapshot_txn(self, txn: lmdb.Transaction[bytes], snapshot: StoredSnapshot) -> None:
        txn.drop(self.snapshot_db, delete=False)
        for index, part in enumerate(snapshot.parts):
            txn.put(b"part" + PART_INDEX.pack(index), part, db=self.snapshot_db)
        header = msgspec.msgpack.encode([snapshot.lsn, snapshot.shard_count, len(snapshot.parts)])
        txn.put(b"header", header, db=self.snapshot_db)
        txn.put(b"engine", snapshot.engine_state, db=self.snapshot_db)
        cursor = txn.cursor(db=self.wal_db)
        last_key = LSN.pack(snapshot.lsn)
        if cursor.first():
            while cursor.key() <= last_key:
                if not cursor.delete():
                    break

    def _write(self, body: Callable[..., None], *args: object) -> None:
        """Run ``body(txn, *args)`` in one write transaction, growing the map when full."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    body(txn, *args)
                return
            except lmdb.MapFullError:
                size = self.env.info()["map_size"]
                if size >= self.max_map_bytes:
                    raise StorageFull(
                        f"LMDB map is full at {size} bytes (max_map_bytes={self.max_map_bytes}); "
                        "the batch was not applied"
                    ) from None
                new_size = min(size * 2, self.max_map_bytes)
                log.info("LMDB map full at %d bytes, growing to %d", size, new_size)
                with self._resize_lock:
                    self.env.set_mapsize(new_size)
            except lmdb.Error as exc:
                if _is_disk_full(exc):
                    raise StorageFull(
                        f"disk full writing {str(self.path)!r}: the batch was not applied"
                    ) from None
                raise StorageError(f"LMDB write failed: {exc}") from None

    # ------------------------------------------------------------ reading

    def read_wal(self, after_lsn: int) -> Iterator[tuple[int, bytes]]:
        with self.env.begin(db=self.wal_db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(LSN.pack(after_lsn + 1)):
                return
            for key, value in cursor:
                yield LSN.unpack(key)[0], value

    def last_lsn(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(b"last_lsn", db=self.meta_db)
        return 0 if raw is None else LSN.unpack(raw)[0]

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        with self.env.begin(db=self.meta_db) as txn:
            cursor = txn.cursor()
            items = []
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    items.append((key, value))
        return items

    def load_snapshot(self) -> StoredSnapshot | None:
        with self.env.begin(db=self.snapshot_db) as txn:
            header = txn.get(b"header")
            if header is None:
                return None
            try:
                lsn, shard_count, part_count = msgspec.msgpack.decode(header)
            except (msgspec.DecodeError, ValueError, TypeError):
                raise DataDirError("snapshot header is corrupt") from None
            parts = []
            for index in range(part_count):
                part = txn.get(b"part" + PART_INDEX.pack(index))
                if part is None:
                    raise DataDirError(f"snapshot part {index} of {part_count} is missing")
                parts.append(part)
            engine_state = txn.get(b"engine") or b""
        return StoredSnapshot(lsn, shard_count, parts, engine_state)

    def read_alerts(self, from_seq: int, max_count: int) -> list[bytes]:
        alerts: list[bytes] = []
        with self._resize_lock, self.env.begin(db=self.alerts_db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(LSN.pack(from_seq)):
                return alerts
            for value in cursor.iternext(keys=False, values=True):
                alerts.append(value)
                if len(alerts) >= max_count:
                    break
        return alerts

    def close(self) -> None:
        try:
            self.env.close()
        finally:
            self._lock_file.close()


def _is_disk_full(exc: lmdb.Error) -> bool:
    return isinstance(exc, lmdb.DiskError) or f"[Errno {errno.ENOSPC}]" in str(exc) or (
        "No space left" in str(exc)
    )
