"""The dedup index as a log-structured merge tree: recent ids in memory, older ones in
immutable sorted runs on disk, each with a Bloom filter in memory.

Runtime layer: the standard library, numpy and xxhash (the filters) and the storage
contract's answers (the WAL writer and recovery pass a ``Store`` in; this module never awaits).

Why: the index was one LMDB B-tree keyed by (meter, customer, unique id). Unique ids
are random, so every id put in a group commit dirtied a page of its own once the tree
outgrew the group: about 16 MB written and fsynced for a group of 4,000 ids, on the
ack path. Now a group commit writes no page of the index at random:

- **Memtable.** The ids accepted since the last flush, in a dict (key -> arrival day).
  Its log is the WAL itself: every batch carries its ids, and recovery rebuilds the
  memtable from the WAL after the last flushed lsn (``flushed_lsn``).
- **Decisions are logged.** The writer records, in the group's own commit, which events
  of a batch were duplicates (``dups`` database: lsn -> event indices), so replay
  never recomputes a decision from an index whose runs may have been merged or dropped
  since: the decision stays atomic with the durable write, and replay is exact.
- **Runs.** At a checkpoint, when the arrival day changes, or when the memtable holds
  ``MEMTABLE_MAX_KEYS``, the memtable is frozen and written as one sorted run, keys
  appended in order (``run(4) + key``: sequential pages), in bounded slices, each
  carried by a group commit's transaction (``prepare`` / ``committed``; alone only
  while the engine is idle). The frozen memtable answers lookups until the run's last
  slice commits its metadata and filter.
- **Filters.** Each run has a Bloom filter of ``BITS_PER_KEY`` bits per id (1.25 bytes,
  about 1 % false positives), loaded at start; a lookup reads a run only on a filter
  hit. The memory per remembered id after the memtable is that filter.
- **Merges.** When more than ``MAX_RUNS`` runs exist, ``MERGE_FANIN`` neighbouring runs
  are merged into one (a streaming merge in slices), so a lookup checks a bounded
  number of filters. A merge never makes a run span more than ``MAX_RUN_SPAN_DAYS`` of
  arrival days, so expiry stays fine-grained.
- **Expiry.** A run whose newest arrival day lies before the horizon is dropped whole:
  its metadata first (it is no longer consulted), then its entries in slices.

A key is a duplicate iff it is in the memtable, the frozen memtable, a run (filter hit
confirmed by a read), the legacy B-tree of older stores (``ids`` database, read while
it has entries, expired as before), or earlier in the same group.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import msgspec
import numpy as np
from xxhash import xxh3_128_digest

from engine.storage.base import RunSlice

RUN = struct.Struct(">I")
LSN = struct.Struct(">Q")
# Meta entries: ``idrun:`` + run -> RunMeta; ``idbloom:`` + run -> the filter's bits.
RUN_META_PREFIX = b"idrun:"
BLOOM_PREFIX = b"idbloom:"
FLUSHED_LSN_KEY = b"ids_flushed_lsn"  # every batch up to it is in a run (or the legacy tree)
DECIDED_FROM_KEY = b"ids_decided_from"  # batches from this lsn on have logged decisions
MAX_RUN_KEY_BYTES = 511 - RUN.size
BITS_PER_KEY = 10
HASHES = 7
MEMTABLE_MAX_KEYS = 1 << 18  # about 35 MB of keys in memory
SORTED_MERGE_MAX = 1 << 16
SLICE_KEYS = 4096  # keys written, merged or deleted per slice (a few ms)
MAX_RUNS = 12
MERGE_FANIN = 4
MAX_RUN_SPAN_DAYS = 7
# The background work an accepted id causes over its life: its flush writes it once,
# merges write it again and delete it from their sources (about twice each), expiry
# deletes it. A slice carried by a group commit does this many keys of work per id of
# the group, so the work keeps up with any ingest rate instead of falling behind (a
# merge holds the next flush back, and the memtable grows meanwhile); four times as
# many while the memtable is over its bound, to catch up.
BACKGROUND_KEYS_PER_ID = 4


class RunStore(Protocol):
    """What the index reads and writes (``engine.storage.base.Store`` has it)."""

    def runs_contain(self, pairs: list[tuple[int, bytes]]) -> list[bool]: ...

    def read_run(self, run: int, after: bytes | None, max_keys: int) -> list[bytes]: ...

    def write_run(self, work: RunSlice) -> None: ...

    def run_numbers(self) -> list[int]: ...

    def read_ids(self, keys: list[bytes]) -> list[int | None]: ...


class RunMeta(msgspec.Struct, array_like=True, frozen=True):
    count: int
    min_day: int
    max_day: int


def run_key(key: bytes) -> bytes:
    """A dedup key as the runs store it: itself if it fits after the 4-byte run number
    (LMDB keys hold 511 bytes), else its first bytes, 0xFE and its 16-byte blake2b
    digest. 0xFE never occurs in UTF-8 nor at that place of a hashed ``id_key``, so a
    shortened key never equals a kept one; two shortened keys are equal only if their
    digests are (the chance ``dedup.id_key`` states)."""
    if len(key) <= MAX_RUN_KEY_BYTES:
        return key
    digest = hashlib.blake2b(key, digest_size=16).digest()
    return key[:MAX_RUN_KEY_BYTES - 17] + b"\xfe" + digest


def fingerprints(keys: Iterable[bytes]) -> np.ndarray:
    """Two 64-bit hashes per key, shape (n, 2): the filter's double hashing. XXH3-128,
    whose output is fixed by its specification (stored filters depend on it); about a
    fifth of blake2b's cost per short key."""
    raw = b"".join(map(xxh3_128_digest, keys))
    return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2)


def _positions(prints: np.ndarray, bit_count: int) -> np.ndarray:
    """The filter's bit positions of each key, shape (n, HASHES)."""
    steps = np.arange(HASHES, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = prints[:, :1] + steps * (prints[:, 1:] | np.uint64(1))
    return mixed % np.uint64(bit_count)


@dataclass(slots=True)
class Bloom:
    bits: np.ndarray  # uint8, bit i is bit (i & 7) of byte i >> 3

    @classmethod
    def empty(cls, count: int) -> Bloom:
        """A filter sized for ``count`` keys (filled slice by slice while a run is written)."""
        return cls(np.zeros(max(8, -(-count * BITS_PER_KEY // 64) * 8), dtype=np.uint8))

    @classmethod
    def build(cls, prints: np.ndarray) -> Bloom:
        bloom = cls.empty(len(prints))
        bloom.add(prints)
        return bloom

    @classmethod
    def from_bytes(cls, raw: bytes) -> Bloom:
        return cls(np.frombuffer(raw, dtype=np.uint8).copy())

    def to_bytes(self) -> bytes:
        return self.bits.tobytes()

    def add(self, prints: np.ndarray) -> None:
        positions = _positions(prints, len(self.bits) * 8).ravel()
        np.bitwise_or.at(self.bits, positions >> np.uint64(3),
                         np.left_shift(np.uint8(1), (positions & np.uint64(7)).astype(np.uint8)))

    def may_contain(self, prints: np.ndarray) -> np.ndarray:
        positions = _positions(prints, len(self.bits) * 8)
        bits = (self.bits[positions >> np.uint64(3)]
                >> (positions & np.uint64(7)).astype(np.uint8)) & np.uint8(1)
        return np.asarray(bits.all(axis=1))

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)


@dataclass(slots=True)
class Run:
    number: int
    meta: RunMeta
    bloom: Bloom


@dataclass(slots=True)
class Flush:
    """Writing the frozen memtable as run ``number`` (given when the job starts: runs are
    written in number order, so every run's keys are appended after all others)."""

    lsn: int  # every batch up to it is in the frozen memtable, a run or the legacy tree
    keys: Iterator[bytes]
    days: tuple[int, int]
    bloom: Bloom
    written: int = 0
    number: int = -1
    pending: list[bytes] | None = None  # the keys of the slice prepared, not yet durable
    pending_last: bool = False  # ... and whether they are the run's last


@dataclass(slots=True)
class Merge:
    """Merging ``sources`` (neighbouring runs) into run ``number`` (given when it starts)."""

    sources: list[Run]
    after: list[bytes | None]  # per source: the last key taken (None: none yet)
    done: list[bool]
    bloom: Bloom
    written: int = 0
    last: bytes | None = None
    number: int = -1
    # False once a flush went first: a later run then has keys, so this one's are put
    # in place rather than appended.
    appending: bool = True


@dataclass(slots=True)
class Drop:
    """Deleting the entries of run ``number`` (no longer consulted)."""

    number: int


Job = Flush | Merge | Drop


class IdIndex:
    def __init__(self, runs: list[Run], orphans: list[int], next_run: int, flushed_lsn: int,
                 legacy_entries: int) -> None:
        self.memtable: dict[bytes, int] = {}
        self._memtable_days: tuple[int, int] | None = None
        # Sorted runs of memtable keys, merged as a binary counter (so freezing is one
        # lazy k-way merge, never one big sort holding the interpreter).
        self._sorted: list[list[bytes]] = []
        self.frozen: dict[bytes, int] = {}
        self.runs = runs
        self.next_run = next_run
        self.flushed_lsn = flushed_lsn
        self.legacy_entries = legacy_entries  # > 0: the legacy tree is read too
        self.jobs: list[Job] = [Drop(number) for number in orphans]
        self.job: Job | None = None
        self._apply: Callable[[], None] | None = None  # what the prepared slice changes

    # ------------------------------------------------------------ deciding

    def decide(self, store: RunStore, keys: list[bytes], days: list[int]
               ) -> tuple[list[bool], dict[bytes, int]]:
        """The duplicate flag of each key (``dedup.batch_keys`` keys, in order) and the
        new run keys with their arrival days, to ``accept`` once the group is durable."""
        memtable, frozen = self.memtable, self.frozen
        run_keys = [key if len(key) <= MAX_RUN_KEY_BYTES else run_key(key) for key in keys]
        unknown = {rkey: key for rkey, key in zip(run_keys, keys, strict=True)
                   if rkey not in memtable and rkey not in frozen}
        known = self._on_disk(store, unknown) if unknown else set()
        flags: list[bool] = []
        new: dict[bytes, int] = {}
        for rkey, day in zip(run_keys, days, strict=True):
            duplicate = rkey in memtable or rkey in frozen or rkey in known or rkey in new
            if not duplicate:
                new[rkey] = day
            flags.append(duplicate)
        return flags, new

    def _on_disk(self, store: RunStore, unknown: dict[bytes, bytes]) -> set[bytes]:
        """Of ``unknown`` (run key -> index key), the run keys the runs or the legacy
        tree hold."""
        found: set[bytes] = set()
        rkeys = list(unknown)
        if self.runs:
            prints = fingerprints(rkeys)
            pairs = []
            for run in self.runs:
                for index in np.flatnonzero(run.bloom.may_contain(prints)):
                    pairs.append((run.number, rkeys[index]))
            if pairs:
                hits = store.runs_contain(pairs)
                found.update(rkey for (_, rkey), hit in zip(pairs, hits, strict=True) if hit)
        if self.legacy_entries:
            rest = [rkey for rkey in rkeys if rkey not in found]
            lsns = store.read_ids([unknown[rkey] for rkey in rest])
            found.update(rkey for rkey, lsn in zip(rest, lsns, strict=True) if lsn is not None)
        return found

    def accept(self, new: dict[bytes, int]) -> None:
        """Remember keys a durable commit accepted."""
        memtable = self.memtable
        new = {key: day for key, day in new.items() if key not in memtable}
        if not new:
            return
        memtable.update(new)
        low, high = min(new.values()), max(new.values())
        if self._memtable_days is not None:
            low, high = min(low, self._memtable_days[0]), max(high, self._memtable_days[1])
        self._memtable_days = (low, high)
        stack = self._sorted
        stack.append(sorted(new))
        # Timsort merges two sorted runs in one pass, in C; lists past SORTED_MERGE_MAX
        # keys stay apart (a merge of them would hold the event loop), so the lazy
        # k-way merge at freezing has a few of them plus a binary counter's worth.
        while (len(stack) > 1 and len(stack[-2]) <= 2 * len(stack[-1])
               and len(stack[-2]) + len(stack[-1]) <= SORTED_MERGE_MAX):
            top = stack.pop()
            stack[-1] = sorted(stack[-1] + top)

    # ------------------------------------------------------------ background work

    def new_day(self, new: dict[bytes, int]) -> bool:
        """Whether ``new`` arrived on a later day than the memtable's keys: the memtable is
        then frozen first, so a run holds one arrival day and expires with it."""
        return (bool(new) and self._memtable_days is not None
                and max(new.values()) > self._memtable_days[1])

    def freeze(self, lsn: int) -> bool:
        """Start writing the memtable as a run, if it holds keys and none is being
        written; ``lsn``: every batch up to it has been accepted into it."""
        if not self.memtable or self.frozen or self._memtable_days is None:
            return False
        self.frozen, self.memtable = self.memtable, {}
        stack, self._sorted = self._sorted, []
        days, self._memtable_days = self._memtable_days, None
        self.jobs.insert(0, Flush(lsn, heapq.merge(*stack), days, Bloom.empty(len(self.frozen))))
        return True

    def flushed_meta(self, lsn: int) -> list[tuple[bytes, bytes]]:
        """With nothing in memory, every batch up to ``lsn`` is in the runs: the catalogue
        entry that says so (put by the caller's commit), so a restart rebuilds no memtable
        from before it."""
        if self.memtable or self.frozen or self.flushed_lsn >= lsn:
            return []
        self.flushed_lsn = lsn
        return [(FLUSHED_LSN_KEY, LSN.pack(lsn))]

    def expire(self, before_day: int) -> None:
        """Drop the runs wholly before ``before_day`` (their metadata at the next slice)."""
        for run in self.runs:
            if run.meta.max_day < before_day and not self._busy(run.number):
                self.jobs.append(Drop(run.number))

    def _busy(self, number: int) -> bool:
        jobs = [*self.jobs, *([self.job] if self.job else [])]
        for job in jobs:
            if isinstance(job, Drop) and job.number == number:
                return True
            if isinstance(job, Merge) and any(run.number == number for run in job.sources):
                return True
        return False

    def flushing(self) -> bool:
        """Whether a frozen memtable is still being written (its job first in line)."""
        return bool(self.frozen) and (isinstance(self.job, Flush) or self.job is None)

    def pending(self) -> bool:
        if self.job is None and not self.jobs:
            self._plan_merge()
        return self.job is not None or bool(self.jobs)

    def _plan_merge(self) -> None:
        if len(self.runs) <= MAX_RUNS:
            return
        best: list[Run] | None = None
        for start in range(len(self.runs) - MERGE_FANIN + 1):
            group = self.runs[start:start + MERGE_FANIN]
            span = max(r.meta.max_day for r in group) - min(r.meta.min_day for r in group)
            if span > MAX_RUN_SPAN_DAYS:
                continue
            if best is None or sum(r.meta.count for r in group) < sum(r.meta.count for r in best):
                best = group
        if best is not None:
            self.jobs.append(Merge(best, [None] * len(best), [False] * len(best),
                                   Bloom.empty(sum(run.meta.count for run in best))))

    def run_slice(self, store: RunStore) -> bool:
        """One bounded slice of the background work in a write transaction of its own
        (while no group commit comes to carry it). True once it is durable."""
        work = self.prepare(store)
        if work is not None:
            try:
                store.write_run(work)
            except BaseException:
                self.aborted()
                raise
        self.committed()
        return True

    def prepare(self, store: RunStore, budget: int = 0) -> RunSlice | None:
        """The next slice of the current background job, for a write transaction (a group
        commit's or its own); ``committed`` once it is durable, ``aborted`` if not. None:
        nothing to write this time (``committed`` still applies what was decided).
        ``budget``: keys to write or delete at most (at least ``SLICE_KEYS``); a group
        commit passes its own id count, so the index keeps up with any ingest rate."""
        budget = max(budget, SLICE_KEYS)
        if (isinstance(self.job, Merge | Drop) and self.jobs
                and isinstance(self.jobs[0], Flush)):
            # A frozen memtable waits: it goes first, and the merge or drop resumes after
            # it. A merge takes as long as its sources hold keys, and the memtable (what
            # a restart rebuilds from the WAL) would grow by as much meanwhile.
            if isinstance(self.job, Merge):
                self.job.appending = False
            self.jobs.insert(1, self.job)
            self.job = None
        if self.job is None:
            self.job = self.jobs.pop(0)
            if isinstance(self.job, Flush | Merge) and self.job.number < 0:
                # LMDB appends only after the database's last key: the run written now
                # gets the highest number yet.
                self.job.number = self.next_run
                self.next_run += 1
        job = self.job
        if isinstance(job, Flush):
            return self._flush_slice(job, budget)
        if isinstance(job, Merge):
            return self._merge_slice(store, job, budget)
        return self._drop_slice(store, job, budget)

    def committed(self) -> None:
        apply, self._apply = self._apply, None
        if apply is not None:
            apply()

    def aborted(self) -> None:
        self._apply = None

    def _flush_slice(self, job: Flush, budget: int) -> RunSlice:
        if job.pending is None:  # (else the slice of an aborted transaction, again)
            job.pending = list(islice(job.keys, budget))
            job.bloom.add(fingerprints(job.pending))
            job.pending_last = len(job.pending) < budget
        keys = job.pending
        last = job.pending_last

        def apply() -> None:
            job.pending = None
            job.written += len(keys)
            if last:
                self.runs = sorted([*self.runs, run], key=lambda r: r.number)
                self.flushed_lsn = job.lsn
                self.frozen = {}
                self.job = None

        self._apply = apply
        if not last:
            return RunSlice(job.number, keys)
        run = Run(job.number, RunMeta(job.written + len(keys), *job.days), job.bloom)
        return RunSlice(job.number, keys,
                        [*_run_entries(run), (FLUSHED_LSN_KEY, LSN.pack(job.lsn))])

    def _merge_slice(self, store: RunStore, job: Merge, budget: int) -> RunSlice:
        chunks: list[list[bytes]] = []
        after, done = list(job.after), list(job.done)
        bound: bytes | None = None  # keys up to it are complete in this slice's reads
        for index, run in enumerate(job.sources):
            if done[index]:
                chunks.append([])
                continue
            chunk = store.read_run(run.number, after[index], budget // MERGE_FANIN)
            if len(chunk) < budget // MERGE_FANIN:
                done[index] = True
            elif bound is None or chunk[-1] < bound:
                bound = chunk[-1]
            chunks.append(chunk)
        out: list[bytes] = []
        for index, chunk in enumerate(chunks):
            taken = chunk if bound is None else [key for key in chunk if key <= bound]
            if taken:
                after[index] = taken[-1]
            if len(taken) < len(chunk):
                done[index] = False  # the rest is read again by the next slice
            out.extend(taken)
        out.sort()
        unique: list[bytes] = []
        for key in out:  # a key lives in one run; equal keys are dropped all the same
            if key != job.last and (not unique or key != unique[-1]):
                unique.append(key)
        job.bloom.add(fingerprints(unique))  # (bits set twice by a retry change nothing)
        last = all(done)
        numbers = {r.number for r in job.sources}

        def apply() -> None:
            job.after, job.done = after, done
            job.written += len(unique)
            if unique:
                job.last = unique[-1]
            if last:
                self.runs = sorted([r for r in self.runs if r.number not in numbers] + [run],
                                   key=lambda r: r.number)
                self.jobs.extend(Drop(number) for number in sorted(numbers))
                self.job = None

        self._apply = apply
        if not last:
            return RunSlice(job.number, unique, append=job.appending)
        days = (min(r.meta.min_day for r in job.sources), max(r.meta.max_day for r in job.sources))
        run = Run(job.number, RunMeta(job.written + len(unique), *days), job.bloom)
        return RunSlice(job.number, unique, _run_entries(run),
                        [k for n in sorted(numbers) for k in _meta_keys(n)],
                        append=job.appending)

    def _drop_slice(self, store: RunStore, job: Drop, budget: int) -> RunSlice | None:
        if any(run.number == job.number for run in self.runs):
            def unlist() -> None:
                self.runs = [run for run in self.runs if run.number != job.number]

            self._apply = unlist
            return RunSlice(job.number, drop_meta=_meta_keys(job.number))
        if not store.read_run(job.number, None, 1):
            def finish() -> None:
                self.job = None

            self._apply = finish
            return None
        self._apply = None
        return RunSlice(job.number, delete=budget)

    # ------------------------------------------------------------ figures

    def carried_budget(self, ids: int) -> int:
        """The keys of background work a group commit of ``ids`` ids carries."""
        pace = BACKGROUND_KEYS_PER_ID * (4 if self.memory_keys() > MEMTABLE_MAX_KEYS else 1)
        return max(SLICE_KEYS, ids * pace)

    def jobs_pending(self) -> int:
        self.pending()  # (plans a merge that is due, as the writer's next turn would)
        return len(self.jobs) + (self.job is not None)

    def memory_keys(self) -> int:
        return len(self.memtable) + len(self.frozen)

    def run_entries(self) -> int:
        return sum(run.meta.count for run in self.runs)

    def filter_bytes(self) -> int:
        return sum(run.bloom.nbytes for run in self.runs)


def _meta_keys(number: int) -> list[bytes]:
    return [RUN_META_PREFIX + RUN.pack(number), BLOOM_PREFIX + RUN.pack(number)]


def _run_entries(run: Run) -> list[tuple[bytes, bytes]]:
    meta_key, bloom_key = _meta_keys(run.number)
    return [(meta_key, msgspec.msgpack.encode(run.meta)), (bloom_key, run.bloom.to_bytes())]


def load_index(meta: dict[bytes, bytes], run_numbers: list[int], legacy_entries: int) -> IdIndex:
    """The index as stored: ``meta`` holds the catalogue entries under the index's
    prefixes (and ``FLUSHED_LSN_KEY``), ``run_numbers`` every run with entries."""
    runs: list[Run] = []
    for key, raw in meta.items():
        if key.startswith(RUN_META_PREFIX):
            number = RUN.unpack(key[len(RUN_META_PREFIX):])[0]
            bloom = meta[BLOOM_PREFIX + RUN.pack(number)]
            runs.append(Run(number, msgspec.msgpack.decode(raw, type=RunMeta),
                            Bloom.from_bytes(bloom)))
    runs.sort(key=lambda r: r.number)
    listed = {run.number for run in runs}
    orphans = [number for number in run_numbers if number not in listed]
    flushed = meta.get(FLUSHED_LSN_KEY)
    flushed_lsn = LSN.unpack(flushed)[0] if flushed else 0
    next_run = max([*listed, *run_numbers], default=-1) + 1
    return IdIndex(runs, orphans, next_run, flushed_lsn, legacy_entries)
