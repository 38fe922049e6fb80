"""The storage contract shared by ``LmdbStore`` and ``MemoryStore``.

Keys of the write-ahead log are log sequence numbers (``lsn``), starting at 1
and gap-free. ``commit`` is all-or-nothing and durable when it returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

FORMAT_VERSION = b"metering-engine/1"


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    lsn: int  # the snapshot reflects every WAL record up to and including this lsn
    shard_count: int
    parts: list[bytes]  # one encoded part per shard


class Store(Protocol):
    #: True if calls block on disk and should run in a worker thread.
    blocking: bool

    def commit(self, wal: list[tuple[int, bytes]], meta: list[tuple[bytes, bytes]]) -> None:
        """Durably append WAL records (in lsn order) and put meta entries, atomically."""

    def read_wal(self, after_lsn: int) -> Iterator[tuple[int, bytes]]:
        """WAL records with lsn > ``after_lsn``, in order."""

    def last_lsn(self) -> int:
        """The largest lsn ever committed (kept even after truncation)."""

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]: ...

    def write_snapshot(self, snapshot: StoredSnapshot) -> None:
        """Durably replace the snapshot and drop WAL records it covers."""

    def load_snapshot(self) -> StoredSnapshot | None: ...

    def close(self) -> None: ...
