"""Corrections: cancel events by unique id or by filter, amend one, list them.

Runtime layer: the domain, the storage protocol (read-only here: ``read_wal_page``,
``read_decisions``, ``meta_items``) and ``engine.runtime.dedup``'s key function.
Everything in this module runs on a worker thread or in the writer; it never
writes the store (the writer commits what ``PendingCorrection.build`` returns).

How a correction is made (see docs/architecture.md "Corrections"):

1. ``resolve`` (a worker thread, read transactions, no lock held by ingest): scan
   the retained log up to the last committed lsn for the live events the target
   names (accepted, not a duplicate, not cancelled before): the *targets*. Their
   (customer, minute)s are the affected minutes; a second pass applies every other
   live event of those minutes to a scratch ``ShardState``.
2. The writer, in a group of its own, brings the scratch state up to its last
   committed lsn (``catch_up``: only the events logged since step 1), adds the
   amended event at the record's own lsn, and logs a ``WalCorrection`` carrying the
   targets' positions and the rebuilt buckets of the affected minutes, together
   with the catalogue entries below in the same transaction.
3. Each shard replaces those minutes in its head (``ShardState.correct``). Replay
   applies the record the same way, without reading the log.

Catalogue entries (the store's meta, written with the record; a few per correction,
however many events it cancels): ``corr/q/<lsn>`` its cancelled positions as runs
(``lsn, first index, count``, packed ``>QII``; later scans and ``raw_events`` skip
them), ``corr/z/<lsn>`` the unique-id keys it cancelled (msgpack lists of up to 8,192
keys, each after its length as ``>I``, all zlib compressed), which the dedup decision
re-admits once each;
``corr/u/<id key>`` the lsn of the correction whose re-admission of the key was used
(written by the commit that used it); ``corr/r/<lsn>`` the audit record
(``records.Correction``). Stores written before runs and compression hold
``corr/p/<lsn>`` (positions packed ``>QI`` one by one) and ``corr/k/<lsn>`` (the
keys uncompressed) instead; both are read.

The writer waits for a correction's commit (nothing else is committed meanwhile), so
what it carries is kept small whatever the correction's size: a million cancelled
events of a few batches are a few runs, and their keys compress to about 2.6 bytes
each (measured on keys like ``calls NUL bulk NUL b-123456``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

import msgspec

from engine.domain import records
from engine.domain.batch import ShardRouter, prepare_batch
from engine.domain.corrections import minute_buckets
from engine.domain.meters import REPLAY_RULES, MeterDef
from engine.domain.shard import ShardState
from engine.domain.values import fits_msgpack_int
from engine.domain.windows import MINUTE_MS
from engine.errors import InvalidRequest
from engine.faults import fault_point
from engine.runtime.dedup import decode_decisions, id_key
from engine.runtime.idindex import DECIDED_FROM_KEY, LSN
from engine.runtime.raw_events import oldest_complete_ms
from engine.schema import Event

POSITION_PREFIX = b"corr/p/"  # stores from before runs: positions one by one
READMIT_PREFIX = b"corr/k/"  # stores from before compression
RUNS_PREFIX = b"corr/q/"
PACKED_READMIT_PREFIX = b"corr/z/"
RECORD_PREFIX = b"corr/r/"
USED_PREFIX = b"corr/u/"
POSITION = struct.Struct(">QI")
RUN = struct.Struct(">QII")
CHUNK_LENGTH = struct.Struct(">I")
READMIT_CHUNK = 8192
CORRECTION_LSN = struct.Struct(">Q")
RECORDS_PER_READ = 256


_correction_decoder = msgspec.msgpack.Decoder(records.Correction)


class Store(Protocol):
    def first_lsn(self) -> int: ...

    def last_lsn(self) -> int: ...

    def read_ids(self, keys: list[bytes]) -> list[int | None]: ...

    def read_wal_page(self, from_lsn: int, max_records: int) -> list[tuple[int, bytes]]: ...

    def read_decisions(self, lsn: int) -> bytes | None: ...

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]: ...


class CancelledPositions:
    """The positions (lsn, index in the record) of cancelled events, as a bitmap per
    record: membership tests (``(lsn, index) in positions``, or ``bits_of(lsn)`` once
    per record and ``is_set`` per event) from scans on worker threads, while the writer
    ``merge``s a committed correction's bitmaps (one dict store per record, each value
    replaced whole, never changed in place)."""

    __slots__ = ("_bits",)

    def __init__(self) -> None:
        self._bits: dict[int, bytes] = {}

    def __contains__(self, position: object) -> bool:
        if not isinstance(position, tuple) or len(position) != 2:
            return False
        lsn, index = position
        return is_set(self._bits.get(lsn), index)

    def __len__(self) -> int:
        return sum(int.from_bytes(bits, "little").bit_count() for bits in self._bits.values())

    def bits_of(self, lsn: int) -> bytes | None:
        """The record's bitmap (bit ``index % 8`` of byte ``index // 8``), None: none."""
        return self._bits.get(lsn)

    def merge(self, bitmaps: dict[int, bytes]) -> None:
        for lsn, bits in bitmaps.items():
            old = self._bits.get(lsn)
            self._bits[lsn] = bits if old is None else or_bits(old, bits)


def is_set(bits: bytes | None, index: int) -> bool:
    """Whether bit ``index`` of a bitmap is set (None: an empty bitmap)."""
    return bits is not None and index >> 3 < len(bits) and bool(bits[index >> 3] >> (index & 7) & 1)


def or_bits(a: bytes, b: bytes) -> bytes:
    width = max(len(a), len(b))
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(width, "little")


def extend_runs(runs: list[int], lsn: int, index: int) -> None:
    """Add position (lsn, index), at or after every position in ``runs`` (flattened
    ``lsn, first index, count``), extending the last run where it continues it."""
    if runs and runs[-3] == lsn and runs[-2] + runs[-1] == index:
        runs[-1] += 1
    else:
        runs += (lsn, index, 1)


def run_bitmaps(runs: list[int]) -> dict[int, bytes]:
    """Per lsn, the bitmap of flattened ``lsn, first index, count`` runs."""
    building: dict[int, bytearray] = {}
    for at in range(0, len(runs), 3):
        lsn, first, count = runs[at], runs[at + 1], runs[at + 2]
        bits = building.setdefault(lsn, bytearray())
        end = first + count
        if len(bits) < (end + 7) >> 3:
            bits.extend(bytes(((end + 7) >> 3) - len(bits)))
        index = first
        while index < end and index & 7:
            bits[index >> 3] |= 1 << (index & 7)
            index += 1
        whole = (end - index) >> 3
        if whole:
            bits[index >> 3:(index >> 3) + whole] = b"\xff" * whole
            index += whole << 3
        while index < end:
            bits[index >> 3] |= 1 << (index & 7)
            index += 1
    return {lsn: bytes(bits) for lsn, bits in building.items()}


def pack_readmit(keys: list[bytes]) -> bytes:
    """A ``corr/z/`` entry's value, encoded a chunk at a time (see ``PendingCorrection``)."""
    chunks: list[bytes] = []
    for at in range(0, len(keys), READMIT_CHUNK):
        encoded = records.encode(keys[at:at + READMIT_CHUNK])
        chunks += (CHUNK_LENGTH.pack(len(encoded)), encoded)
    return zlib.compress(b"".join(chunks), 1)


def unpack_readmit(packed: bytes) -> list[bytes]:
    """The keys of a ``corr/z/`` entry: zlib over length-prefixed msgpack lists."""
    raw = zlib.decompress(packed)
    keys: list[bytes] = []
    at = 0
    while at < len(raw):
        (length,) = CHUNK_LENGTH.unpack_from(raw, at)
        at += CHUNK_LENGTH.size
        keys += _keys_decoder.decode(raw[at:at + length])
        at += length
    return keys


_keys_decoder = msgspec.msgpack.Decoder(list[bytes])


class CorrectionBook:
    """What earlier corrections decided, as later ones and ingest need it: the cancelled
    positions and the cancelled unique ids not yet re-admitted. Changed only by the
    writer after a commit; read by scans on worker threads (membership tests only).
    ``readmit`` maps an id key to a one-item list holding the lsn of the correction
    that cancelled it (shared by all of a correction's keys, so the scan's thread can
    build the map before the lsn is known)."""

    def __init__(self) -> None:
        self.positions = CancelledPositions()
        self.readmit: dict[bytes, list[int]] = {}

    @classmethod
    def load(cls, store: Store) -> CorrectionBook:
        book = cls()
        runs: list[int] = []
        for _, packed in store.meta_items(POSITION_PREFIX):
            for lsn, index in POSITION.iter_unpack(packed):
                runs += (lsn, index, 1)
        for _, packed in store.meta_items(RUNS_PREFIX):
            for run in RUN.iter_unpack(packed):
                runs += run
        book.positions.merge(run_bitmaps(runs))
        keyed: list[tuple[int, list[bytes]]] = []
        for key, packed in store.meta_items(READMIT_PREFIX):
            lsn = CORRECTION_LSN.unpack(key[len(READMIT_PREFIX):])[0]
            keyed.append((lsn, msgspec.msgpack.decode(packed, type=list[bytes])))
        for key, packed in store.meta_items(PACKED_READMIT_PREFIX):
            lsn = CORRECTION_LSN.unpack(key[len(PACKED_READMIT_PREFIX):])[0]
            keyed.append((lsn, unpack_readmit(packed)))
        for lsn, keys in sorted(keyed, key=lambda item: item[0]):  # later corrections win
            cell = [lsn]  # one per correction, shared by its keys
            book.readmit.update(dict.fromkeys(keys, cell))
        for key, value in store.meta_items(USED_PREFIX):
            id_key_bytes = key[len(USED_PREFIX):]
            used = book.readmit.get(id_key_bytes)
            if used is not None and used[0] == CORRECTION_LSN.unpack(value)[0]:
                del book.readmit[id_key_bytes]
        return book


def list_corrections(store: Store, meter_api_name: str | None,
                     customer_id: str | None) -> list[records.Correction]:
    found = []
    for _, raw in store.meta_items(RECORD_PREFIX):
        correction = _correction_decoder.decode(raw)
        if meter_api_name is not None and correction.meter_api_name != meter_api_name:
            continue
        if customer_id is not None and correction.customer_id not in (customer_id, None):
            continue
        found.append(correction)
    return found


@dataclass(frozen=True, slots=True)
class Target:
    """Which live events a correction cancels: of ``meter``, of ``customer_id`` (None:
    every customer), with one of ``unique_ids``, or else in the event-time range, the
    received-time range and the dimension filters (``Query.filter``'s meaning)."""

    meter: str
    customer_id: str | None
    unique_ids: frozenset[str] | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    received_start_ms: int | None = None
    received_end_ms: int | None = None
    dim_filters: tuple[tuple[str, frozenset[str]], ...] = ()
    unique_dimension: str | None = None  # the meter's: not a dimension a filter sees

    def matches(self, event: Event, received_ms: int) -> bool:
        if event.meter_api_name != self.meter:
            return False
        if self.customer_id is not None and event.customer_id != self.customer_id:
            return False
        if self.unique_ids is not None:
            return event.unique_id in self.unique_ids
        ts = event.meter_time_in_millis
        if self.start_ms is not None and ts < self.start_ms:
            return False
        if self.end_ms is not None and ts >= self.end_ms:
            return False
        if self.received_start_ms is not None and received_ms < self.received_start_ms:
            return False
        if self.received_end_ms is not None and received_ms >= self.received_end_ms:
            return False
        dims = event.dimensions
        for key, allowed in self.dim_filters:
            value = (event.customer_id if key == "customer_id"
                     else None if key == self.unique_dimension else dims.get(key))
            if value not in allowed:
                return False
        return True


def live_events(store: Store, positions: CancelledPositions, from_lsn: int,
                to_lsn: int) -> Iterator[tuple[int, int, list[tuple[int, Event]]]]:
    """(lsn, received_ms, [(index, event)]) of every record in ``[from_lsn, to_lsn]``
    that holds counted events: a batch's accepted events (logged dedup decisions
    applied) and an amend's corrected event (index 0), less the cancelled positions.
    Batches logged before the dedup decisions were (stores from before the index) are
    taken whole."""
    decided = dict(store.meta_items(DECIDED_FROM_KEY)).get(DECIDED_FROM_KEY)
    decided_from = LSN.unpack(decided)[0] if decided else None
    lsn = max(from_lsn, store.first_lsn(), 1)
    while lsn <= to_lsn:
        page = store.read_wal_page(lsn, RECORDS_PER_READ)
        if not page:
            return
        for record_lsn, raw in page:
            if record_lsn > to_lsn:
                return
            lsn = record_lsn + 1
            record = records.decode_record(raw)
            cancelled = positions.bits_of(record_lsn)
            if isinstance(record, records.WalBatch):
                duplicates = (decode_decisions(store.read_decisions(record_lsn))
                              if decided_from is not None and record_lsn >= decided_from
                              else set())
                if cancelled is None and not duplicates:
                    found = list(enumerate(record.events))
                else:
                    found = [(index, event) for index, event in enumerate(record.events)
                             if index not in duplicates and not is_set(cancelled, index)]
                yield record_lsn, record.received_ms, found
            elif isinstance(record, records.WalCorrection) and record.amended is not None:
                found = [(index, event) for index, event in enumerate(record.amended_events())
                         if not is_set(cancelled, index)]
                if found:
                    yield record_lsn, record.received_ms, found


@dataclass(slots=True, eq=False)
class PendingCorrection:
    """A correction between its scan and its commit (see the module docstring).

    Its targets are kept as what the record and the catalogue need, not as a list of
    events: a count, runs of positions and the unique-id keys to re-admit. A million
    targets held as (lsn, index, event) tuples cost about a second to build on the
    scan's thread and a quarter of one to free on the event loop."""

    kind: str
    target: Target
    meter: MeterDef
    by: str
    received_ms: int
    description: str
    # The events the record logs (an amend's one; a cancel_previous's, each replacing
    # the live event with its unique id). A cancel_previous's events whose id has no
    # live event are left out once resolved (the caller ingests them as usual).
    amended: list[Event] = field(default_factory=list)
    count: int = 0  # how many events it cancels (its targets)
    # Flattened ``lsn, first index, count``: the targets' positions, in log order.
    runs: list[int] = field(default_factory=list)
    affected: dict[str, set[int]] = field(default_factory=dict)
    scratch: ShardState = field(default_factory=ShardState)
    scan_lsn: int = 0
    logged_lsn: int = 0  # the record's, once committed
    # What the targets alone decide, made on the scan's thread (``_prepare_targets``)
    # so the writer, which waits for ``finish``, does not.
    bitmaps: dict[int, bytes] = field(default_factory=dict)  # the runs, per lsn
    # Id key -> ``_readmit_cell``, which ``build`` fills with the record's lsn
    # (``CorrectionBook.readmit``).
    readmit: dict[bytes, list[int]] = field(default_factory=dict)
    _readmit_cell: list[int] = field(default_factory=lambda: [0])
    _target_ids: set[str] = field(default_factory=set)  # a cancel_previous's
    _readmit_keys: list[bytes] = field(default_factory=list)
    _packed_runs: bytes = b""
    _encoded_readmit: bytes = b""

    # ------------------------------------------------------------ worker thread

    def resolve(self, store: Store, positions: CancelledPositions, to_lsn: int) -> None:
        """Find the targets and rebuild their minutes from the other live events, up to
        ``to_lsn`` (a committed lsn)."""
        matches, runs = self.target.matches, self.runs
        keep_ids = self.kind == "cancel_previous"
        keep_keys = self.kind not in ("amend", "cancel_previous")  # those keep ids live
        keys = self._readmit_keys
        for lsn, received_ms, events in live_events(store, positions, 0, to_lsn):
            for index, event in events:
                if not matches(event, received_ms):
                    continue
                self.count += 1
                extend_runs(runs, lsn, index)
                self._affect(event)
                if event.unique_id is not None:
                    if keep_ids:
                        self._target_ids.add(event.unique_id)
                    elif keep_keys:
                        keys.append(id_key(event.meter_api_name, event.customer_id,
                                           event.unique_id))
        if self.kind == "cancel_previous":
            self.amended = [e for e in self.amended if e.unique_id in self._target_ids]
        for event in self.amended:
            self._affect(event)
        self._prepare_targets()
        self._fold(store, positions, self.bitmaps, 0, to_lsn)
        self.scan_lsn = to_lsn
        fault_point("correction.scanned")

    def _prepare_targets(self) -> None:
        """The parts of the record and catalogue entries that depend on the targets
        only (``catch_up`` adds none)."""
        self.bitmaps = run_bitmaps(self.runs)
        pack = RUN.pack
        runs = self.runs
        self._packed_runs = b"".join([pack(runs[at], runs[at + 1], runs[at + 2])
                                      for at in range(0, len(runs), 3)])
        keys = self._readmit_keys
        if keys:
            # In chunks: each C call below holds the interpreter lock for its length,
            # and a million keys at once kept the event loop waiting 150 ms.
            cell = self._readmit_cell
            for at in range(0, len(keys), READMIT_CHUNK):
                self.readmit.update(dict.fromkeys(keys[at:at + READMIT_CHUNK], cell))
            self._encoded_readmit = pack_readmit(keys)
            self._readmit_keys = []

    def resolve_within_retention(self, store: Store, positions: CancelledPositions,
                                 to_lsn: int, now_ms: int, future_ms: int) -> None:
        """``resolve``, then refuse the whole correction (``InvalidRequest``) if a minute it
        rebuilds begins before ``oldest_correctable_ms``: some of that minute's events may
        be gone from the log, so the minute cannot be rebuilt exactly."""
        self.resolve(store, positions, to_lsn)
        first = self.first_minute()
        if first is not None and self.count:
            check_retention(first * MINUTE_MS, oldest_correctable_ms(store, now_ms, future_ms))

    def catch_up(self, store: Store, positions: CancelledPositions, to_lsn: int) -> None:
        """Fold in the events logged after the scan (the writer calls this with nothing
        else in flight): they are kept, even where they match the target."""
        if to_lsn > self.scan_lsn:
            self._fold(store, positions, {}, self.scan_lsn + 1, to_lsn)
            self.scan_lsn = to_lsn

    def first_minute(self) -> int | None:
        """The earliest minute this correction rebuilds (None: none)."""
        return min((min(minutes) for minutes in self.affected.values() if minutes),
                   default=None)

    def finish(self, store: Store, positions: CancelledPositions, last_lsn: int,
               route: ShardRouter,
               ) -> tuple[bytes, list[list[records.CorrectedMinutes]], list[tuple[bytes, bytes]]]:
        """``catch_up`` to ``last_lsn``, then ``build`` the record for the lsn after it."""
        self.catch_up(store, positions, last_lsn)
        return self.build(last_lsn + 1, route)

    def build(self, lsn: int, route: ShardRouter,
              ) -> tuple[bytes, list[list[records.CorrectedMinutes]], list[tuple[bytes, bytes]]]:
        """The record for lsn ``lsn``, each shard's share of it and its catalogue entries
        (``readmit``'s keys are re-admissible once it is committed, under this lsn).
        Minutes in sealed history are rebuilt like any other: each shard puts them where
        its boundary says (``ShardState.correct``)."""
        if self.amended:
            # As a batch logs them (``records.encode_batch``): msgpack stops at 64 bits.
            self.amended = [
                msgspec.structs.replace(event, meter_value=Decimal(event.meter_value))
                if type(event.meter_value) is int and not fits_msgpack_int(event.meter_value)
                else event for event in self.amended]
            self._apply(lsn, list(enumerate(self.amended)))
        first_amended = self.amended[0] if self.amended else None
        meter_shard = self.scratch.meter_shard(self.meter)
        per_shard: list[list[records.CorrectedMinutes]] = [[] for _ in range(route.shard_count)]
        all_changes = []
        for customer in sorted(self.affected):
            minutes = self.affected[customer]
            change = records.CorrectedMinutes(
                customer, sorted(minutes), minute_buckets(meter_shard, customer, minutes))
            per_shard[route(customer)].append(change)
            all_changes.append(change)
        record = records.encode(records.WalCorrection(
            self.kind, self.meter.name, self.target.customer_id, self.by, self.received_ms,
            self.description, [], all_changes, first_amended, self.amended[1:], self.runs))
        marker = CORRECTION_LSN.pack(lsn)
        meta = [(RUNS_PREFIX + marker, self._packed_runs)]
        if self.readmit:
            self._readmit_cell[0] = lsn
            meta.append((PACKED_READMIT_PREFIX + marker, self._encoded_readmit))
        meta.append((RECORD_PREFIX + marker, records.encode(records.Correction(
            lsn=lsn, kind=self.kind, meter_api_name=self.meter.name,
            customer_id=self.target.customer_id, by=self.by, received_ms=self.received_ms,
            description=self.description, cancelled=self.count,
            amended=first_amended))))
        fault_point("correction.built")
        return record, per_shard, meta

    # ------------------------------------------------------------------ helpers

    def _affect(self, event: Event) -> None:
        self.affected.setdefault(event.customer_id, set()).add(
            event.meter_time_in_millis // MINUTE_MS)

    def _fold(self, store: Store, positions: CancelledPositions,
              skip: dict[int, bytes], from_lsn: int, to_lsn: int) -> None:
        affected, meter = self.affected, self.meter.name
        for lsn, _, events in live_events(store, positions, from_lsn, to_lsn):
            skipped = skip.get(lsn)
            kept = [(index, event) for index, event in events
                    if event.meter_api_name == meter
                    and event.meter_time_in_millis // MINUTE_MS
                    in affected.get(event.customer_id, ())
                    and not is_set(skipped, index)]
            if kept:
                self._apply(lsn, kept)

    def _apply(self, lsn: int, events: list[tuple[int, Event]]) -> None:
        """Apply events to the scratch state as their shard did (same seq for latest)."""
        slices = prepare_batch([event for _, event in events], {self.meter.name: self.meter},
                               ShardRouter(1), REPLAY_RULES, None)
        indices = [index for index, _ in events]
        for _, columns in slices[0]:
            columns.indices = [indices[i] for i in columns.indices]
        self.scratch.apply(lsn, slices[0], 0)


def oldest_correctable_ms(store: Store, now_ms: int, future_ms: int) -> int | None:
    """The earliest event time a correction can reach (None: any): the first whole
    minute whose events are all still in the raw-event log (the write-ahead log, trimmed
    past ``raw_retention_ms``), since a correction rebuilds whole minutes from them."""
    oldest = oldest_complete_ms(store, now_ms, future_ms)
    return None if oldest is None else -(-oldest // MINUTE_MS) * MINUTE_MS


def check_retention(start_ms: int, oldest_ms: int | None) -> None:
    """Refuse (``InvalidRequest``, naming the oldest time it can correct) a correction
    reaching event time ``start_ms`` before ``oldest_ms``."""
    if oldest_ms is not None and start_ms < oldest_ms:
        moment = datetime.fromtimestamp(oldest_ms / 1000, UTC).isoformat(timespec="seconds")
        raise InvalidRequest(
            f"events before {oldest_ms} ms ({moment}) are past the raw-event retention and "
            f"cannot be corrected: the oldest time a correction can reach is {oldest_ms} ms")


def describe(target: Target) -> str:
    """A one-line account of a target for the audit record."""
    parts: list[str] = []
    if target.unique_ids is not None:
        parts.append("unique_ids=" + ",".join(sorted(target.unique_ids)))
    for name in ("start_ms", "end_ms", "received_start_ms", "received_end_ms"):
        value = getattr(target, name)
        if value is not None:
            parts.append(f"{name}={value}")
    for key, allowed in target.dim_filters:
        parts.append(f"{key} in {sorted(allowed)}")
    return " ".join(parts)
