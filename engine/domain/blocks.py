"""Sealed history: a day of one meter's buckets in one shard, as an immutable block.

Pure domain layer: standard library, msgspec (through ``records``) and the
domain modules ``aggregates``, ``batch``, ``meters``, ``records``, ``series`` and
``values``; ``shard`` imports this module, never the reverse.

The head of a shard holds minute buckets for recent event time only. At a
checkpoint, every UTC day that left the hot window is cut out of the head
(``cut_sealed``) and becomes a *block*: the day's series with their minute
columns, exactly as the head held them (``records.BlockRecord``), compressed.
A block never changes; an event that arrives later for a sealed day lands in
the shard's *delta* (a ``MeterShard`` of its own), which queries merge, and the
next checkpoint *compacts* it: the day's block is decoded, the delta's buckets
merged in (``merge_buckets``), and a new version written in the checkpoint's
transaction. So every answer stays exact, minute windows included.

A decoded block is a ``MeterShard`` whose series carry a ``rollup``: the partial
of the whole series-day, so a query whose window holds the whole day (day,
week, month and whole-range queries in UTC) merges one partial per series-day
instead of walking 1,440 minute buckets; unique_count rollups are frozensets.

Encoding: msgpack (``records.BlockRecord`` of ``SeriesRecord``; int64 columns as
raw bytes), then zlib. Minutes are sorted per series and ascend by one, edges
and values repeat: zlib does well on both (docs/architecture.md has the
measured bytes per event).
"""

from __future__ import annotations

import zlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from typing import Protocol

from engine.domain import records
from engine.domain.aggregates import (
    AVG,
    COUNT,
    LATEST,
    MAX,
    MIN,
    SUM,
    UNIQUE,
    slice_partial,
    unique_union,
)
from engine.domain.meters import MeterDef
from engine.domain.series import MeterShard, Series, load_series, series_record

DAY_MINUTES = 1440
DAY_MS = 86_400_000
BLOCK_COMPRESSION_LEVEL = 1  # zlib: level 1 is within a few % of 6 on these columns, 3x faster
_COLUMNS = ("minutes", "edges", "values", "counts", "times", "seqs")


class BlockReader(Protocol):
    """What a shard reads its sealed history through (the runtime's block cache)."""

    def days(self, meter: str) -> list[int]:
        """The UTC days (sorted) with a block of ``meter`` for this shard."""

    def load(self, meter: MeterDef, day: int) -> MeterShard | None:
        """The decoded block (shared, read-only: never mutate it), or None."""

    def load_copy(self, meter: MeterDef, day: int) -> MeterShard | None:
        """A decoded block this caller may change (compaction)."""


class NoBlocks:
    """The reader of a shard with no sealed history (tests, the in-memory store)."""

    def days(self, meter: str) -> list[int]:
        return []

    def load(self, meter: MeterDef, day: int) -> MeterShard | None:
        return None

    def load_copy(self, meter: MeterDef, day: int) -> MeterShard | None:
        return None


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
        if cut == len(minutes):
            emptied.append(key)
        else:
            for name in _COLUMNS:
                column = getattr(series, name)
                if column is not None:
                    del column[:cut]
    for key in emptied:
        series = meter_shard.series.pop(key)
        remaining = meter_shard.by_customer[key[0]]
        remaining.remove(series)
        if not remaining:
            del meter_shard.by_customer[key[0]]
    return pieces


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
    """The stored bytes of a block: canonical (series in key order), compressed."""
    record = records.BlockRecord(
        block.meter.name, day, shard_count, part, cover_lsn,
        [series_record(block.series[key]) for key in sorted(block.series)],
    )
    return zlib.compress(records.encode(record), BLOCK_COMPRESSION_LEVEL)


def decode_block(meter: MeterDef, raw: bytes) -> tuple[records.BlockRecord, MeterShard]:
    """A block's record and its series as a ``MeterShard`` with rollups."""
    record = records.decode_block(zlib.decompress(raw))
    block = MeterShard(meter)
    for series_rec in record.series:
        load_series(block, series_rec)
    add_rollups(block)
    return record, block


def add_rollups(block: MeterShard) -> None:
    """Give every series of a block the partial of all its buckets."""
    kind = block.meter.kind
    for series in block.series.values():
        if series.minutes:
            partial = slice_partial(kind, series, 0, len(series.minutes))
            series.rollup = frozenset(partial) if kind == UNIQUE else partial


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
        if block.meter.kind == UNIQUE and series.rollup is not None:
            total += 216 + 60 * len(series.rollup)
    return total


def block_key(meter: str, day: int, part: int) -> bytes:
    """The store key of a block: meter, NUL, day and part big-endian (sorted by day)."""
    return meter.encode() + b"\x00" + day.to_bytes(4, "big") + part.to_bytes(2, "big")


def parse_block_key(key: bytes) -> tuple[str, int, int]:
    """(meter, day, part) of a block key (the NUL before the fixed 6 bytes ends the name)."""
    return (key[:-7].decode(), int.from_bytes(key[-6:-2], "big"),
            int.from_bytes(key[-2:], "big"))
