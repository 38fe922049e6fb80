"""The block cache: sealed history as shards read it, within a byte budget.

Runtime layer: the domain (blocks, series) and the store, read synchronously
(LMDB read transactions are short and never wait on the writer). Rules of this
file:

1. One cache per engine, one ``ShardBlocks`` reader per shard. A shard reads only
   its own part of each (meter, day); it adds blocks only while it seals or applies
   a correction that reaches sealed days (a new version of the day's block,
   ``ShardBlocks.replace``), inside its own mailbox turn (or recovery's replay,
   before any task runs).
2. A block a shard built is *unwritten* until the writer's checkpoint transaction
   that holds it committed: until then it is pinned (served from memory, never
   evicted) and every later checkpoint offers it again, so a checkpoint refused
   for a full disk loses nothing. A sealed block is pinned decoded, as the shard
   built it, and encoded (columns packed, msgpack, zlib: most of sealing's cost)
   on a worker thread by ``encode_in_background``, off every shard's turn; the
   block is never changed after it is pinned (a new version is a new object), so
   the thread reads it while shards answer queries from it. Whoever needs the
   bytes first (a checkpoint, a compaction's ``load_copy``) encodes them there if
   the thread has not yet: the same bytes either way.
3. Written blocks are decoded on demand and kept, most recently used last, until
   their estimated size passes ``budget_bytes``; eviction only drops the decoded
   copy, never data. A block has two decoded forms, cached apart under the one
   budget: its rollups (``BlockRollup``, whole-day partials: what day, week, month
   and whole-range queries in UTC read; a few hundred bytes per series-day, the
   packed distinct values for unique_count) and the full block with its minute
   columns (other windows, limits, compaction), decoded only when asked for. A
   *summary* (several days' rollups merged per series, for a span that holds all
   of them) is cached the same way and dropped whenever a block of its meter and
   shard is added, so it never outlives the blocks it was merged from; what a
   unique_count summary remembers of its lookups (``blocks.count_over_summary``)
   grows its size, counted again when it is next asked for.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict, deque
from typing import Any

import trio

from engine.domain.aggregates import UNIQUE
from engine.domain.blocks import (
    BlockRollup,
    block_bytes_estimate,
    block_key,
    decode_block,
    decode_rollups,
    encode_block,
    merge_rollups,
    parse_block_key,
    rollup_of,
)
from engine.domain.meters import MeterDef
from engine.domain.series import MeterShard
from engine.storage import Store

DEFAULT_BLOCK_CACHE_BYTES = 64 << 20
_FULL, _ROLLUP, _SUMMARY = 0, 1, 2  # the decoded forms of a block; merged rollups


class BlockCache:
    def __init__(self, store: Store, budget_bytes: int = DEFAULT_BLOCK_CACHE_BYTES) -> None:
        if type(budget_bytes) is not int or budget_bytes < 0:
            raise ValueError(f"block_cache_bytes must be a non-negative integer, got "
                             f"{budget_bytes!r}")
        self._store = store
        self.budget_bytes = budget_bytes
        self._days: dict[tuple[str, int], list[int]] = {}  # (meter, part) -> sorted days
        # (block key, _FULL or _ROLLUP) -> (decoded form, its estimated bytes)
        self._decoded: OrderedDict[tuple[bytes, int], tuple[Any, int]] = OrderedDict()
        # block key -> [decoded block, stored bytes (None until encoded), its rollups
        # once asked for, encode_block's arguments after the block]
        self._unwritten: dict[bytes, list[Any]] = {}
        self._to_encode: deque[bytes] = deque()  # keys of unwritten blocks, oldest first
        self._encoder_wake: trio.Event | None = None  # set while the encoder task runs
        # (meter, part) -> the cache keys of its summaries (merged rollups of several
        # days), all dropped when a block of that meter and part is added
        self._summaries: dict[tuple[str, int], list[tuple[bytes, int]]] = {}
        self.cached_bytes = 0
        self.hits = self.misses = 0
        self.block_count = 0

    def load_index(self) -> None:
        """Learn which blocks the store holds (keys only, no block is read)."""
        for key in self._store.block_keys():
            meter, day, part = parse_block_key(key)
            self._days.setdefault((meter, part), []).append(day)
            self.block_count += 1
        for days in self._days.values():
            days.sort()

    def reader(self, part: int, shard_count: int = 1) -> ShardBlocks:
        """Shard ``part``'s view (``shard_count``: what the blocks it writes record)."""
        return ShardBlocks(self, part, shard_count)

    # ------------------------------------------------------------ sealing

    def add(self, meter: str, day: int, part: int, block: MeterShard, raw: bytes | None,
            shard_count: int = 1, cover_lsn: int = 0) -> None:
        """A block a shard just built (a new day or a new version of one): pinned until
        written. ``raw`` None: encoded later (module rule 2) with ``shard_count`` and
        ``cover_lsn`` for ``encode_block``."""
        key = block_key(meter, day, part)
        days = self._days.setdefault((meter, part), [])
        if key not in self._unwritten and not self._known(days, day):
            insort(days, day)
            self.block_count += 1
        self._drop_decoded(key)
        self._unwritten[key] = [block, raw, None, (day, shard_count, part, cover_lsn)]
        if raw is None:
            self._to_encode.append(key)
            if self._encoder_wake is not None:
                self._encoder_wake.set()
        for summary_key in self._summaries.pop((meter, part), ()):
            self._drop_entry(summary_key)

    def unwritten_count(self) -> int:
        return len(self._unwritten)

    def unwritten(self) -> list[tuple[bytes, bytes]]:
        """Every block not yet in the store, for the next checkpoint's transaction."""
        return [(key, self._raw(entry)) for key, entry in sorted(self._unwritten.items())]

    def unencoded_count(self) -> int:
        return sum(entry[1] is None for entry in self._unwritten.values())

    def encoding_pending(self) -> bool:
        """Blocks wait for the encoder task, which runs (the writer waits for it before
        it seals more or checkpoints: ``WalWriter._waiting_for_encoder``)."""
        return self._encoder_wake is not None and any(
            entry[1] is None for entry in self._unwritten.values())

    async def encode_in_background(self) -> None:
        """The encoder task (module rule 2): one block at a time on a worker thread,
        oldest first, until cancelled."""
        self._encoder_wake = trio.Event()
        try:
            while True:
                while not self._to_encode:
                    await self._encoder_wake.wait()
                    self._encoder_wake = trio.Event()
                entry = self._unwritten.get(self._to_encode.popleft())
                if entry is None or entry[1] is not None:
                    continue  # written, replaced or encoded meanwhile
                raw = await trio.to_thread.run_sync(encode_block, entry[0], *entry[3])
                if entry[1] is None:
                    entry[1] = raw
        finally:
            self._encoder_wake = None

    def encode_now(self) -> None:
        """Encode every block still waiting for the encoder, in this turn."""
        for entry in self._unwritten.values():
            self._raw(entry)

    @staticmethod
    def _raw(entry: list[Any]) -> bytes:
        if entry[1] is None:
            entry[1] = encode_block(entry[0], *entry[3])
        return entry[1]  # type: ignore[no-any-return]

    def written(self, keys: list[bytes]) -> None:
        """These blocks are durable: unpin them. Their rollups stay cached if a query
        computed them, and so does the full block but for unique_count, whose minute
        buckets cost about a megabyte per block and that queries of whole days never
        read (the rollup section is read from the store when first asked for)."""
        for key in keys:
            entry = self._unwritten.pop(key, None)
            if entry is not None and self.budget_bytes:
                if entry[2] is not None:
                    self._keep(key, _ROLLUP, entry[2], entry[2].nbytes)
                if entry[0].meter.kind != UNIQUE:
                    self._keep(key, _FULL, entry[0], block_bytes_estimate(entry[0]))

    # ------------------------------------------------------------ reading

    def load(self, meter: MeterDef, day: int, part: int) -> MeterShard | None:
        key = block_key(meter.name, day, part)
        pinned = self._unwritten.get(key)
        if pinned is not None:
            return pinned[0]  # type: ignore[no-any-return]
        cached = self._decoded.get((key, _FULL))
        if cached is not None:
            self.hits += 1
            self._decoded.move_to_end((key, _FULL))
            return cached[0]  # type: ignore[no-any-return]
        self.misses += 1
        raw = self._store.read_block(key)
        if raw is None:
            return None
        _, block = decode_block(meter, raw)
        if self.budget_bytes:
            self._keep(key, _FULL, block, block_bytes_estimate(block))
        return block

    def load_rollup(self, meter: MeterDef, day: int, part: int) -> BlockRollup | None:
        key = block_key(meter.name, day, part)
        pinned = self._unwritten.get(key)
        if pinned is not None:
            if pinned[2] is None:
                pinned[2] = rollup_of(pinned[0], day)
            return pinned[2]  # type: ignore[no-any-return]
        cached = self._decoded.get((key, _ROLLUP))
        if cached is not None:
            self.hits += 1
            found: BlockRollup = cached[0]
            if found.nbytes != cached[1]:
                # It grew since it was counted (grouped partials it keeps for queries).
                self._keep(key, _ROLLUP, found, found.nbytes)
            else:
                self._decoded.move_to_end((key, _ROLLUP))
            return found
        self.misses += 1
        raw = self._store.read_block(key)
        if raw is None:
            return None
        rollup = decode_rollups(meter, raw)
        if self.budget_bytes:
            self._keep(key, _ROLLUP, rollup, rollup.nbytes)
        return rollup

    def load_summary(self, meter: MeterDef, days: list[int], part: int) -> BlockRollup | None:
        """The rollups of ``days`` merged per series, cached (dropped when a block of
        this meter and part is added: blocks change only so)."""
        if not self.budget_bytes:
            return None  # nothing to keep it in: the days' rollups one by one are cheaper
        key = (block_key(meter.name, days[0], part) + b"".join(
            day.to_bytes(4, "big") for day in days[1:]), _SUMMARY)
        cached = self._decoded.get(key)
        if cached is not None:
            self.hits += 1
            summary: BlockRollup = cached[0]
            if summary.nbytes != cached[1]:
                # It grew since it was counted (unique_count lookups it remembers).
                self._keep(key[0], _SUMMARY, summary, summary.nbytes)
            else:
                self._decoded.move_to_end(key)
            return summary
        rollups = []
        for day in days:
            rollup = self.load_rollup(meter, day, part)
            if rollup is None:
                return None
            rollups.append(rollup)
        summary = merge_rollups(meter, rollups)
        # The summary holds what its days' rollups hold, merged: they leave the cache
        # (a query of one day reads its rollup again, ~0.5 ms). Kept, they evicted the
        # summaries of a whole-history query's other shards before its next run: at 64
        # growth days the 8 shards' unique_count rollups were 64 MB, their summaries 37.
        for day in days:
            self._drop_entry((block_key(meter.name, day, part), _ROLLUP))
        self._keep(key[0], _SUMMARY, summary, summary.nbytes)
        keys = self._summaries.setdefault((meter.name, part), [])
        keys[:] = [known for known in keys if known in self._decoded]
        keys.append(key)
        return summary

    def load_copy(self, meter: MeterDef, day: int, part: int) -> MeterShard | None:
        key = block_key(meter.name, day, part)
        pinned = self._unwritten.get(key)
        raw = self._raw(pinned) if pinned is not None else self._store.read_block(key)
        return None if raw is None else decode_block(meter, raw)[1]

    def days(self, meter: str, part: int) -> list[int]:
        return self._days.get((meter, part), [])

    # ------------------------------------------------------------ budget

    def _keep(self, key: bytes, form: int, decoded: Any, size: int) -> None:
        entry = self._decoded.pop((key, form), None)
        if entry is not None:
            self.cached_bytes -= entry[1]
        self._decoded[(key, form)] = (decoded, size)
        self.cached_bytes += size
        while self.cached_bytes > self.budget_bytes and self._decoded:
            _, (_, evicted) = self._decoded.popitem(last=False)
            self.cached_bytes -= evicted

    def _drop_decoded(self, key: bytes) -> None:
        for form in (_FULL, _ROLLUP):
            self._drop_entry((key, form))

    def _drop_entry(self, entry_key: tuple[bytes, int]) -> None:
        entry = self._decoded.pop(entry_key, None)
        if entry is not None:
            self.cached_bytes -= entry[1]

    @staticmethod
    def _known(days: list[int], day: int) -> bool:
        index = bisect_left(days, day)
        return index < len(days) and days[index] == day


class ShardBlocks:
    """One shard's view of the cache (``engine.domain.blocks.BlockReader``)."""

    __slots__ = ("_cache", "_part", "_shard_count")

    def __init__(self, cache: BlockCache, part: int, shard_count: int = 1) -> None:
        self._cache = cache
        self._part = part
        self._shard_count = shard_count

    def days(self, meter: str) -> list[int]:
        return self._cache.days(meter, self._part)

    def load(self, meter: MeterDef, day: int) -> MeterShard | None:
        return self._cache.load(meter, day, self._part)

    def load_copy(self, meter: MeterDef, day: int) -> MeterShard | None:
        return self._cache.load_copy(meter, day, self._part)

    def load_rollup(self, meter: MeterDef, day: int) -> BlockRollup | None:
        return self._cache.load_rollup(meter, day, self._part)

    def load_summary(self, meter: MeterDef, days: list[int]) -> BlockRollup | None:
        return self._cache.load_summary(meter, days, self._part)

    def replace(self, meter: MeterDef, day: int, block: MeterShard, cover_lsn: int) -> None:
        """A corrected version of a day's block: encoded now, pinned until written; the
        day's cached forms and the meter's summaries on this shard are dropped
        (``BlockCache.add``)."""
        self._cache.add(meter.name, day, self._part, block,
                        encode_block(block, day, self._shard_count, self._part, cover_lsn))
