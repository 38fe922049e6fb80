"""Sealed history: a day of one meter's buckets in one shard, as an immutable block.

Pure domain layer: standard library, msgspec and the domain modules
``aggregates``, ``batch``, ``meters``, ``records``, ``series`` and ``values``;
``shard`` imports this module, never the reverse.

The head of a shard holds minute buckets for recent event time only. At a
checkpoint, every UTC day that left the hot window is cut out of the head
(``cut_sealed``) and becomes a *block*: the day's series with their minute
columns, exactly as the head held them (``records.BlockRecord``), compressed.
A block never changes; an event that arrives later for a sealed day lands in
the shard's *delta* (a ``MeterShard`` of its own), which queries merge, and the
next checkpoint *compacts* it: the day's block is decoded, the delta's buckets
merged in (``merge_buckets``), and a new version written in the checkpoint's
transaction. So every answer stays exact, minute windows included.

Two decoded forms. The full block is a ``MeterShard`` (the minute columns; its
sum-like series carry ``rollup``, the partial of the whole series-day). The
*rollups* (``BlockRollup``) are each series-day's partial alone: a query whose
span holds the whole UTC day (day, week, month and whole-range queries in UTC)
merges one partial per series-day from them and never decodes a minute column;
unique_count rollups are the day's distinct values, sorted and NUL-joined into one
str (``pack_distinct``: about a byte per character, where a frozenset costs 216
bytes plus ~60 per value), split in C when a query unites them. Several days'
rollups merge into one per series (``merge_rollups``: the runtime caches such
summaries for spans that hold many whole days).

Stored format 2 (``encode_block``): ``MAGIC``, the rollup section's length,
the rollup section (``RollupRecord``, msgpack, zlib) and the minute section
(``records.BlockRecord`` of ``SeriesRecord``: int64 columns as raw bytes,
msgpack, zlib). Format 1, written before the rollup section existed, is the
minute section alone (a zlib stream, first byte 0x78, never ``MAGIC``); it
still decodes, its rollups computed from the minutes, and its next compaction
writes format 2. Minutes are sorted per series and ascend by one, edges and
values repeat: zlib does well on both (docs/architecture.md has the measured
bytes per event).
"""

from __future__ import annotations

import itertools
import sys
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any, Protocol

import msgspec

from engine.domain import records
from engine.domain.aggregates import (
    AVG,
    COUNT,
    LATEST,
    MAX,
    MIN,
    SUM,
    UNIQUE,
    PackedDistinct,
    RememberedSlice,
    distinct_values,
    merge_partial,
    slice_partial,
    unique_union,
)
from engine.domain.meters import MeterDef
from engine.domain.records import decimal_or_int
from engine.domain.series import MeterShard, Series, load_series, series_record
from engine.domain.values import fits_int64

DAY_MINUTES = 1440
DAY_MS = 86_400_000
BLOCK_COMPRESSION_LEVEL = 1  # zlib: level 1 is within a few % of 6 on these columns, 3x faster
# A format-2 block starts with these bytes (a format-1 block is a zlib stream: 0x78).
MAGIC = b"MB\x02\x00"
_COLUMNS = ("minutes", "edges", "values", "counts", "times", "seqs")


class BlockReader(Protocol):
    """What a shard reads its sealed history through (the runtime's block cache)."""

    def days(self, meter: str) -> list[int]:
        """The UTC days (sorted) with a block of ``meter`` for this shard."""

    def load(self, meter: MeterDef, day: int) -> MeterShard | None:
        """The decoded block (shared, read-only: never mutate it), or None."""

    def load_copy(self, meter: MeterDef, day: int) -> MeterShard | None:
        """A decoded block this caller may change (compaction)."""

    def load_rollup(self, meter: MeterDef, day: int) -> BlockRollup | None:
        """The block's whole-day partials (shared, read-only), or None."""

    def load_summary(self, meter: MeterDef, days: list[int]) -> BlockRollup | None:
        """The rollups of these days (each with a block) merged per series
        (``merge_rollups``; shared, read-only), or None."""

    def replace(self, meter: MeterDef, day: int, block: MeterShard, cover_lsn: int) -> None:
        """A new version of the day's block (a correction rewrote it, ``add_rollups``
        done): readable from now on, written by the next checkpoint."""


class NoBlocks:
    """The reader of a shard with no sealed history (tests, the in-memory store)."""

    def days(self, meter: str) -> list[int]:
        return []

    def load(self, meter: MeterDef, day: int) -> MeterShard | None:
        return None

    def load_copy(self, meter: MeterDef, day: int) -> MeterShard | None:
        return None

    def load_rollup(self, meter: MeterDef, day: int) -> BlockRollup | None:
        return None

    def load_summary(self, meter: MeterDef, days: list[int]) -> BlockRollup | None:
        return None

    def replace(self, meter: MeterDef, day: int, block: MeterShard, cover_lsn: int) -> None:
        raise RuntimeError("a shard without a block reader cannot change sealed history")


# ------------------------------------------------------------------ cutting


def cut_sealed(meter_shard: MeterShard,
               before_minute: int | None) -> dict[int, list[tuple[str, Series]]]:
    """Remove every bucket before ``before_minute`` (None: all) from ``meter_shard``.

    Returns the removed buckets per UTC day as ``(dims key, series piece)`` pairs; a
    series left without buckets leaves ``meter_shard``. Column slices are C copies:
    the cost is per series and day, not per bucket (but for unique_count sets, which
    move, not copy).
    """
    kind = meter_shard.meter.kind
    pieces: dict[int, list[tuple[str, Series]]] = {}
    emptied: list[tuple[str, str]] = []
    for key, series in meter_shard.series.items():
        minutes = series.minutes
        if not minutes:
            continue
        cut = len(minutes) if before_minute is None else bisect_left(minutes, before_minute)
        if cut == 0:
            continue
        lo = 0
        while lo < cut:
            day = minutes[lo] // DAY_MINUTES
            hi = bisect_left(minutes, (day + 1) * DAY_MINUTES, lo, cut)
            piece = Series(series.customer_id, series.dims, kind)
            for name in _COLUMNS:
                column = getattr(series, name)
                if column is not None:
                    setattr(piece, name, column[lo:hi])
            pieces.setdefault(day, []).append((key[1], piece))
            lo = hi
        series.distinct_cache = None
        if cut == len(minutes):
            emptied.append(key)
        else:
            for name in _COLUMNS:
                column = getattr(series, name)
                if column is not None:
                    del column[:cut]
    _drop_series(meter_shard, emptied)
    return pieces


def cut_days(meter_shard: MeterShard, days: set[int]) -> dict[int, list[tuple[str, Series]]]:
    """Remove the buckets of the UTC ``days`` from ``meter_shard`` (as ``cut_sealed``
    does, but only these days: per series, a bisect per day, a slice per day found)."""
    kind = meter_shard.meter.kind
    pieces: dict[int, list[tuple[str, Series]]] = {}
    emptied: list[tuple[str, str]] = []
    ordered = sorted(days, reverse=True)  # cut from the end: earlier positions hold
    for key, series in meter_shard.series.items():
        minutes = series.minutes
        if not minutes or minutes[0] >= (ordered[0] + 1) * DAY_MINUTES \
                or minutes[-1] < ordered[-1] * DAY_MINUTES:
            continue
        cut = False
        for day in ordered:
            lo = bisect_left(minutes, day * DAY_MINUTES)
            hi = bisect_left(minutes, (day + 1) * DAY_MINUTES, lo)
            if lo == hi:
                continue
            piece = Series(series.customer_id, series.dims, kind)
            for name in _COLUMNS:
                column = getattr(series, name)
                if column is not None:
                    setattr(piece, name, column[lo:hi])
                    del column[lo:hi]
            pieces.setdefault(day, []).append((key[1], piece))
            cut = True
        if cut:
            series.distinct_cache = None
            if not minutes:
                emptied.append(key)
    _drop_series(meter_shard, emptied)
    return pieces


def _drop_series(meter_shard: MeterShard, keys: list[tuple[str, str]]) -> None:
    """Remove the series of ``keys`` (left without buckets) from ``meter_shard``."""
    for key in keys:
        series = meter_shard.series.pop(key)
        remaining = meter_shard.by_customer[key[0]]
        remaining.remove(series)
        if not remaining:
            del meter_shard.by_customer[key[0]]


# ------------------------------------------------------------------ merging


def merge_buckets(block: MeterShard, dims_key: str, piece: Series) -> None:
    """Merge a piece's buckets (one customer and dimension set) into ``block``."""
    kind = block.meter.kind
    target = block.series.get((piece.customer_id, dims_key))
    if target is None:
        target = block.new_series(piece.customer_id, dims_key)
    for index, minute in enumerate(piece.minutes):
        minutes = target.minutes
        slot = bisect_left(minutes, minute)
        edge = piece.edges[index]
        if slot < len(minutes) and minutes[slot] == minute:
            old = target.edges[slot]
            target.edges[slot] = min(old >> 16, edge >> 16) << 16 | max(old & 0xFFFF,
                                                                        edge & 0xFFFF)
            _combine(kind, target, slot, piece, index)
        else:
            minutes.insert(slot, minute)
            target.edges.insert(slot, edge)
            _insert(kind, target, slot, piece, index)
    target.rollup = None
    target.distinct_cache = None


def _combine(kind: int, target: Series, slot: int, piece: Series, index: int) -> None:
    if kind == COUNT:
        target.counts[slot] += piece.counts[index]
        return
    if kind == UNIQUE:
        target.values[slot] = unique_union(target.values[slot], piece.values[index])
        return
    value = piece.values[index]
    old = target.values[slot]
    if kind == SUM or kind == AVG:
        value = old + value
        if kind == AVG:
            target.counts[slot] += piece.counts[index]
    elif kind == MAX:
        value = value if value > old else old
    elif kind == MIN:
        value = value if value < old else old
    elif kind == LATEST:
        if (piece.times[index], piece.seqs[index]) <= (target.times[slot], target.seqs[slot]):
            return
        target.times[slot] = piece.times[index]
        target.seqs[slot] = piece.seqs[index]
    try:
        target.values[slot] = value
    except (TypeError, OverflowError):
        target.widen_values()
        target.values[slot] = value


def _insert(kind: int, target: Series, slot: int, piece: Series, index: int) -> None:
    if target.counts is not None:
        target.counts.insert(slot, piece.counts[index])
    if target.times is not None:
        target.times.insert(slot, piece.times[index])
        target.seqs.insert(slot, piece.seqs[index])
    if target.values is not None:
        value = piece.values[index]
        if kind == UNIQUE and type(value) is not str:
            value = set(value)
        try:
            target.values.insert(slot, value)
        except (TypeError, OverflowError):
            target.widen_values()
            target.values.insert(slot, value)


# ------------------------------------------------------------------ encoding


def build_block(meter: MeterDef, pieces: Iterable[tuple[str, Series]],
                base: MeterShard | None = None) -> MeterShard:
    """A block's series from head or delta pieces, merged over ``base`` (a copy)."""
    block = base if base is not None else MeterShard(meter)
    fresh = base is None
    for dims_key, piece in pieces:
        if fresh and (piece.customer_id, dims_key) not in block.series:
            series = block.new_series(piece.customer_id, dims_key)
            for name in _COLUMNS:
                setattr(series, name, getattr(piece, name))
        else:
            merge_buckets(block, dims_key, piece)
    return block


def encode_block(block: MeterShard, day: int, shard_count: int, part: int,
                 cover_lsn: int) -> bytes:
    """The stored bytes of a block (format 2): canonical (series in key order).

    ``MAGIC``, the rollup section's length (4 bytes big-endian), the rollup section
    (``RollupRecord``, zlib) and the minute section (``records.BlockRecord``, zlib:
    exactly the bytes of a format-1 block), so a query of whole days reads and
    decompresses the rollups alone.
    """
    keys = sorted(block.series)
    record = records.BlockRecord(
        block.meter.name, day, shard_count, part, cover_lsn,
        [series_record(block.series[key]) for key in keys],
    )
    kind = block.meter.kind
    rollups = RollupRecord(block.meter.name, day, [
        RollupSeriesRecord(series.customer_id, [list(pair) for pair in series.dims],
                           _encode_partial(kind, slice_partial(kind, series, 0,
                                                               len(series.minutes))))
        for series in (block.series[key] for key in keys) if series.minutes
    ])
    rollup_section = zlib.compress(_rollup_encoder.encode(rollups), BLOCK_COMPRESSION_LEVEL)
    return b"".join((MAGIC, len(rollup_section).to_bytes(4, "big"), rollup_section,
                     zlib.compress(records.encode(record), BLOCK_COMPRESSION_LEVEL)))


def _minute_section(raw: bytes) -> bytes:
    """The minute section's zlib bytes of a stored block of either format."""
    if raw[:len(MAGIC)] != MAGIC:
        return raw  # format 1: the whole value is the minute section
    start = len(MAGIC) + 4 + int.from_bytes(raw[len(MAGIC):len(MAGIC) + 4], "big")
    return raw[start:]


def decode_block(meter: MeterDef, raw: bytes) -> tuple[records.BlockRecord, MeterShard]:
    """A block's record and its series as a ``MeterShard`` (with rollups but for
    unique_count, whose whole-day partials ``decode_rollups`` gives compactly)."""
    record = records.decode_block(zlib.decompress(_minute_section(raw)))
    block = MeterShard(meter)
    for series_rec in record.series:
        load_series(block, series_rec)
    add_rollups(block)
    return record, block


def add_rollups(block: MeterShard) -> None:
    """Give every series of a block the partial of all its buckets (not unique_count:
    a frozenset per series-day costs 216 + ~60 bytes per value; whole days of
    unique_count are read from the rollup section instead)."""
    kind = block.meter.kind
    if kind == UNIQUE:
        return
    for series in block.series.values():
        if series.minutes:
            series.rollup = slice_partial(kind, series, 0, len(series.minutes))


# ------------------------------------------------------------------ rollups


class RollupSeriesRecord(msgspec.Struct, array_like=True):
    """The partial of one series-day (``_encode_partial``)."""

    customer_id: str
    dims: list[list[str]]
    partial: Any


class RollupRecord(msgspec.Struct, array_like=True):
    """The rollup section of a format-2 block: each series-day's partial, key order."""

    meter: str
    day: int
    series: list[RollupSeriesRecord]


_rollup_encoder = msgspec.msgpack.Encoder()
_rollup_decoder = msgspec.msgpack.Decoder(RollupRecord)


def _encode_number(value: Any) -> int | str:
    return value if type(value) is int and fits_int64(value) else str(value)


def _encode_partial(kind: int, partial: Any) -> Any:
    """A partial in msgpack terms: numbers as int64 or decimal strings (as snapshots),
    avg ``[sum, count]``, latest ``[ts, seq, value]``, unique_count the sorted values
    joined by NUL (a list when a value holds a NUL itself)."""
    if kind == UNIQUE:
        return pack_distinct(partial)
    if kind == AVG:
        return [_encode_number(partial[0]), _encode_number(partial[1])]
    if kind == LATEST:
        return [partial[0], partial[1], _encode_number(partial[2])]
    return _encode_number(partial)


def _decode_partial(kind: int, encoded: Any) -> Any:
    if kind == UNIQUE:
        return encoded if type(encoded) is str else tuple(encoded)
    if kind == AVG:
        return [decimal_or_int(encoded[0]), decimal_or_int(encoded[1])]
    if kind == LATEST:
        return (encoded[0], encoded[1], decimal_or_int(encoded[2]))
    return decimal_or_int(encoded)


def pack_distinct(values: Iterable[str]) -> str | list[str]:
    """Distinct values, sorted, as one NUL-joined str (one object instead of one per
    value: about 1 byte per character), or a list when a value holds a NUL."""
    ordered = sorted(values)
    packed = "\x00".join(ordered)
    return packed if packed.count("\x00") == len(ordered) - 1 else ordered


def unpack_distinct(packed: str | tuple[str, ...]) -> list[str] | tuple[str, ...]:
    """The values of a ``pack_distinct`` partial (a str splits in C)."""
    if isinstance(packed, str):
        return packed.split("\x00")
    return packed


_rollup_serials = itertools.count(1)


class BlockRollup:
    """A block's rollup section as queries read it: per series-day, (customer, dims,
    partial), unique_count partials packed (``pack_distinct``). Shared, read-only."""

    __slots__ = ("by_customer", "checks", "day", "grouped", "meter", "nbytes", "serial",
                 "series")

    def __init__(self, meter: MeterDef, day: int) -> None:
        # Never reused in a process: with a part's id, names that part for
        # ``aggregates.DistinctCounts`` (a rollup never changes once built).
        self.serial = next(_rollup_serials)
        self.meter = meter
        self.day = day
        self.series: list[tuple[str, tuple[tuple[str, str], ...], Any]] = []
        self.by_customer: dict[str, list[tuple[str, tuple[tuple[str, str], ...], Any]]] = {}
        self.nbytes = 0
        # unique_count summaries: per group's packed parts, their count and the values
        # from outside them already looked up (``count_over_summary``).
        self.checks: dict[tuple[Any, ...], DistinctCheck] = {}
        # Queries' partials over every series, per (group_by, dimension filters, span),
        # the most recent few (``shard.collect_rollup_partials``; counted in ``nbytes``).
        self.grouped: dict[tuple[Any, ...], dict[tuple[int, tuple[Any, ...]], Any]] = {}


def decode_rollups(meter: MeterDef, raw: bytes) -> BlockRollup:
    """The whole-day partials of a stored block: the rollup section alone (format 2),
    or computed from the minute columns (format 1, which has no rollup section)."""
    kind = meter.kind
    if raw[:len(MAGIC)] != MAGIC:
        record, block = decode_block(meter, raw)
        return rollup_of(block, record.day)
    length = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 4], "big")
    section = zlib.decompress(raw[len(MAGIC) + 4:len(MAGIC) + 4 + length])
    rollups = _rollup_decoder.decode(section)
    rollup = BlockRollup(meter, rollups.day)
    dims_by_key: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
    for series_rec in rollups.series:
        dims = tuple((pair[0], pair[1]) for pair in series_rec.dims)
        dims = dims_by_key.setdefault(dims, dims)  # shared: queries memoise by identity
        _add_rollup(rollup, series_rec.customer_id, dims,
                    _decode_partial(kind, series_rec.partial))
    return rollup


def rollup_of(block: MeterShard, day: int) -> BlockRollup:
    """The ``BlockRollup`` of a decoded block (format-1 blocks, blocks not yet written)."""
    kind = block.meter.kind
    rollup = BlockRollup(block.meter, day)
    for key in sorted(block.series):
        series = block.series[key]
        if not series.minutes:
            continue
        partial = slice_partial(kind, series, 0, len(series.minutes))
        if kind == UNIQUE:
            packed = pack_distinct(partial)
            partial = packed if type(packed) is str else tuple(packed)
        _add_rollup(rollup, series.customer_id, series.dims, partial)
    return rollup


def merge_rollups(meter: MeterDef, rollups: list[BlockRollup]) -> BlockRollup:
    """The rollups of several days merged per series: one partial per series over all
    of them (what a span holding every one of those days whole reads). unique_count
    values are united once and packed again (unsorted: nothing orders them here)."""
    kind = meter.kind
    merged: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
    for rollup in rollups:
        for customer, dims, partial in rollup.series:
            key = (customer, dims)
            existing = merged.get(key)
            if kind == UNIQUE:
                if existing is None:
                    merged[key] = [partial]
                else:
                    existing.append(partial)
            else:
                merged[key] = partial if existing is None else merge_partial(kind, existing,
                                                                            partial)
    summary = BlockRollup(meter, rollups[0].day if rollups else 0)
    dims_by_value: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
    for (customer, dims), partial in merged.items():
        dims = dims_by_value.setdefault(dims, dims)
        if kind == UNIQUE:
            values = distinct_values(PackedDistinct(partial))
            packed = "\x00".join(values)
            partial = packed if packed.count("\x00") == len(values) - 1 else tuple(values)
        _add_rollup(summary, customer, dims, partial)
    return summary


class DistinctCheck:
    """What a summary remembers of one group's packed values (``count_over_summary``):
    how many there are, which values from outside them (the head, deltas) were looked
    up among them, which of those were not found, and the last answer with the serial
    of the ``RememberedSlice`` it was for (a head slice, the same until a bucket of its
    series changes)."""

    __slots__ = ("checked", "count", "last", "new")

    def __init__(self, count: int) -> None:
        self.count = count
        self.checked: set[str] = set()
        self.new: set[str] = set()
        self.last: tuple[int, int] | None = None


# Up to this many values are looked up by substring search of the packed strs (in C,
# a scan of each str per value); more make one split of the strs into a set cheaper.
SEARCH_MAX_VALUES = 32
# What a remembered value costs the summary's size: a slot in ``checked`` (and maybe
# in ``new``), not the str, which the head holds too.
_CHECKED_VALUE_BYTES = 48


def count_over_summary(summary: BlockRollup, packed: tuple[Any, ...],
                       loose: list[Any]) -> int:
    """The number of distinct values in ``packed`` (a group's parts of ``summary``:
    packed strs, tuples of values holding a NUL) and ``loose`` (sets of values from
    elsewhere: the head, deltas) together, exactly.

    |packed | loose| = |packed| + |loose - packed|. The summary remembers, per
    ``packed``, its count and every loose value it has looked up (``DistinctCheck``),
    so a query repeated over the same sealed days costs per loose value (set
    operations in C), not per sealed value; only values not seen before are looked up,
    a few by substring search, many by splitting the packed strs once. A first loose
    part that is a ``RememberedSlice`` (a head slice, the same until a bucket of its
    series changes) has its answer remembered too. The memory is
    counted in ``summary.nbytes`` and dies with the summary (dropped when one of its
    blocks changes)."""
    check = summary.checks.get(packed)
    if check is None:
        if len(packed) == 1 and type(packed[0]) is str:
            count = packed[0].count("\x00") + 1  # one packed str: distinct already
        else:
            count = len(distinct_values(PackedDistinct(list(packed))))
        check = summary.checks[packed] = DistinctCheck(count)
        summary.nbytes += 200
    if not loose:
        return check.count
    answer = check.count
    frozen = loose[0] if type(loose[0]) is RememberedSlice else None
    rest = loose[1:] if frozen is not None else loose
    if frozen is not None:
        last = check.last
        if last is not None and last[0] == frozen.serial:
            answer = last[1]
        else:
            answer += _count_new(summary, check, packed, frozen)
            check.last = (frozen.serial, answer)
    if rest:
        extra = set().union(*rest)
        if frozen is not None:
            extra -= frozen
        if extra:
            answer += _count_new(summary, check, packed, extra)
    return answer


def _count_new(summary: BlockRollup, check: DistinctCheck, packed: tuple[Any, ...],
               values: set[str] | frozenset[str]) -> int:
    """How many of ``values`` are not in ``packed``; every one of them is in
    ``check.checked`` afterwards, those not found in ``check.new``."""
    unchecked = values - check.checked
    if unchecked:
        fresh: set[str] | frozenset[str]
        if len(unchecked) <= SEARCH_MAX_VALUES and not any("\x00" in v for v in unchecked):
            fresh = {value for value in unchecked if not _in_packed(value, packed)}
        else:
            fresh = unchecked - distinct_values(PackedDistinct(list(packed)))
        check.checked |= unchecked
        check.new |= fresh
        summary.nbytes += _CHECKED_VALUE_BYTES * (len(unchecked) + len(fresh))
    return len(check.new & values) if check.new else 0


def _in_packed(value: str, packed: tuple[Any, ...]) -> bool:
    """Whether ``value`` (holding no NUL) is one of the values of ``packed``."""
    for part in packed:
        if type(part) is not str:
            if value in part:
                return True
        elif (part == value or part.startswith(value + "\x00") or part.endswith("\x00" + value)
              or "\x00" + value + "\x00" in part):
            return True
    return False


def _add_rollup(rollup: BlockRollup, customer_id: str, dims: tuple[tuple[str, str], ...],
                partial: Any) -> None:
    entry = (customer_id, dims, partial)
    rollup.series.append(entry)
    rollup.by_customer.setdefault(customer_id, []).append(entry)
    # Honest sizes: the entry tuple, its slots in two lists, a dict slot per customer,
    # and the partial itself (a packed str: getsizeof; numbers and small tuples ~100 B).
    size = 64 + 16 + 8 + 24
    if type(partial) is str:
        size += sys.getsizeof(partial)
    elif type(partial) is tuple and rollup.meter.kind == UNIQUE:
        size += sys.getsizeof(partial) + sum(sys.getsizeof(value) for value in partial)
    else:
        size += 100
    rollup.nbytes += size


def block_bytes_estimate(block: MeterShard) -> int:
    """Roughly the memory a decoded block holds (what the cache's budget counts)."""
    total = 200
    for series in block.series.values():
        total += 400 + 8 * len(series.minutes)
        for name in ("edges", "values", "counts", "times", "seqs"):
            column = getattr(series, name)
            if column is None:
                continue
            if type(column) is array:
                total += column.itemsize * len(column)
            else:
                total += 8 * len(column)
                if block.meter.kind == UNIQUE:
                    total += sum(60 if type(values) is str else 216 + 60 * len(values)
                                 for values in column)
                else:
                    total += 32 * len(column)
    return total


def block_key(meter: str, day: int, part: int) -> bytes:
    """The store key of a block: meter, NUL, day and part big-endian (sorted by day)."""
    return meter.encode() + b"\x00" + day.to_bytes(4, "big") + part.to_bytes(2, "big")


def parse_block_key(key: bytes) -> tuple[str, int, int]:
    """(meter, day, part) of a block key (the NUL before the fixed 6 bytes ends the name)."""
    return (key[:-7].decode(), int.from_bytes(key[-6:-2], "big"),
            int.from_bytes(key[-2:], "big"))
