"""The storage contract shared by ``LmdbStore`` and ``MemoryStore``.

Storage layer: standard library only.

Keys of the write-ahead log are log sequence numbers (``lsn``), starting at 1
and gap-free. ``commit`` is all-or-nothing and durable when it returns.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

# Format 5: format 4 with the dedup index as sorted runs (``idruns``) and the logged
# dedup decisions (``dups``; ``engine.runtime.idindex``); a format-3 or format-4 store is
# marked format 5 when it is opened (its ``ids`` tree is still read until it expires).
# Format 4: format 3 with the head's checkpoint in hour chunks (the ``head`` database;
# ``engine.domain.head``). Format 3: format 2 plus the dedup index (the ``ids``
# database). Format 2: every stored value starts with the CRC-32 of the rest. A format-3
# store is marked format 4 when it is opened (its whole-head checkpoint is still read,
# and the next checkpoint writes chunks); a format-2 store is migrated to format 4 when
# it is opened (``build_id_index``); format 1 (no checksums) is still read, gets the
# index the same way, and keeps being written as format 1. A format-3 engine refuses a
# format-4 store (it would not see the head's chunks).
FORMAT_VERSION = b"metering-engine/5"
HEAD_FORMAT_VERSION = b"metering-engine/4"
DEDUP_FORMAT_VERSION = b"metering-engine/3"
PREVIOUS_FORMAT_VERSION = b"metering-engine/2"
LEGACY_FORMAT_VERSION = b"metering-engine/1"

# A dedup index entry's value: the lsn of the first batch that carried the id, and that
# batch's arrival day (``received_ms // DAY_MS``), which expiry reads.
ID_VALUE = struct.Struct(">QI")
ARRIVAL_DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class ExpirySlice:
    """What one ``expire_ids`` call did: where the next slice starts (``None``: the pass
    reached the end of the index), how many entries it looked at and deleted."""

    next_key: bytes | None
    examined: int
    deleted: int


@dataclass(frozen=True, slots=True)
class RunSlice:
    """One slice of the dedup index's background work (``engine.runtime.idindex``):
    append ``keys`` (sorted, after every key of every run; with ``append=False`` only
    after the run's own keys: a later run has some) to run ``run``, put the
    catalogue entries ``meta``, delete ``drop_meta``, and delete up to ``delete``
    entries of the run."""

    run: int
    keys: Sequence[bytes] = ()
    meta: Sequence[tuple[bytes, bytes]] = ()
    drop_meta: Sequence[bytes] = ()
    delete: int = 0
    append: bool = True


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    lsn: int  # the snapshot reflects every WAL record up to and including this lsn
    shard_count: int
    parts: list[bytes]  # one encoded part per shard
    engine_state: bytes = b""  # engine-wide state (limits, next alert seq)
    # The head's hour chunks as (key, encoded MeterPart) (``engine.domain.head``): as
    # loaded, every stored chunk; as written, the chunks this checkpoint puts.
    head: Sequence[tuple[bytes, bytes]] = ()


class Store(Protocol):
    def commit(
        self,
        wal: list[tuple[int, bytes]],
        meta: list[tuple[bytes, bytes]],
        alerts: list[tuple[int, bytes]] | None = None,
        ids: list[tuple[bytes, bytes]] | None = None,
        decisions: list[tuple[int, bytes]] | None = None,
        run_slice: RunSlice | None = None,
    ) -> list[bool]:
        """Durably append WAL records (in lsn order), put meta entries, alerts, logged
        dedup ``decisions`` (lsn, encoded), a slice of dedup index work and legacy
        dedup index entries, atomically;
        return one flag per ``ids`` entry: True if its key was already in the legacy
        tree (a duplicate), which then keeps its old value.

        ``ids`` are (key, ``ID_VALUE``) pairs, put in order without overwriting, so a
        key repeated within ``ids`` is a duplicate from its second occurrence on.
        Alerts are keyed by seq; putting an alert again with the same seq is allowed
        (replay regenerates identical alerts).
        """

    def read_ids(self, keys: list[bytes]) -> list[int | None]:
        """The stored lsn of each dedup key in the legacy tree (``None``: not in it)."""

    def read_decisions(self, lsn: int) -> bytes | None:
        """The dedup decisions ``commit`` logged for batch ``lsn`` (``None``: no event
        of it was a duplicate)."""

    def runs_contain(self, pairs: list[tuple[int, bytes]]) -> list[bool]:
        """For each (run, key): is the key in that sorted run of the dedup index."""

    def read_run(self, run: int, after: bytes | None, max_keys: int) -> list[bytes]:
        """Up to ``max_keys`` keys of a run, in order, after ``after`` (None: from the start)."""

    def write_run(self, work: RunSlice) -> None:
        """One slice of dedup index work in a durable write transaction of its own (what
        ``commit(..., run_slice=...)`` does within a group's)."""

    def run_numbers(self) -> list[int]:
        """Every run that has entries, in order."""

    def expire_ids(self, start_key: bytes, before_day: int, max_lsn: int,
                   max_keys: int) -> ExpirySlice:
        """One bounded slice of an expiry pass, in one write transaction: from the first
        key >= ``start_key``, look at up to ``max_keys`` entries and delete those whose
        arrival day is < ``before_day`` and whose lsn is <= ``max_lsn``."""

    def id_index_statistics(self) -> tuple[int, int]:
        """(entries of the legacy tree, bytes of the pages of the tree and the runs)."""

    def needs_id_index(self) -> bool:
        """True if the store predates the dedup index (format 1 or 2 without ``ids``)."""

    def build_id_index(self, entries: list[tuple[bytes, bytes]]) -> None:
        """In one write transaction: create (or empty) the dedup index, put ``entries``
        and mark the store as having it (format 3; a format-1 store stays format 1)."""

    def read_alerts(self, from_seq: int, max_count: int) -> list[bytes]:
        """Stored alerts with seq >= ``from_seq``, in order, at most ``max_count``."""

    def read_wal(self, after_lsn: int) -> Iterator[tuple[int, bytes]]:
        """WAL records with lsn > ``after_lsn``, in order."""

    def read_wal_page(self, from_lsn: int, max_records: int) -> list[tuple[int, bytes]]:
        """Up to ``max_records`` WAL records with lsn >= ``from_lsn``, in order; safe while
        the engine writes (the raw-event log's readers)."""

    def last_lsn(self) -> int:
        """The largest lsn ever committed (kept even after truncation)."""

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]: ...

    def write_snapshot(self, snapshot: StoredSnapshot, blocks: Sequence[tuple[bytes, bytes]] = (),
                       trim_wal_through: int = 0, drop_blocks: Sequence[bytes] = (),
                       drop_head: Sequence[bytes] = (), reset_head: bool = False) -> None:
        """Durably replace the snapshot and put ``blocks`` (key, value), in one
        transaction; drop WAL records up to ``trim_wal_through`` (never past the
        snapshot's lsn; 0: drop none), possibly in several calls; delete the blocks
        ``drop_blocks`` first (resharding). The head's chunks: delete ``drop_head``
        (every stored chunk first with ``reset_head``), then put ``snapshot.head``."""

    def block_keys(self) -> list[bytes]:
        """The keys of every sealed block, sorted."""

    def read_block(self, key: bytes) -> bytes | None: ...

    def first_lsn(self) -> int:
        """The oldest lsn still in the write-ahead log (0 if it is empty)."""

    def load_snapshot(self) -> StoredSnapshot | None: ...

    def close(self) -> None: ...

    def backup(self, dest: str | os.PathLike[str]) -> StoredBackup:
        """Write a consistent copy of the whole store as a new data directory ``dest``.

        ``dest`` must not exist, or be an empty directory, and its parent must exist.
        The copy is one read transaction's view: it holds exactly the WAL up to some
        lsn (``StoredBackup.lsn``), so every commit that returned before the call is
        in it. It is built under a temporary name next to ``dest`` and renamed into
        place when complete and fsynced. May be called from another thread while the
        WAL writer commits. Raises ``InvalidRequest`` for a ``dest`` it refuses,
        ``StorageError`` if writing the copy failed (nothing is left at ``dest``).
        """


@dataclass(frozen=True, slots=True)
class StoredBackup:
    path: str  # the data directory written
    lsn: int  # the copy holds every WAL record up to and including this lsn, and no later one
    size_bytes: int  # the size of the copied store file
