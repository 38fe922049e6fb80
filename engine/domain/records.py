"""Write-ahead-log records, snapshot parts and alerts: their msgpack encoding.

Pure domain layer: standard library, msgspec, ``engine.schema`` and
``engine.domain.values`` only, so storage and protocol code may import it. All
stored shapes live here: a WAL record is a tagged msgspec struct, so record
kinds can be added without breaking old logs; snapshot parts (``ShardPart``,
``MeterPart``, ``SeriesRecord``, ``EngineState``) are untagged arrays. New
fields go at the end with defaults. Integers beyond 64 bits are stored as
decimal strings (the bounds: ``engine.domain.values``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from engine.domain.values import fits_int64, fits_msgpack_int
from engine.schema import Alert, Customer, Event, Limit, Meter


class WalBatch(msgspec.Struct, tag="batch", array_like=True):
    """One ingested batch, exactly as accepted (validated before it was logged)."""

    events: list[Event]
    received_ms: int = 0  # engine clock when received: the crossed_at_ms of its alerts


class WalLimit(msgspec.Struct, tag="limit", array_like=True):
    """A limit added or replaced; evaluated at once for the period containing ``received_ms``."""

    limit: Limit
    received_ms: int


class WalRemoveLimit(msgspec.Struct, tag="remove_limit", array_like=True):
    limit_id: str
    received_ms: int


class WalPutCustomer(msgspec.Struct, tag="customer", array_like=True):
    """A customer added, filled in, updated or reinstated: the record replaces the entry."""

    customer: Customer
    received_ms: int


class WalHideCustomer(msgspec.Struct, tag="hide_customer", array_like=True):
    """A customer deleted: hidden from the registry; its usage is still metered."""

    customer_id: str
    received_ms: int


class WalExtension(msgspec.Struct, tag="ext", array_like=True):
    """A record metering stores but does not read: an extension's change (pricing's
    plans, assignments and final invoices), ``body`` encoded by the extension. The
    runtime hands it back to the extension in commit order and on replay."""

    kind: str
    body: bytes
    received_ms: int


class CorrectedBucket(msgspec.Struct, array_like=True, gc=False):
    """One head bucket as it is after a correction (``engine.domain.corrections``).

    ``value``: the bucket's value column entry (an int, or a decimal string for a value
    beyond msgpack or a Decimal; unique_count: its distinct values, sorted); ``count``,
    ``time`` and ``seq`` the other columns where the kind has them (else 0)."""

    dims_key: str
    minute: int
    edge: int
    value: Any
    count: int = 0
    time: int = 0
    seq: int = 0


class CorrectedMinutes(msgspec.Struct, array_like=True, gc=False):
    """A customer's minutes a correction rebuilt: every bucket of the customer's series
    in ``minutes`` is replaced by ``buckets`` (none: the minute is empty now)."""

    customer_id: str
    minutes: list[int]
    buckets: list[CorrectedBucket]


class WalCorrection(msgspec.Struct, tag="correction", array_like=True):
    """A correction (``Engine.cancel``, ``cancel_where``, ``amend``): the events it
    cancelled, resolved when it was made (``runs``: flattened ``lsn, first index,
    count`` runs of positions; records written before runs hold flattened ``lsn,
    index`` pairs in ``positions`` instead; index 0 of a correction record is the event
    it amended in), and the head buckets
    recomputed from the events that remain (``minutes``), so replay applies it without
    reading the log. ``amended``: the corrected event ``amend`` logs in the same record;
    ``amended_more``: the further ones of a ``cancel_previous`` (Amberflo's flag on
    ingest: each flagged event replaces the live event with its unique id), at indices
    1, 2, ... of the record."""

    kind: str  # "cancel" | "cancel_where" | "amend" | "cancel_previous"
    meter: str
    customer_id: str | None
    by: str
    received_ms: int
    description: str
    positions: list[int]
    minutes: list[CorrectedMinutes]
    amended: Event | None = None
    amended_more: list[Event] = msgspec.field(default_factory=list)
    runs: list[int] = msgspec.field(default_factory=list)

    def amended_events(self) -> list[Event]:
        """Every event this record logs, by its index in the record."""
        return [] if self.amended is None else [self.amended, *self.amended_more]


class Correction(msgspec.Struct, kw_only=True, rename="camel"):
    """One correction as ``Engine.corrections`` lists it: who, when, what (stored in the
    catalogue beside its ``WalCorrection``; the wire carries it as it is)."""

    lsn: int
    kind: str  # "cancel" | "cancel_where" | "amend" | "cancel_previous"
    meter_api_name: str
    customer_id: str | None
    by: str
    received_ms: int
    description: str
    cancelled: int
    amended: Event | None = None


WalRecord = (WalBatch | WalLimit | WalRemoveLimit | WalPutCustomer | WalHideCustomer
             | WalExtension | WalCorrection)


# ------------------------------------------------------------------ snapshot


class SeriesRecord(msgspec.Struct, array_like=True, gc=False):
    """One series in a snapshot (``engine.domain.series.series_record``)."""

    customer_id: str
    dims: list[list[str]]
    minutes: bytes
    edges: bytes
    values: bytes | list[Any] | None  # int64 column, or ints / decimal strings / sorted lists
    counts: bytes | None
    times: bytes | None
    seqs: bytes | None


class MeterPart(msgspec.Struct, array_like=True):
    """One meter's series in one shard, in canonical order.

    ``seen``: the (customer, unique id) pairs accepted, in snapshots from before the
    dedup index (data format 1 and 2); written empty since (the store's ``ids``).
    """

    meter: str
    series: list[SeriesRecord]
    seen: list[list[str]]


class ShardPart(msgspec.Struct, array_like=True):
    """One shard's checkpoint: its head (the unsealed minute buckets), the fired
    thresholds of its limits, where its sealed history begins, and its limits'
    per-period states (``ShardLimits.export_states``; empty in snapshots written
    before states were kept: they are then read on first touch).

    ``meters`` is the head, or empty with ``head_chunked``: the head is then stored
    beside the part in hour chunks, one ``MeterPart`` each (``engine.domain.head``),
    and a checkpoint rewrites only the chunks that changed. ``deltas`` holds events
    for sealed days not yet merged into their blocks; days before
    ``sealed_before_minute`` live in blocks (``BlockRecord``); ``sealed_customers``
    lists, per meter, the customers with usage in sealed days, sorted
    (``[[meter, [customer, ...]], ...]``).
    """

    meters: list[MeterPart]
    fired: list[list[Any]] = []
    sealed_before_minute: int = 0
    deltas: list[MeterPart] = []
    sealed_customers: list[list[Any]] = []
    limit_states: list[list[Any]] = []
    head_chunked: bool = False  # the head is in hour chunks (engine.domain.head)


class BlockRecord(msgspec.Struct, array_like=True):
    """One sealed day of one meter in one shard: immutable once written; a late event
    makes a new version of it (``engine.domain.blocks``).

    ``cover_lsn``: the block holds every accepted event of its (meter, day, shard)
    logged at or before this lsn that is not in the checkpoint's deltas.
    """

    meter: str
    day: int  # UTC day index since the epoch
    shard_count: int
    part: int  # the shard index under ``shard_count``
    cover_lsn: int
    series: list[SeriesRecord]


class EngineState(msgspec.Struct, array_like=True):
    """Engine-wide snapshot state: limits in the order they were added, next alert seq."""

    limits: list[Limit] = []
    next_alert_seq: int = 0
    customers: list[Customer] = []  # the registry's records, by id
    hidden_customers: list[str] = []  # deleted ids, sorted
    # [lsn, engine clock ms] of each checkpoint still inside the raw-event retention:
    # the write-ahead log up to a mark older than the retention may be trimmed.
    wal_marks: list[list[int]] = []
    extension: bytes = b""  # the extension's own state (pricing's), encoded by it


def decimal_or_int(value: int | str) -> int | Decimal:
    """Inverse of the snapshot encoding of a widened value: an int beyond int64 or a
    Decimal is stored as its decimal string (``SeriesRecord.values``)."""
    if type(value) is int:
        return value
    text: str = value  # type: ignore[assignment]
    if text.lstrip("-").isdigit():
        return int(text)
    return Decimal(text)


class EventIds(msgspec.Struct, rename="camel", gc=False):
    """What the dedup index needs of a logged event: the other fields are skipped, not
    built (``Event``'s wire names, so it reads the same bytes)."""

    meter_api_name: str
    customer_id: str
    unique_id: str | None = None


class BatchIds(msgspec.Struct, tag="batch", array_like=True):
    """A ``WalBatch`` read for its ids only."""

    events: list[EventIds]
    received_ms: int = 0


_encoder = msgspec.msgpack.Encoder()
_record_decoder: msgspec.msgpack.Decoder[WalRecord] = msgspec.msgpack.Decoder(WalRecord)
_batch_ids_decoder = msgspec.msgpack.Decoder(BatchIds)
_part_decoder = msgspec.msgpack.Decoder(ShardPart)
_meter_part_decoder = msgspec.msgpack.Decoder(MeterPart)
_block_decoder = msgspec.msgpack.Decoder(BlockRecord)
_engine_state_decoder = msgspec.msgpack.Decoder(EngineState)
_meter_decoder = msgspec.msgpack.Decoder(Meter)
_alert_decoder = msgspec.msgpack.Decoder(Alert)


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)


def encode_batch(events: list[Event], received_ms: int) -> bytes:
    """Encode a batch for the WAL.

    msgpack integers stop at 64 bits; an event value beyond what msgpack can
    encode is logged as a decimal string, which decodes back to the same exact
    value. The bound is msgpack's, not int64 (see ``engine.domain.values``): only
    this engine reads the log, and widening happens only after the fast encode
    failed, so a batch that encodes as it is stays as it is.
    """
    try:
        return _encoder.encode(WalBatch(events, received_ms))
    except OverflowError:
        wide = [
            msgspec.structs.replace(e, meter_value=Decimal(e.meter_value))
            if type(e.meter_value) is int and not fits_msgpack_int(e.meter_value)
            else e
            for e in events
        ]
        return _encoder.encode(WalBatch(wide, received_ms))


def wide_ints_as_decimals(limit: Limit) -> Limit:
    """Clients read msgpack integers as int64: if a threshold is beyond that, every
    integer threshold of the limit travels as a decimal string."""
    if all(type(t) is not int or fits_int64(t) for t in limit.thresholds):
        return limit
    return msgspec.structs.replace(limit, thresholds=[
        Decimal(t) if type(t) is int else t for t in limit.thresholds
    ])


def encode_alert(alert: Alert) -> bytes:
    """Alerts carry exact numbers; if one is beyond what msgpack encodes, both travel as
    decimal strings (the alert log is read by this engine only: msgpack's bound)."""
    try:
        return _encoder.encode(alert)
    except OverflowError:
        return _encoder.encode(msgspec.structs.replace(
            alert,
            threshold=Decimal(alert.threshold),
            value=Decimal(alert.value),
        ))


def decode_record(raw: bytes) -> WalRecord:
    return _record_decoder.decode(raw)


def decode_batch_ids(raw: bytes) -> BatchIds | None:
    """A batch record's ids, about four times faster than ``decode_record`` (no
    dimensions, values or Event objects built); None for any other record. Raises
    ``msgspec.DecodeError`` if the record is corrupt, as ``decode_record`` does."""
    try:
        return _batch_ids_decoder.decode(raw)
    except msgspec.ValidationError:
        decode_record(raw)  # another kind of record, or a corrupt one: which it is says
        return None


def decode_part(raw: bytes) -> ShardPart:
    return _part_decoder.decode(raw)


_limit_chunk_decoder = msgspec.msgpack.Decoder(list[Any])


def decode_meter_part(raw: bytes) -> MeterPart:
    return _meter_part_decoder.decode(raw)


def decode_limit_chunk(raw: bytes) -> list[Any]:
    """A chunk of a unique_count limit's states (``limits.ShardLimits.unique_chunks``)."""
    return _limit_chunk_decoder.decode(raw)


def decode_block(raw: bytes) -> BlockRecord:
    return _block_decoder.decode(raw)


def decode_engine_state(raw: bytes) -> EngineState:
    return _engine_state_decoder.decode(raw)


def decode_meter(raw: bytes) -> Meter:
    return _meter_decoder.decode(raw)


def decode_alert(raw: bytes) -> Alert:
    return _alert_decoder.decode(raw)
