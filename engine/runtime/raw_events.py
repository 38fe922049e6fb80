"""Reading the raw-event log: the accepted events of a time range, page by page.

Runtime layer: the domain, the store and the dedup keys; no trio (``Engine.raw_events``
runs ``read_page`` on a worker thread). Read-only: it never writes the store.

The raw-event log is the write-ahead log (docs/architecture.md, "History"): batches
exactly as they were logged, duplicates included, kept for ``raw_retention_ms``. A page
walks the log from a cursor (lsn, event index within that record), keeps the events in
``[start_ms, end_ms)`` of event time that match the meter and customer asked for, and
leaves out duplicates as the writer decided them: a batch from ``ids_decided_from`` on
carries its decisions in the store (``read_decisions``: the indices of its events that
were duplicates; ``engine.runtime.idindex``); for a batch logged before that (by a
format-3 or 4 engine) the rule is recomputed (``engine.runtime.dedup``): an event with
a unique id is a duplicate when the legacy dedup tree remembers its key from an earlier
lsn, or when the same key came earlier in the same batch. (An id the tree has already
expired is taken as accepted: the horizon is at least the late limit, so only a retry
sent after it could be miscounted, and the writer accepted such a retry too.)

Completeness: once the log was trimmed, an event time before the first retained
record's arrival plus the future limit may have lost events, so a range starting
before that is refused whole (``InvalidRequest`` naming the oldest time it can read).
A cursor whose record was trimmed between two pages is refused too.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from engine.domain import records
from engine.errors import InvalidRequest
from engine.runtime.dedup import decode_decisions, id_key
from engine.runtime.idindex import DECIDED_FROM_KEY, LSN
from engine.schema import Event, RawEventPage

MAX_PAGE_EVENTS = 100_000
DEFAULT_PAGE_EVENTS = 10_000
# One page looks at no more events than this, so a request over a long log with few
# matches still answers promptly (with fewer events and ``done`` false).
SCAN_EVENTS_PER_PAGE = 250_000
RECORDS_PER_READ = 64


class Store(Protocol):
    """What a page reads of the store (``engine.storage.Store`` has it): read-only, and
    structural, so this module needs no storage import (only the engine hands it one)."""

    def first_lsn(self) -> int: ...

    def last_lsn(self) -> int: ...

    def read_wal_page(self, from_lsn: int, max_records: int) -> list[tuple[int, bytes]]: ...

    def read_ids(self, keys: list[bytes]) -> list[int | None]: ...

    def read_decisions(self, lsn: int) -> bytes | None: ...

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]: ...


@dataclass(frozen=True, slots=True)
class RawEventRequest:
    start_ms: int
    end_ms: int
    meter_api_name: str | None = None
    customer_id: str | None = None
    from_lsn: int = 0
    from_index: int = 0
    limit: int = DEFAULT_PAGE_EVENTS

    def check(self) -> None:
        for name in ("start_ms", "end_ms", "from_lsn", "from_index", "limit"):
            value = getattr(self, name)
            if type(value) is not int:
                raise InvalidRequest(f"{name} must be an integer, got {value!r}")
        if self.start_ms > self.end_ms:
            raise InvalidRequest(f"start_ms {self.start_ms} is after end_ms {self.end_ms}")
        if self.from_lsn < 0 or self.from_index < 0:
            raise InvalidRequest("from_lsn and from_index must not be negative")
        if not 1 <= self.limit <= MAX_PAGE_EVENTS:
            raise InvalidRequest(f"limit must be from 1 to {MAX_PAGE_EVENTS}, got {self.limit}")

    def wants(self, event: Event) -> bool:
        """The event's meter and customer match (its time is checked apart)."""
        return ((self.meter_api_name is None or event.meter_api_name == self.meter_api_name)
                and (self.customer_id is None or event.customer_id == self.customer_id))


def oldest_complete_ms(store: Store, now_ms: int, future_ms: int) -> int | None:
    """The earliest event time whose events are all still in the log; ``None``: the log
    was never trimmed (every event ever accepted is there)."""
    first = store.first_lsn()
    if first == 1 or store.last_lsn() == 0:
        return None
    page = store.read_wal_page(first, 1) if first else []
    if not page:  # all of it was trimmed: no event logged so far can be read back
        return now_ms + future_ms
    record = records.decode_record(page[0][1])
    return int(getattr(record, "received_ms", 0)) + future_ms


def read_page(store: Store, request: RawEventRequest, now_ms: int,
              future_ms: int, cancelled: Container[tuple[int, int]] = frozenset()
              ) -> RawEventPage:
    """One page of ``request`` (see the module docstring)."""
    if request.from_lsn == 0:
        oldest = oldest_complete_ms(store, now_ms, future_ms)
        if oldest is not None and request.start_ms < oldest:
            moment = datetime.fromtimestamp(oldest / 1000, UTC).isoformat(timespec="seconds")
            raise InvalidRequest(
                f"raw events before {moment} ({oldest} ms) are no longer retained (the "
                "write-ahead log was trimmed past its raw-event retention): start there "
                "or later")
    else:
        first = store.first_lsn()
        if request.from_lsn < first or (first == 0 and store.last_lsn() >= request.from_lsn):
            raise InvalidRequest(
                f"the raw events at lsn {request.from_lsn} were trimmed while they were "
                "being read (the raw-event retention passed them): start again from a "
                "later time")
    decided = dict(store.meta_items(DECIDED_FROM_KEY)).get(DECIDED_FROM_KEY)
    decided_from = LSN.unpack(decided)[0] if decided else None
    lsn, index = max(request.from_lsn, 1), request.from_index
    found: list[Event] = []
    examined = 0
    while len(found) < request.limit and examined < SCAN_EVENTS_PER_PAGE:
        page = store.read_wal_page(lsn, RECORDS_PER_READ)
        if not page:
            return RawEventPage(found, lsn, 0, True)
        for record_lsn, raw in page:
            if record_lsn != lsn:
                index = 0  # the record asked for is gone: start the next one at its first
            lsn = record_lsn
            record = records.decode_record(raw)
            if isinstance(record, records.WalBatch):
                logged = decided_from is not None and lsn >= decided_from
                stopped = _take_events(store, request, record, lsn, index, found, logged,
                                       cancelled)
                examined += stopped - index
                if stopped < len(record.events):
                    return RawEventPage(found, lsn, stopped, False)
            elif isinstance(record, records.WalCorrection) and record.kind == "cancel_previous":
                # Ingested events that replaced earlier ones (Amberflo's flag): raw events.
                logged = record.amended_events()
                stopped = _take_listed(request, logged, lsn, index, found, cancelled)
                examined += stopped - index
                if stopped < len(logged):
                    return RawEventPage(found, lsn, stopped, False)
            lsn, index = record_lsn + 1, 0
            if len(found) >= request.limit or examined >= SCAN_EVENTS_PER_PAGE:
                break
    return RawEventPage(found, lsn, index, False)


def _take_events(store: Store, request: RawEventRequest, batch: records.WalBatch, lsn: int,
                 index: int, found: list[Event], logged: bool,
                 cancelled: Container[tuple[int, int]] = frozenset()) -> int:
    """Append the wanted, accepted events of ``batch`` from ``index`` on to ``found``,
    until the page is full; returns the index of the first event not looked at.
    ``logged``: the batch's dedup decisions are in the store. ``cancelled``: positions
    a correction cancelled (``engine.runtime.corrections``), left out."""
    events = batch.events
    if logged:
        return _take_logged(store, request, batch, lsn, index, found, cancelled)
    seen: set[bytes] = set()  # unique-id keys met earlier in this batch
    for event in events[:index]:
        if event.unique_id is not None and request.wants(event):
            seen.add(id_key(event.meter_api_name, event.customer_id, event.unique_id))
    room = request.limit - len(found)
    candidates: list[tuple[Event, bytes | None]] = []
    position = index
    while position < len(events) and len(candidates) < room:
        event = events[position]
        position += 1
        if not request.wants(event):
            continue
        key = None
        if event.unique_id is not None:
            key = id_key(event.meter_api_name, event.customer_id, event.unique_id)
            if key in seen:
                continue  # a retry inside the batch: the first occurrence counted
            seen.add(key)
        if (request.start_ms <= event.meter_time_in_millis < request.end_ms
                and (lsn, position - 1) not in cancelled):
            candidates.append((event, key))
    keys = [key for _, key in candidates if key is not None]
    stored = iter(store.read_ids(keys)) if keys else iter(())
    for event, key in candidates:
        if key is not None:
            first_lsn = next(stored)
            if first_lsn is not None and first_lsn < lsn:
                continue  # the id was accepted by an earlier batch: a duplicate
        found.append(event)
    return position


def _take_listed(request: RawEventRequest, events: list[Event], lsn: int, index: int,
                 found: list[Event], cancelled: Container[tuple[int, int]]) -> int:
    """``_take_logged`` for a record whose every event was accepted."""
    position = index
    while position < len(events) and len(found) < request.limit:
        event = events[position]
        if (request.wants(event) and request.start_ms <= event.meter_time_in_millis
                < request.end_ms and (lsn, position) not in cancelled):
            found.append(event)
        position += 1
    return position


def _take_logged(store: Store, request: RawEventRequest, batch: records.WalBatch, lsn: int,
                 index: int, found: list[Event],
                 cancelled: Container[tuple[int, int]] = frozenset()) -> int:
    duplicates = decode_decisions(store.read_decisions(lsn))
    events = batch.events
    position = index
    while position < len(events) and len(found) < request.limit:
        event = events[position]
        if (position not in duplicates and request.wants(event)
                and request.start_ms <= event.meter_time_in_millis < request.end_ms
                and (lsn, position) not in cancelled):
            found.append(event)
        position += 1
    return position
