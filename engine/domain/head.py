"""The head's checkpoint in hour chunks: only what changed since the last checkpoint.

Pure domain layer: standard library and the domain modules ``batch``, ``records``
and ``series``. A checkpoint used to encode and write a shard's whole head (two days of
minute buckets) every time, so its cost was the head's size whatever had changed.
Now the head is stored as one chunk per (shard, meter, UTC hour of event time): a
``MeterPart`` holding every series' buckets of that hour. A shard remembers which
hours its applies touched since its last checkpoint (``HeadLog.dirty``) and which
chunks the store holds (``HeadLog.stored``). A checkpoint writes the touched hours
again, deletes the chunks of hours that left the head (sealed into blocks) or
emptied, and leaves the rest as they are: in steady traffic that is the current
hour and the few hours late events reached.

A full rewrite (every chunk again, after the store's chunks were dropped) is needed
once after a restore that cannot trust the stored chunks: a checkpoint from before
chunks existed, or a different shard count (customers moved between shards); and
after a checkpoint that failed to be written, since its chunks were already taken
off the dirty list.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from typing import Any

from engine.domain.batch import dims_key_of
from engine.domain.records import MeterPart
from engine.domain.series import MeterShard, Series, load_series, series_record

HOUR_MINUTES = 60
HOUR_MS = HOUR_MINUTES * 60_000
_COLUMNS = ("minutes", "edges", "values", "counts", "times", "seqs")
_PART = struct.Struct(">H")
_HOUR = struct.Struct(">I")


class HeadLog:
    """Which hours of a shard's head changed since its last checkpoint, and which are
    stored as chunks."""

    __slots__ = ("dirty", "rewrite", "stored")

    def __init__(self) -> None:
        self.dirty: dict[str, set[int]] = {}  # meter -> hours touched since the checkpoint
        self.stored: dict[str, set[int]] = {}  # meter -> hours with a chunk in the store
        self.rewrite = False  # the next checkpoint must write every chunk (see the module)

    def touch(self, meter_name: str, times: Any) -> None:
        """An apply changed buckets of ``meter_name`` at these event times (a slice's
        column). Per slice when its events lie within two hours; per event otherwise:
        one late event in a batch would else mark every hour back to its own."""
        first, last = min(times) // HOUR_MS, max(times) // HOUR_MS
        hours = self.dirty.get(meter_name)
        if hours is None:
            hours = self.dirty[meter_name] = set()
        if first == last:
            hours.add(first)
        elif last - first == 1:
            hours.update((first, last))
        else:
            hours.update({ts // HOUR_MS for ts in times})


def chunk_key(part: int, meter_name: str, hour: int) -> bytes:
    """A chunk's store key: shard part, meter name, NUL, hour (big-endian, so a part's
    chunks sort by meter then hour)."""
    return _PART.pack(part) + meter_name.encode() + b"\0" + _HOUR.pack(hour)


# Chunks of unique_count limits' states (``limits.ShardLimits.unique_chunks``) live
# beside the head's: their part has this bit set (shard counts stay below it), the name
# is the limit id and the hour field the chunk number. A store's head chunks of an older
# version never have it.
LIMIT_CHUNK_BIT = 0x8000


def limit_chunk_key(part: int, limit_id: str, seq: int) -> bytes:
    return chunk_key(part | LIMIT_CHUNK_BIT, limit_id, seq)


def parse_chunk_key(key: bytes) -> tuple[int, str, int]:
    (part,) = _PART.unpack_from(key)
    (hour,) = _HOUR.unpack_from(key, len(key) - _HOUR.size)
    return part, key[_PART.size:len(key) - _HOUR.size - 1].decode(), hour


def head_hours(meter_shard: MeterShard) -> set[int]:
    """Every hour in which ``meter_shard`` holds a bucket."""
    hours: set[int] = set()
    for series in meter_shard.series.values():
        minutes = series.minutes
        if not minutes:
            continue
        first, last = minutes[0] // HOUR_MINUTES, minutes[-1] // HOUR_MINUTES
        if first == last:
            hours.add(first)
            continue
        index = 0
        while index < len(minutes):
            hour = minutes[index] // HOUR_MINUTES
            hours.add(hour)
            index = bisect_left(minutes, (hour + 1) * HOUR_MINUTES, index)
    return hours


def hour_chunks(meter_shard: MeterShard, hours: set[int]) -> dict[int, MeterPart]:
    """The chunk of each of ``hours`` that still holds buckets: every series' buckets of
    that hour, series in key order. Column slices are C copies; unique_count values
    are encoded right away by the caller, so their sets are shared, not copied."""
    wanted = sorted(hours)
    records: dict[int, list[Any]] = {}
    kind = meter_shard.meter.kind
    for key in sorted(meter_shard.series):
        series = meter_shard.series[key]
        minutes = series.minutes
        if not minutes:
            continue
        first_hour, last_hour = minutes[0] // HOUR_MINUTES, minutes[-1] // HOUR_MINUTES
        for hour in wanted[bisect_left(wanted, first_hour):]:
            if hour > last_hour:
                break
            lo = bisect_left(minutes, hour * HOUR_MINUTES)
            hi = bisect_left(minutes, (hour + 1) * HOUR_MINUTES, lo)
            if lo == hi:
                continue
            if lo == 0 and hi == len(minutes):
                piece = series
            else:
                piece = Series(series.customer_id, series.dims, kind)
                for name in _COLUMNS:
                    column = getattr(series, name)
                    if column is not None:
                        setattr(piece, name, column[lo:hi])
            records.setdefault(hour, []).append(series_record(piece, canonical=False))
    return {hour: MeterPart(meter_shard.meter.name, found, [])
            for hour, found in records.items()}


def append_series(target: Series, piece: Series) -> None:
    """Put ``piece``'s buckets after ``target``'s (restoring hour chunks in hour order:
    every bucket of ``piece`` is later than every bucket of ``target``)."""
    if type(target.values) is not type(piece.values):  # one of them was widened
        target.widen_values()
        piece.widen_values()
    target.distinct_cache = None
    for name in _COLUMNS:
        column = getattr(target, name)
        if column is not None:
            column.extend(getattr(piece, name))


def load_chunk(meter_shard: MeterShard, record: Any) -> None:
    """Add one chunk's series record to ``meter_shard``, after the buckets of the
    same series from earlier hours (``restore_shards``)."""
    key = (record.customer_id, dims_key_of(dict(record.dims)))
    existing = meter_shard.series.get(key)
    if existing is None:
        load_series(meter_shard, record)
        return
    scratch = MeterShard(meter_shard.meter)
    load_series(scratch, record)
    append_series(existing, scratch.series[key])
