"""One series and one meter's series within a shard: the bucket columns.

Pure domain layer: standard library and the domain modules ``aggregates``,
``batch`` (the dimension-key encoding), ``meters``, ``records`` (the snapshot
shapes) and ``values``. A ``MeterShard`` is owned by the ``ShardState`` that
holds it; the apply loops (``engine.domain.shard``) grow its columns, queries
and limits read them.

Layout. A *series* is (meter, customer, dimensions). Each series keeps one-minute
buckets as parallel columns: ``minutes`` (``array('I')``, sorted, minute index
since the epoch) and the aggregation's value columns (``array('q')`` while values
are integers that fit 64 bits, a list of ``int``/``Decimal`` otherwise). A
(series, bucket) therefore costs 16 bytes for sum/count/max/min, 24 for avg,
32 for latest, plus the set for unique_count, plus the amortised series header.

Edges. Buckets are one minute wide (``windows.MINUTE_MS``); each bucket also
keeps the offsets (ms within its minute) of its first and last event, packed
``lo << 16 | hi`` in the ``edges`` column. A query cut that is not on a minute
boundary is exact when all of a bucket's events lie on one side of it;
otherwise the query is refused rather than answered wrong.

Snapshot. ``series_record`` and ``load_series`` convert a series to and from its
``records.SeriesRecord``: int64 columns as their bytes, widened values as ints
or decimal strings, unique_count sets as sorted lists.
"""

from __future__ import annotations

from array import array
from typing import Any, cast

from engine.domain.aggregates import AVG, COUNT, LATEST, MAX, MIN, SUM, UNIQUE
from engine.domain.batch import dims_key_of, dims_of_key
from engine.domain.meters import MeterDef
from engine.domain.records import SeriesRecord, decimal_or_int
from engine.domain.values import fits_int64


class Series:
    """One (meter, customer, dimensions) series with its minute buckets."""

    __slots__ = ("counts", "customer_id", "dims", "distinct_cache", "edges", "minutes", "rollup",
                 "seqs", "times", "values")

    def __init__(
        self, customer_id: str, dims: tuple[tuple[str, str], ...], kind: int
    ) -> None:
        self.customer_id = customer_id
        self.dims = dims
        self.minutes = array("I")
        self.edges = array("I")  # per bucket: first and last event offset, lo << 16 | hi
        self.values: Any = None
        self.counts: Any = None
        self.times: Any = None
        self.seqs: Any = None
        # A sealed block's series: the partial of all its buckets (engine.domain.blocks);
        # None in the head, whose buckets change.
        self.rollup: Any = None
        # A unique_count head series: the distinct values of a few long bucket ranges a
        # query asked for, (lo, hi) -> RememberedSlice; None again whenever a bucket changes
        # (engine.domain.shard.distinct_slice).
        self.distinct_cache: dict[tuple[int, int], frozenset[str]] | None = None
        if kind in (SUM, MAX, MIN, AVG, LATEST):
            self.values = array("q")
        if kind in (COUNT, AVG):
            self.counts = array("q")
        if kind == LATEST:
            self.times = array("q")
            self.seqs = array("q")
        if kind == UNIQUE:
            self.values = []

    def widen_values(self) -> None:
        """Switch the value column from int64 to Python objects (big ints, Decimals)."""
        if type(self.values) is array:
            self.values = self.values.tolist()


class MeterShard:
    """Everything one shard knows about one meter."""

    __slots__ = ("by_customer", "dims_by_key", "meter", "series")

    def __init__(self, meter: MeterDef) -> None:
        self.meter = meter
        self.series: dict[tuple[str, str], Series] = {}  # (customer, dims key) -> series
        self.by_customer: dict[str, list[Series]] = {}
        # Parsed dimension sets, shared by every series with the same dimensions
        # (far fewer distinct sets than series: less memory, fewer GC-tracked tuples).
        self.dims_by_key: dict[str, tuple[tuple[str, str], ...]] = {}

    def new_series(self, customer_id: str, dims_key: str) -> Series:
        dims = self.dims_by_key.get(dims_key)
        if dims is None:
            dims = self.dims_by_key[dims_key] = dims_of_key(dims_key)
        series = Series(customer_id, dims, self.meter.kind)
        self.series[(customer_id, dims_key)] = series
        self.by_customer.setdefault(customer_id, []).append(series)
        return series


def dims_match(
    dims: tuple[tuple[str, str], ...], dim_filters: tuple[tuple[str, frozenset[str]], ...]
) -> bool:
    """True if a dimension set passes every (key, allowed values) filter (queries, limits)."""
    values = dict(dims)
    return all(values.get(key) in allowed for key, allowed in dim_filters)


# ------------------------------------------------------------------ snapshot


def _column_bytes(column: Any) -> bytes | None:
    return None if column is None else column.tobytes()


def series_record(series: Series, canonical: bool = True) -> SeriesRecord:
    """One series as its snapshot record (``ShardState.export``). ``canonical=False``
    (checkpoints) leaves unique_count sets unsorted: msgpack writes them as arrays in
    set order, the same state in bytes that need not be equal for equal states."""
    values = series.values
    exported: bytes | list[Any] | None
    if values is None:
        exported = None
    elif type(values) is array:
        exported = values.tobytes()
    elif series.times is None and series.counts is None and values and (
            type(values[0]) is str or type(values[0]) is set):
        # unique_count (the only kind with str or set buckets): one value or a sorted list.
        exported = values if not canonical else [
            v if type(v) is str else sorted(v) for v in values]
    else:
        exported = [
            sorted(v) if type(v) is set else (v if type(v) is int and fits_int64(v) else str(v))
            for v in values
        ]
    return SeriesRecord(
        series.customer_id,
        [list(pair) for pair in series.dims],
        series.minutes.tobytes(),
        series.edges.tobytes(),
        exported,
        _column_bytes(series.counts),
        _column_bytes(series.times),
        _column_bytes(series.seqs),
    )


def _int_column(raw: bytes | None) -> Any:
    if raw is None:
        return None
    column = array("q")
    column.frombytes(raw)
    return column


def load_series(meter_shard: MeterShard, record: SeriesRecord) -> None:
    """Add the series of a snapshot record to ``meter_shard`` (``restore_shards``)."""
    series = meter_shard.new_series(record.customer_id, dims_key_of(dict(record.dims)))
    series.minutes = array("I")
    series.minutes.frombytes(record.minutes)
    series.edges = array("I")
    series.edges.frombytes(record.edges)
    if type(record.values) is bytes:
        series.values = _int_column(record.values)
    elif record.values is not None:
        if meter_shard.meter.kind == UNIQUE:
            series.values = [v if type(v) is str else set(v)
                             for v in cast("list[str | list[str]]", record.values)]
        else:
            series.values = [decimal_or_int(v) for v in record.values]
    series.counts = _int_column(record.counts)
    series.times = _int_column(record.times)
    series.seqs = _int_column(record.seqs)
