"""An in-memory store with the ``Store`` contract, for tests under a virtual clock.

Storage layer: standard library and ``engine.errors`` only. Not durable, by design.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace

from engine.errors import InvalidRequest, StorageError
from engine.storage.base import ID_VALUE, ExpirySlice, RunSlice, StoredBackup, StoredSnapshot


class MemoryStore:
    def __init__(self) -> None:
        self.wal: dict[int, bytes] = {}
        self.meta: dict[bytes, bytes] = {}
        self.snapshot: StoredSnapshot | None = None
        self.alerts: dict[int, bytes] = {}
        self.blocks: dict[bytes, bytes] = {}
        self.head: dict[bytes, bytes] = {}  # the head's hour chunks
        self.ids: dict[bytes, bytes] = {}  # the legacy dedup tree: key -> ID_VALUE
        self.runs: dict[int, list[bytes]] = {}  # the dedup index's sorted runs
        self._run_sets: dict[int, set[bytes]] = {}  # ... as sets, for lookups
        self.decisions: dict[int, bytes] = {}  # lsn -> logged dedup decisions
        self._last_lsn = 0
        self.commits = 0
        self.closed = False

    def commit(
        self,
        wal: list[tuple[int, bytes]],
        meta: list[tuple[bytes, bytes]],
        alerts: list[tuple[int, bytes]] | None = None,
        ids: list[tuple[bytes, bytes]] | None = None,
        decisions: list[tuple[int, bytes]] | None = None,
        run_slice: RunSlice | None = None,
    ) -> list[bool]:
        for lsn, _ in wal:
            if lsn <= self._last_lsn:
                raise StorageError(f"WAL append out of order at lsn {lsn}")
        if run_slice is not None:  # (checked before it changes anything)
            self.write_run(run_slice)
        known = self.ids
        duplicates = []
        for key, value in ids or []:
            duplicate = key in known
            if not duplicate:
                known[key] = value
            duplicates.append(duplicate)
        for lsn, record in wal:
            self.wal[lsn] = record
            self._last_lsn = lsn
        self.meta.update(meta)
        self.alerts.update(alerts or [])
        self.decisions.update(decisions or [])
        self.commits += 1
        return duplicates

    def read_decisions(self, lsn: int) -> bytes | None:
        return self.decisions.get(lsn)

    def runs_contain(self, pairs: list[tuple[int, bytes]]) -> list[bool]:
        return [key in self._run_sets.get(run, ()) for run, key in pairs]

    def read_run(self, run: int, after: bytes | None, max_keys: int) -> list[bytes]:
        keys = self.runs.get(run, [])
        start = 0 if after is None else bisect.bisect_right(keys, after)
        return keys[start:start + max_keys]

    def write_run(self, work: RunSlice) -> None:
        run, keys = work.run, list(work.keys)
        stored = self.runs.setdefault(run, [])
        # As LMDB's append: after the last key of every run, so no later run may have any.
        if keys and ((stored and keys[0] <= stored[-1]) or keys != sorted(set(keys))
                     or (work.append and any(other > run for other in self.runs))):
            raise StorageError(f"dedup index run {run} appended out of order")
        stored.extend(keys)
        members = self._run_sets.setdefault(run, set())
        members.update(keys)
        if work.delete:
            members.difference_update(stored[:work.delete])
            del stored[:work.delete]
        if not stored:
            del self.runs[run]
            del self._run_sets[run]
        self.meta.update(work.meta)
        for key in work.drop_meta:
            self.meta.pop(key, None)

    def run_numbers(self) -> list[int]:
        return sorted(self.runs)

    def read_ids(self, keys: list[bytes]) -> list[int | None]:
        values = [self.ids.get(key) for key in keys]
        return [None if value is None else ID_VALUE.unpack(value)[0] for value in values]

    def expire_ids(self, start_key: bytes, before_day: int, max_lsn: int,
                   max_keys: int) -> ExpirySlice:
        # Sorted on every slice: fine for a test fake, never for a real store.
        keys = sorted(key for key in self.ids if key >= start_key)
        deleted = 0
        for key in keys[:max_keys]:
            lsn, day = ID_VALUE.unpack(self.ids[key])
            if day < before_day and lsn <= max_lsn:
                del self.ids[key]
                deleted += 1
        next_key = keys[max_keys] if len(keys) > max_keys else None
        return ExpirySlice(next_key, min(len(keys), max_keys), deleted)

    def id_index_statistics(self) -> tuple[int, int]:
        return len(self.ids), (sum(len(k) + len(v) for k, v in self.ids.items())
                               + sum(len(k) for run in self.runs.values() for k in run))

    def needs_id_index(self) -> bool:
        return False

    def build_id_index(self, entries: list[tuple[bytes, bytes]]) -> None:
        self.ids = dict(entries)

    def read_wal(self, after_lsn: int) -> Iterator[tuple[int, bytes]]:
        for lsn in sorted(self.wal):
            if lsn > after_lsn:
                yield lsn, self.wal[lsn]

    def read_wal_page(self, from_lsn: int, max_records: int) -> list[tuple[int, bytes]]:
        lsns = sorted(lsn for lsn in self.wal if lsn >= from_lsn)[:max_records]
        return [(lsn, self.wal[lsn]) for lsn in lsns]

    def last_lsn(self) -> int:
        return self._last_lsn

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        return sorted((k, v) for k, v in self.meta.items() if k.startswith(prefix))

    def write_snapshot(self, snapshot: StoredSnapshot, blocks: Sequence[tuple[bytes, bytes]] = (),
                       trim_wal_through: int = 0, drop_blocks: Sequence[bytes] = (),
                       drop_head: Sequence[bytes] = (), reset_head: bool = False) -> None:
        if reset_head:
            self.head.clear()
        for key in drop_head:
            self.head.pop(key, None)
        self.head.update(snapshot.head)
        self.snapshot = snapshot
        for key in drop_blocks:
            self.blocks.pop(key, None)
        self.blocks.update(blocks)
        through = min(trim_wal_through, snapshot.lsn)
        for lsn in [lsn for lsn in self.wal if lsn <= through]:
            del self.wal[lsn]

    def block_keys(self) -> list[bytes]:
        return sorted(self.blocks)

    def read_block(self, key: bytes) -> bytes | None:
        return self.blocks.get(key)

    def first_lsn(self) -> int:
        return min(self.wal, default=0)

    def load_snapshot(self) -> StoredSnapshot | None:
        if self.snapshot is None:
            return None
        return replace(self.snapshot, head=sorted(self.head.items()))

    def read_alerts(self, from_seq: int, max_count: int) -> list[bytes]:
        seqs = sorted(seq for seq in self.alerts if seq >= from_seq)[:max_count]
        return [self.alerts[seq] for seq in seqs]

    def close(self) -> None:
        self.closed = True

    def backup(self, dest: str | os.PathLike[str]) -> StoredBackup:
        """Refused: a backup is a copy of a data directory, and this store has none.

        Writing this store out as an LMDB data directory would be a second writer of
        that format, to be kept in step with ``LmdbStore``'s; an engine meant to be
        backed up runs on a data directory.
        """
        raise InvalidRequest(
            f"cannot back up to {os.fspath(dest)!r}: this engine runs on an in-memory store "
            "(MemoryStore), which has no data directory to copy; open the engine with a "
            "data_dir to take backups"
        )
