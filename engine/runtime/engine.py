"""The embedded engine: its public API and ``open_engine``.

Runtime layer. This module wires the owners together and holds none of their
state itself (docs/architecture.md has the table of every piece of state and
its owner):

- ``recovery.recover`` rebuilds the catalog, the shard states and the alert log
  before any task runs;
- ``WalWriter`` (one task) is the only writer of the store;
- ``ShardActor`` (one task per shard) owns one ``ShardState``;
- ``AckSequencer`` acknowledges WAL records in lsn order and numbers alerts;
- ``Catalog`` holds meter and limit definitions, changed in commit order;
- ``Lifecycle`` knows whether the engine is open and fails waiting callers when
  it stops.

Callers (``ingest``, ``query``, ``define_meter`` ...) validate in their own task,
send a typed request, then wait on its ticket. Durability contract: ``ingest``
returns only after the batch's transaction committed with fsync *and* every
shard applied its slice. Dedup decisions are made by the WAL writer in the
batch's own commit, against the store's dedup index, in lsn order; replay after a
crash recomputes them from the index (``engine.runtime.dedup``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import msgspec
import trio

from engine.domain import records
from engine.domain.aggregates import DistinctCounts
from engine.domain.batch import (
    CANCEL_PREVIOUS,
    CancelPreviousFlagged,
    ShardRouter,
    ShardSlice,
    prepare_batch,
)
from engine.domain.limits import LimitError, check_limit, period_bounds
from engine.domain.meters import IngestRules, check_meter, merge_meter
from engine.domain.query import (
    QueryPlan,
    finish_dimension,
    finish_page,
    finish_query,
    plan_query,
)
from engine.domain.records import Correction
from engine.domain.traits import names_traits, plan_traits
from engine.errors import InvalidQuery, InvalidRequest, UnknownMeter
from engine.runtime import messages
from engine.runtime.acks import AckSequencer
from engine.runtime.alerts import AlertHub, AlertSubscription
from engine.runtime.blocks import DEFAULT_BLOCK_CACHE_BYTES, BlockCache
from engine.runtime.catalog import Catalog
from engine.runtime.corrections import (
    CorrectionBook,
    PendingCorrection,
    Target,
    check_retention,
    describe,
    list_corrections,
    oldest_correctable_ms,
)
from engine.runtime.customers import CustomerRegistry
from engine.runtime.extensions import Extension
from engine.runtime.gc_tuning import DEFAULT_SWITCH_INTERVAL_S, tuned_gc, tuned_switching
from engine.runtime.groups import unwrap_single
from engine.runtime.history import DEFAULT_HOT_WINDOW_MS, DEFAULT_RAW_RETENTION_MS, HistoryPolicy
from engine.runtime.lifecycle import Lifecycle, closed_channel_is_closed_engine
from engine.runtime.raw_events import DEFAULT_PAGE_EVENTS, RawEventRequest
from engine.runtime.raw_events import read_page as raw_event_page
from engine.runtime.recovery import recover
from engine.runtime.shards import ShardActor, shard_part
from engine.runtime.statistics import EngineStatistics, series_and_buckets
from engine.runtime.writer import WalWriter
from engine.schema import (
    Backup,
    Customer,
    Dimension,
    Event,
    IngestAck,
    Limit,
    Meter,
    Query,
    QueryPage,
    QueryResult,
    RawEventPage,
)
from engine.storage import LmdbStore, Store
from engine.storage.lmdb_store import DEFAULT_MAP_BYTES, DEFAULT_MAX_MAP_BYTES

WRITE_QUEUE = 64
MAILBOX_SIZE = 64
# The remembered unique_count counts may hold this share of block_cache_bytes on top of
# it (an eighth: 8 MiB at the default 64 MiB).
DISTINCT_COUNTS_SHARE = 8
# A checkpoint writes only the head's hours that changed (engine.domain.head), so it is
# cheap to take often; the WAL a restart replays after it is bounded by this (16 MiB is
# about 150,000 events of the growth benchmark's shape: about 0.7 s of replay).
DEFAULT_SNAPSHOT_EVERY_BYTES = 16 << 20


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Engine:
    """An open metering engine. Create it with ``open_engine``."""

    def __init__(self, store: Store, shard_count: int, ingest_rules: IngestRules,
                 clock_ms: Callable[[], int], snapshot_every_bytes: int,
                 history: HistoryPolicy | None = None,
                 block_cache_bytes: int = DEFAULT_BLOCK_CACHE_BYTES,
                 dedup_horizon_ms: int | None = None,
                 extension: Extension | None = None) -> None:
        if type(shard_count) is not int or not 1 <= shard_count <= 4096:
            raise ValueError(f"shards must be an integer from 1 to 4096, got {shard_count!r}")
        if dedup_horizon_ms is None:
            dedup_horizon_ms = ingest_rules.late_ms
        if type(dedup_horizon_ms) is not int or dedup_horizon_ms < ingest_rules.late_ms:
            raise ValueError(
                f"dedup_horizon_ms must be an integer of at least the late-event limit "
                f"(ingest_rules.late_ms = {ingest_rules.late_ms} ms), got "
                f"{dedup_horizon_ms!r}: a retry older than the horizon but not yet late "
                "would be counted twice")
        self.dedup_horizon_ms = dedup_horizon_ms
        self._store = store
        self.shard_count = shard_count
        self.ingest_rules = ingest_rules
        self._clock_ms = clock_ms
        self._route = ShardRouter(shard_count)
        self._catalog = Catalog()
        self._catalog.extension = extension  # pricing, if any (engine.runtime.extensions)
        self._hub = AlertHub(store)
        self._lifecycle = Lifecycle()
        # Made before recovery: the replay reads and rewrites sealed blocks through it.
        self._blocks = BlockCache(store, block_cache_bytes)
        self._recovered = recover(store, shard_count, ingest_rules, self._route, self._catalog,
                                  self._hub, clock_ms(), self._blocks)
        self._history = history or HistoryPolicy(clock_ms=clock_ms)
        # Counts of unique_count groups over named parts (sealed rollups, remembered head
        # slices), for the queries' finishing step, which runs in the caller's task.
        self._distinct_counts = DistinctCounts(block_cache_bytes // DISTINCT_COUNTS_SHARE)
        self._acks = AckSequencer(self._hub, self._recovered.last_lsn + 1, extension)
        # Each shard's late-event buckets waiting for compaction: written by its actor,
        # read by the writer, which schedules the compaction passes.
        delta_buckets = [state.delta_buckets for state in self._recovered.states]
        self._actors = [ShardActor(index, state, self._acks, self._lifecycle, self._blocks,
                                   shard_count, delta_buckets, self._distinct_counts)
                        for index, state in enumerate(self._recovered.states)]
        self._write_send, self._write_receive = trio.open_memory_channel[messages.WriteRequest](
            WRITE_QUEUE)
        self._mailboxes = [trio.open_memory_channel[messages.ShardMessage](MAILBOX_SIZE)
                           for _ in range(shard_count)]
        self._writer = WalWriter(
            store, self._catalog, self._hub, self._acks, self._lifecycle,
            [send for send, _ in self._mailboxes],
            last_lsn=self._recovered.last_lsn,
            wal_bytes_since_snapshot=self._recovered.wal_bytes_since_snapshot,
            snapshot_every_bytes=snapshot_every_bytes,
            history=self._history,
            blocks=self._blocks,
            wal_marks=self._recovered.wal_marks,
            sealed_before_minutes=[state.sealed_before_minute
                                   for state in self._recovered.states],
            head_rewrite=any(state.head_log.rewrite for state in self._recovered.states),
            dedup_horizon_ms=dedup_horizon_ms,
            future_ms=ingest_rules.future_ms,
            snapshot_lsn=self._recovered.snapshot_lsn,
            index=self._recovered.index,
            decided_from=self._recovered.decided_from,
            delta_buckets=delta_buckets,
        )
        self._customers = CustomerRegistry(
            self._catalog, self._route, ingest_rules, [send for send, _ in self._mailboxes],
            self._lifecycle, self._submit, clock_ms)
        # Written only by ``ingest``, after its acknowledgement.
        self._events_accepted = self._events_duplicate = self._batches = 0
        # Held by a running backup: one at a time, and closing the store waits for it.
        self._backup_lock = trio.Lock()
        # Held while a page of raw events is read on a worker thread (one page at a time).
        self._raw_read_lock = trio.Lock()
        self._writer.corrections = CorrectionBook.load(store)
        # Held while a correction scans and commits: one at a time (engine.runtime.corrections).
        self._correction_lock = trio.Lock()

    # --------------------------------------------------------------- tasks

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            # The task that failed first stops the engine: its error, not a nested group,
            # is what ``open_engine`` raises (a storage failure arrives as StorageError).
            with unwrap_single():
                async with trio.open_nursery() as nursery:
                    for actor, (_, mailbox) in zip(self._actors, self._mailboxes, strict=True):
                        nursery.start_soon(actor.run, mailbox)
                    # The writer has the shards seal what their clock left behind first.
                    await nursery.start(self._writer.run, self._write_receive)
                    task_status.started()
        finally:
            # However the tasks ended, nobody may wait forever for an answer.
            self._lifecycle.fail_outstanding()

    async def _submit(self, request: messages.WriteRequest) -> None:
        self._lifecycle.check_open()
        with self._lifecycle.waiting(request.ticket):
            with closed_channel_is_closed_engine():
                await self._write_send.send(request)
            await request.ticket.wait()

    async def _close(self, snapshot: bool) -> None:
        """Stop taking requests, let the writer drain and snapshot, stop the shards."""
        self._lifecycle.close()
        if self._lifecycle.failure is None and snapshot:
            ticket = messages.SnapshotTicket()
            try:
                await self._write_send.send(messages.TakeSnapshot(ticket))
                await ticket.done.wait()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        await self._write_send.aclose()
        for send, _ in self._mailboxes:
            await send.aclose()
        async with self._backup_lock:  # the store is closed next: no copy may still read it
            pass
        async with self._raw_read_lock:  # nor a page of raw events
            pass

    # ---------------------------------------------------------- public API

    async def define_meter(self, meter: Meter) -> Meter:
        """Define a meter (idempotent). A different aggregation for a known name is refused."""
        if type(meter) is not Meter:
            raise InvalidRequest(f"expected a Meter, got {type(meter).__name__}")
        try:
            meter_def = check_meter(meter, self.ingest_rules)
        except ValueError as exc:
            raise InvalidRequest(f"meter {meter.name!r}: {exc}") from None
        known = self._catalog.meter_defs.get(meter.name)
        if not merge_meter(known, meter_def):
            assert known is not None
            return known.meter
        # The writer decides again in commit order, where a concurrent definition may win.
        await self._submit(messages.DefineMeter(
            messages.Ticket(), meter_def, b"meter:" + meter.name.encode(), records.encode(meter)))
        return meter

    def meters(self) -> list[Meter]:
        return self._catalog.meters()

    async def ingest(self, events: Sequence[Event], *, report_alerts: bool = False) -> IngestAck:
        """Validate, log durably (fsync), apply; then acknowledge.

        Raises ``BatchRejected`` naming every bad event; then nothing is applied.
        With ``report_alerts=True`` the ack lists the limit crossings this batch caused,
        so a caller can enforce a hard limit synchronously.
        """
        self._lifecycle.check_open()
        if not isinstance(events, list):
            events = list(events)
        now_ms = self._clock_ms()
        try:
            slices = prepare_batch(events, self._catalog.meter_defs, self._route,
                                   self.ingest_rules, now_ms)
        except CancelPreviousFlagged:
            return await self._cancel_previous(events, report_alerts)
        return await self._log_batch(events, slices, now_ms, report_alerts)

    async def _log_batch(self, events: list[Event], slices: list[ShardSlice], now_ms: int,
                         report_alerts: bool) -> IngestAck:
        ticket = messages.LoggedTicket(now_ms)
        await self._submit(messages.LogBatch(
            ticket, records.encode_batch(events, now_ms),
            [messages.ApplySlice(s) if s else None for s in slices]))
        self._events_accepted += ticket.accepted
        self._events_duplicate += ticket.duplicates
        self._batches += 1
        return IngestAck(accepted=ticket.accepted, duplicates=ticket.duplicates, lsn=ticket.lsn,
                         alerts=ticket.alerts if report_alerts else [])

    async def _cancel_previous(self, events: list[Event], report_alerts: bool) -> IngestAck:
        """Amberflo's convention: an event with the dimension
        ``aflo.cancel_previous_resource_event: "true"`` replaces the live event with its
        unique id (before dedup); the dimension is never stored. The whole batch is
        validated first. Per meter and customer, the flagged events whose id has a live
        event are one correction record (kind ``cancel_previous``): each cancels its
        predecessor and is logged in the same record, so a crash leaves both or neither
        (and the id stays live). The rest of the batch (unflagged events, and flagged
        ones with no live event to replace) is then ingested as usual; a retry of the
        whole batch after a crash between the two replaces the same events again and
        logs the rest. Of two flagged events with one id in a batch the later wins."""
        stripped: list[Event] = []
        flagged: list[bool] = []
        for event in events:
            dims = event.dimensions if type(event) is Event else None
            if type(dims) is not dict or CANCEL_PREVIOUS not in dims:
                stripped.append(event)
                flagged.append(False)
                continue
            event = msgspec.structs.replace(
                event, dimensions={k: v for k, v in dims.items() if k != CANCEL_PREVIOUS})
            stripped.append(event)
            flagged.append(dims[CANCEL_PREVIOUS] == "true" and event.unique_id is not None)
        # Validate the whole batch (indices as sent) before anything is logged.
        prepare_batch(stripped, self._catalog.meter_defs, self._route, self.ingest_rules,
                      self._clock_ms())
        groups: dict[tuple[str, str], dict[str, Event]] = {}
        for event, flag in zip(stripped, flagged, strict=True):
            if flag:
                assert event.unique_id is not None
                groups.setdefault((event.meter_api_name, event.customer_id), {})[
                    event.unique_id] = event
        # (meter, customer, unique id) of the flagged events a correction logged.
        replaced: set[tuple[str, str, str | None]] = set()
        lsn = 0
        for (meter_api_name, customer_id), by_id in sorted(groups.items()):
            target = Target(meter_api_name, customer_id, unique_ids=frozenset(by_id))
            pending = await self._correct("cancel_previous", target, CANCEL_PREVIOUS,
                                          list(by_id.values()))
            replaced.update((meter_api_name, customer_id, event.unique_id)
                            for event in pending.amended)
            lsn = max(lsn, pending.logged_lsn)
        self._events_accepted += len(replaced)
        # The flagged events not logged by a correction (nothing to replace) and the
        # unflagged ones, in batch order; a flagged event a later one of its id
        # superseded is dropped.
        rest = [event for event, flag in zip(stripped, flagged, strict=True)
                if not flag or (
                    (event.meter_api_name, event.customer_id, event.unique_id) not in replaced
                    and groups[(event.meter_api_name, event.customer_id)][
                        event.unique_id or ""] is event)]
        if not rest:
            return IngestAck(accepted=len(replaced), duplicates=0, lsn=lsn, alerts=[])
        now_ms = self._clock_ms()
        ack = await self._log_batch(rest, prepare_batch(
            rest, self._catalog.meter_defs, self._route, self.ingest_rules, now_ms), now_ms,
            report_alerts)
        return IngestAck(accepted=ack.accepted + len(replaced), duplicates=ack.duplicates,
                         lsn=ack.lsn, alerts=ack.alerts)

    async def add_limit(self, limit: Limit) -> Limit:
        """Add (or replace, by id) a limit; durable when this returns.

        The limit is evaluated at once for the current period: customers already
        at or over a threshold get an alert immediately.
        """
        self._lifecycle.check_open()
        if type(limit) is Limit and limit.measure != "usage":
            return await self._add_extension_limit(limit)
        try:
            check_limit(limit, self._catalog.meter_defs)
        except LimitError as exc:
            raise InvalidRequest(f"limit {getattr(limit, 'id', '?')!r}: {exc}") from None
        now_ms = self._clock_ms()
        record = records.encode(records.WalLimit(records.wide_ints_as_decimals(limit), now_ms))
        # Keep the limit as the log will give it back after a restart ("2.5" -> Decimal).
        stored = records.decode_record(record)
        assert isinstance(stored, records.WalLimit)
        limit_def = check_limit(stored.limit, self._catalog.meter_defs)
        await self._submit(messages.LogLimitChange(
            messages.LoggedTicket(now_ms), record, messages.InstallLimit(limit_def, now_ms)))
        return stored.limit

    async def remove_limit(self, limit_id: str) -> bool:
        """Remove a limit; False if there was none with that id."""
        self._lifecycle.check_open()
        if limit_id not in self._catalog.limit_defs:
            if any(limit.id == limit_id for limit in self._catalog.limits()):
                return await self._remove_extension_limit(limit_id)
            return False
        now_ms = self._clock_ms()
        ticket = messages.LoggedTicket(now_ms)
        record = records.encode(records.WalRemoveLimit(limit_id, now_ms))
        await self._submit(messages.LogLimitChange(ticket, record, messages.DropLimit(limit_id)))
        return ticket.removed

    def limits(self) -> list[Limit]:
        """The limits, in the order they were added (sync, like ``meters()``)."""
        return self._catalog.limits()

    def limit_period(self, limit: Limit, at_ms: int) -> tuple[int, int]:
        """``[start, end)`` of ``limit``'s period that holds ``at_ms``, by the rule the
        shards evaluate limits with (calendar windows in the limit's zone, exact
        across DST; ``total`` is all of time)."""
        return period_bounds(at_ms, limit)

    async def list_limits(self) -> list[Limit]:
        """The same as ``limits()``, kept awaitable for existing callers."""
        return self._catalog.limits()

    @asynccontextmanager
    async def subscribe(self, from_seq: int = 0) -> AsyncIterator[AlertSubscription]:
        """Alerts with seq >= ``from_seq``: stored ones first, then live ones as they happen."""
        self._lifecycle.check_open()
        if type(from_seq) is not int or from_seq < 0:
            raise InvalidRequest(f"from_seq must be a non-negative integer, got {from_seq!r}")
        yield AlertSubscription(self._hub, from_seq)

    def next_alert_seq(self) -> int:
        return self._hub.next_seq

    async def query(self, query: Query) -> QueryResult:
        """Answer ``query`` from the shards that can hold matching customers."""
        plan = self._plan(query)
        if (query.take is not None and "customer_id" in plan.group_by
                and not names_traits(plan)):
            plan = dataclasses.replace(plan, shard_take=True)  # (no two shards share a group)
        return finish_query(plan, await self._gather_partials(plan), self._distinct_counts)

    # ------------------------------------------------ customers (runtime/customers.py)

    async def add_customer(self, customer: Customer) -> Customer:
        """Add a customer (or fill in one known by its usage, or reinstate a deleted one)."""
        return await self._customers.add(customer)

    async def update_customer(self, customer: Customer) -> Customer:
        """Replace a known customer's record whole."""
        return await self._customers.update(customer)

    async def get_customer(self, customer_id: str) -> Customer | None:
        return await self._customers.get(customer_id)

    async def list_customers(self) -> list[Customer]:
        return await self._customers.list()

    async def delete_customer(self, customer_id: str) -> Customer | None:
        """Hide a customer (its usage is still metered); returns what it was, or None."""
        return await self._customers.delete(customer_id)

    async def backup(self, path: str | os.PathLike[str]) -> Backup:
        """Write a consistent copy of the data directory to ``path``, while serving.

        ``path`` must not exist (or be an empty directory) and its parent must exist;
        otherwise ``InvalidRequest``, and nothing is written. The copy is taken in one
        LMDB read transaction on a worker thread, so ingest and queries go on (the
        writer keeps committing); it holds exactly the write-ahead log up to the
        returned ``lsn``, which is at least the lsn of every batch acknowledged before
        this call. It is written under a temporary name next to ``path`` and renamed
        into place once complete and fsynced. Open it like any data directory
        (``open_engine(data_dir=path)``, ``meter serve --data-dir path``).
        Backups run one at a time; closing the engine waits for a running one, and so
        does a cancelled caller (a copy cannot be interrupted; it completes, or fails
        and removes what it wrote).
        """
        self._lifecycle.check_open()
        async with self._backup_lock:
            self._lifecycle.check_open()
            stored = await trio.to_thread.run_sync(self._store.backup, path)
        return Backup(path=stored.path, lsn=stored.lsn, size_bytes=stored.size_bytes)

    async def raw_events(self, start_ms: int, end_ms: int, *,
                         meter_api_name: str | None = None, customer_id: str | None = None,
                         from_lsn: int = 0, from_index: int = 0,
                         limit: int = DEFAULT_PAGE_EVENTS) -> RawEventPage:
        """A page of the accepted events with event time in ``[start_ms, end_ms)``, as
        retained in the raw-event log (the write-ahead log, ``raw_retention_ms``), of
        ``meter_api_name`` and ``customer_id`` if given, in the order they were logged,
        duplicates and events a correction cancelled left out (an amend's corrected
        event is not a raw event: ``corrections()`` lists it); at most ``limit`` (1 to
        100,000) events.

        Read-only, on a worker thread, while ingest goes on. Page on with
        ``from_lsn=page.next_lsn, from_index=page.next_index`` until ``page.done``.
        A range that starts before what the log still holds completely is refused
        with ``InvalidRequest`` naming the oldest time it can read
        (``engine.runtime.raw_events``).
        """
        self._lifecycle.check_open()
        if meter_api_name is not None and meter_api_name not in self._catalog.meter_defs:
            raise UnknownMeter(f"unknown meter {meter_api_name!r}")
        request = RawEventRequest(start_ms, end_ms, meter_api_name, customer_id, from_lsn,
                                  from_index, limit)
        request.check()
        async with self._raw_read_lock:
            self._lifecycle.check_open()
            return await trio.to_thread.run_sync(raw_event_page, self._store, request,
                                                 self._clock_ms(), self.ingest_rules.future_ms,
                                                 self._writer.corrections.positions)

    # ------------------------------------------------------------ corrections

    async def cancel(self, meter_api_name: str, customer_id: str, *,
                     unique_ids: Sequence[str], by: str = "") -> int:
        """Cancel ``customer_id``'s live events of a meter with these unique ids, durably
        (one WAL record); returns how many were cancelled. Every aggregation follows at
        once; an event with a cancelled id is accepted again when re-sent. ``by`` names
        who made the correction, for ``corrections()``."""
        if isinstance(unique_ids, str) or not all(type(u) is str for u in unique_ids):
            raise InvalidRequest("unique_ids must be a list of strings")
        target = Target(meter_api_name, _customer(customer_id), unique_ids=frozenset(unique_ids))
        return (await self._correct("cancel", target, by)).count

    async def cancel_where(self, meter_api_name: str, *, customer_id: str | None,
                           start_ms: int, end_ms: int,
                           dimensions: dict[str, list[str]] | None = None,
                           received_start_ms: int | None = None,
                           received_end_ms: int | None = None, by: str = "") -> int:
        """Cancel every live event of a meter (of ``customer_id``, or of all customers with
        None) with event time in ``[start_ms, end_ms)``, received (engine clock) in
        ``[received_start_ms, received_end_ms)`` if given, passing ``dimensions`` as
        ``Query.filter`` does; returns how many were cancelled. A range that starts
        before the raw-event retention is refused whole (``InvalidRequest`` names the
        oldest time it can correct)."""
        for name, value in (("start_ms", start_ms), ("end_ms", end_ms),
                            ("received_start_ms", received_start_ms),
                            ("received_end_ms", received_end_ms)):
            if value is not None and type(value) is not int:
                raise InvalidRequest(f"{name} must be an integer, got {value!r}")
        if start_ms > end_ms:
            raise InvalidRequest(f"start_ms {start_ms} is after end_ms {end_ms}")
        filters = tuple(sorted((key, frozenset(values))
                               for key, values in (dimensions or {}).items()))
        target = Target(meter_api_name, None if customer_id is None else _customer(customer_id),
                        start_ms=start_ms, end_ms=end_ms, received_start_ms=received_start_ms,
                        received_end_ms=received_end_ms, dim_filters=filters,
                        unique_dimension=self._unique_dimension(meter_api_name))
        await self._check_retention(start_ms)
        return (await self._correct("cancel_where", target, by)).count

    async def amend(self, meter_api_name: str, customer_id: str, unique_id: str,
                    event: Event, *, by: str = "") -> IngestAck:
        """Replace the live event with this unique id by ``event`` in one WAL record
        (cancel and re-ingest at once). Bypasses the late-event limit, not the
        raw-event retention; ``event`` must be of the same meter and customer and carry
        the same unique id (or none: it is given this one)."""
        if event.unique_id is None:
            event = msgspec.structs.replace(event, unique_id=unique_id)
        if (event.meter_api_name, event.customer_id, event.unique_id) != (
                meter_api_name, customer_id, unique_id):
            raise InvalidRequest("an amended event must keep its meter, customer and unique id")
        now_ms = self._clock_ms()
        try:
            prepare_batch([event], self._catalog.meter_defs, self._route,
                          dataclasses.replace(self.ingest_rules, late_ms=now_ms), now_ms)
        except CancelPreviousFlagged:
            raise InvalidRequest(f"an amended event cannot carry the {CANCEL_PREVIOUS!r} "
                                 "dimension (amend replaces the event already)") from None
        await self._check_retention(event.meter_time_in_millis)
        target = Target(meter_api_name, _customer(customer_id), unique_ids=frozenset([unique_id]))
        pending = await self._correct("amend", target, by, [event])
        return IngestAck(accepted=1, duplicates=0, lsn=pending.logged_lsn)

    async def corrections(self, meter_api_name: str | None = None,
                          customer_id: str | None = None) -> list[Correction]:
        """The corrections made, oldest first (of a meter and customer if given; a
        ``cancel_where`` over all customers is listed for every customer)."""
        self._lifecycle.check_open()
        return await trio.to_thread.run_sync(list_corrections, self._store, meter_api_name,
                                             customer_id)

    def _unique_dimension(self, meter_api_name: str) -> str | None:
        meter = self._catalog.meter_defs.get(meter_api_name)
        return None if meter is None else meter.meter.unique_dimension

    async def _check_retention(self, start_ms: int) -> None:
        oldest = await trio.to_thread.run_sync(oldest_correctable_ms, self._store,
                                               self._clock_ms(), self.ingest_rules.future_ms)
        check_retention(start_ms, oldest)

    async def _correct(self, kind: str, target: Target, by: str,
                       amended: list[Event] | None = None) -> PendingCorrection:
        """Make one correction (scan, then commit through the writer); returns it, with
        its targets (``len``: how many events it cancelled) and ``logged_lsn``."""
        self._lifecycle.check_open()
        meter = self._catalog.meter_defs.get(target.meter)
        if meter is None:
            raise UnknownMeter(f"unknown meter {target.meter!r}")
        if type(by) is not str:
            raise InvalidRequest("by must be a string")
        pending = PendingCorrection(kind, target, meter, by, self._clock_ms(), describe(target),
                                    list(amended or ()))
        async with self._correction_lock:
            self._lifecycle.check_open()
            await trio.to_thread.run_sync(pending.resolve_within_retention, self._store,
                                          self._writer.corrections.positions,
                                          self._writer.last_lsn, self._clock_ms(),
                                          self.ingest_rules.future_ms)
            if kind == "amend" and not pending.count:
                raise InvalidRequest(
                    f"no live event of customer {target.customer_id!r} with unique id "
                    f"{sorted(target.unique_ids or ())!r} to amend")
            if not pending.count:
                return pending
            ticket = messages.LoggedTicket(pending.received_ms)
            await self._submit(messages.LogCorrection(ticket, pending))
            pending.logged_lsn = ticket.lsn
        return pending

    async def snapshot(self) -> int:
        """Write a snapshot now and truncate the WAL; returns the snapshot's lsn."""
        ticket = messages.SnapshotTicket()
        await self._submit(messages.TakeSnapshot(ticket))
        return ticket.lsn

    def statistics(self) -> EngineStatistics:
        writer, recovered = self._writer, self._recovered
        series, buckets = series_and_buckets(actor.state for actor in self._actors)
        index_entries, index_bytes = self._store.id_index_statistics()
        return EngineStatistics(
            shard_count=self.shard_count,
            meter_count=len(self._catalog.meter_defs),
            series_count=series,
            bucket_count=buckets,
            last_lsn=writer.last_lsn,
            events_accepted=self._events_accepted,
            events_duplicate=self._events_duplicate,
            batches=self._batches,
            group_commits=writer.group_commits,
            snapshots=writer.snapshots,
            wal_bytes_since_snapshot=writer.wal_bytes_since_snapshot,
            recovery_ms=recovered.recovery_ms,
            limit_count=len(self._catalog.limit_defs),
            alerts=self._hub.next_seq,
            recovered_wal_records=recovered.wal_records,
            recovered_wal_bytes=recovered.wal_bytes,
            sealed_before_ms=writer.sealed_before_minute * 60_000,
            block_count=self._blocks.block_count,
            blocks_unwritten=self._blocks.unwritten_count(),
            delta_buckets=sum(actor.state.delta_buckets for actor in self._actors),
            blocks_unencoded=self._blocks.unencoded_count(),
            block_cache_bytes=self._blocks.cached_bytes,
            block_cache_hits=self._blocks.hits,
            block_cache_misses=self._blocks.misses,
            dedup_index_entries=(index_entries + writer.index.run_entries()
                                 + writer.index.memory_keys()),
            dedup_index_bytes=index_bytes,
            dedup_memtable_ids=writer.index.memory_keys(),
            dedup_runs=len(writer.index.runs),
            dedup_filter_bytes=writer.index.filter_bytes(),
            dedup_jobs_pending=writer.index.jobs_pending(),
            checkpoint_bytes=writer.checkpoint_bytes,
            checkpoint_head_chunks=writer.checkpoint_head_chunks,
            checkpoint_head_chunks_dropped=writer.checkpoint_head_chunks_dropped,
            checkpoint_ms=writer.checkpoint_ms,
        )

    def export_logical(self) -> bytes:
        """Canonical bytes of every bucket and all engine state, whatever was sealed or
        compacted when (for tests and checks: reads every block)."""
        meters = self._catalog.meter_defs
        shards = [actor.state.logical_export(meters) for actor in self._actors]
        engine_state = self._catalog.engine_state(self._hub.next_seq)
        return records.encode([shards, engine_state])

    def export_state(self) -> bytes:
        """Canonical bytes of all state (for tests: equal state ⇔ equal bytes)."""
        shards = [shard_part(actor.state) for actor in self._actors]
        engine_state = self._catalog.engine_state(self._hub.next_seq)
        return records.encode([shards, engine_state])

    # ------------------------------------------- pages and dimensions (the explorer's)

    async def query_page(self, query: Query, *, offset: int = 0,
                         other: bool = False) -> QueryPage:
        """``query`` with paging: the groups ranked ``offset`` .. ``offset + take.limit - 1``
        and, with ``other=True``, the exact aggregate of every other group per window
        (``engine.domain.query.finish_page``)."""
        plan = self._plan(query)
        return finish_page(plan, await self._gather_partials(plan), offset, other,
                           self._distinct_counts)

    async def dimensions(self, meter_api_name: str, start_ms: int, end_ms: int, *,
                         top: int = 10, customer_id: str | None = None,
                         keys: list[str] | None = None) -> list[Dimension]:
        """The dimension keys seen on ``meter_api_name``'s events in [start, end) (head
        and sealed history; ``dimension_keys``), sorted, each with its ``top`` values by
        usage: exact queries over [start, end) grouped by each key. ``keys``: only these
        (each costs one query). ``customer_id``: only that customer's usage.
        """
        if type(top) is not int or top < 1:
            raise InvalidQuery(f"top must be a positive integer, got {top!r}")
        if keys is None:
            keys = await self.dimension_keys(meter_api_name, start_ms, end_ms,
                                             customer_id=customer_id)
        base = Query(meter_api_name=meter_api_name, start_ms=start_ms, end_ms=end_ms,
                     filter={} if customer_id is None else {"customer_id": [customer_id]})
        found = []
        for key in keys:
            key_plan = self._plan(msgspec.structs.replace(base, group_by=[key]))
            found.append(finish_dimension(key_plan, await self._gather_partials(key_plan),
                                          top, self._distinct_counts))
        return found

    async def dimension_keys(self, meter_api_name: str, start_ms: int, end_ms: int, *,
                             customer_id: str | None = None) -> list[str]:
        """The dimension keys, sorted, of the series of ``meter_api_name`` (of
        ``customer_id``, or all) with a bucket in [start, end) rounded out to whole
        minutes, head and sealed blocks alike. A unique_count meter's counted dimension
        is not listed (queries cannot group by it)."""
        base = Query(meter_api_name=meter_api_name, start_ms=start_ms, end_ms=end_ms,
                     filter={} if customer_id is None else {"customer_id": [customer_id]})
        plan = self._plan(base)
        meter = plan.meter
        keys: set[str] = set()
        shards = [] if not plan.cuts_ms else (
            list(range(self.shard_count)) if plan.customers is None
            else sorted({self._route(customer) for customer in plan.customers}))
        if shards:
            ticket: messages.GatherTicket[set[str]] = messages.GatherTicket(len(shards))
            with self._lifecycle.waiting(ticket):
                with closed_channel_is_closed_engine():
                    for shard in shards:
                        await self._mailboxes[shard][0].send(messages.FindDimensionKeys(
                            meter, plan.cuts_ms[0], plan.cuts_ms[-1], plan.customers, ticket))
                await ticket.wait()
            keys = set().union(*ticket.results)
        keys.discard(meter.unique_dimension or "")
        return sorted(keys)

    def get_limit(self, limit_id: str) -> Limit | None:
        """The limit ``limit_id`` as it is now, or None (sync, like ``limits()``)."""
        limit_def = self._catalog.limit_defs.get(limit_id)
        if limit_def is None:
            return next((limit for limit in self._catalog.limits() if limit.id == limit_id),
                        None)
        return limit_def.limit

    # ------------------------------------------- the extension's (engine.runtime.extensions)

    async def _add_extension_limit(self, limit: Limit) -> Limit:
        """A limit metering does not evaluate (``measure="cost"``): pricing's engine
        (``engine.pricing.engine``) overrides this."""
        raise InvalidRequest(f"limit {limit.id!r}: measure {limit.measure!r} needs pricing "
                             "(open the engine with engine.open_engine)")

    async def _remove_extension_limit(self, limit_id: str) -> bool:
        return False

    async def _log_extension(self, record: bytes, action: object) -> messages.LoggedTicket:
        """Log an extension's record; its ``commit`` runs in commit order, its
        ``acknowledge`` before this returns. Durable when this returns."""
        ticket = messages.LoggedTicket(self._clock_ms())
        await self._submit(messages.LogExtension(ticket, record, action))
        return ticket

    def _now_ms(self) -> int:
        return self._clock_ms()

    def writes_in_flight(self) -> int:
        """Write requests (ingest batches, limit, meter and customer changes) queued for
        the WAL writer or waiting to be queued, plus WAL records logged but not yet
        acknowledged: the engine's batches in flight (``/metrics``)."""
        queue = self._write_send.statistics()
        logged = self._writer.last_lsn - (self._acks.next_lsn - 1)
        return queue.current_buffer_used + queue.tasks_waiting_send + max(0, logged)

    def _plan(self, query: Query) -> QueryPlan:
        self._lifecycle.check_open()
        if type(query) is not Query:
            raise InvalidRequest(f"expected a Query, got {type(query).__name__}")
        meter = self._catalog.meter_defs.get(query.meter_api_name)
        if meter is None:
            raise UnknownMeter(f"unknown meter {query.meter_api_name!r}")
        return plan_query(query, meter)

    async def _gather_partials(self, plan: QueryPlan) -> list[messages.Partials]:
        """Every owning shard's partials for ``plan`` (as ``query`` gathers them)."""
        traits = plan_traits(plan, self._catalog.customers, self._catalog.hidden_customers)
        if traits is not None:  # customer.* keys: resolved now (engine.domain.traits)
            return [traits.regroup(await self._gather_partials(traits.shard_plan))]
        if not plan.cuts_ms:
            return []
        self._writer.last_read_at = trio.current_time()  # (idle compaction waits)
        if plan.customers is not None:
            shards = sorted({self._route(customer) for customer in plan.customers})
        else:
            shards = list(range(self.shard_count))
        ticket: messages.GatherTicket[messages.Partials] = messages.GatherTicket(len(shards))
        if shards:
            with self._lifecycle.waiting(ticket):
                with closed_channel_is_closed_engine():
                    for shard in shards:
                        await self._mailboxes[shard][0].send(messages.RunQuery(plan, ticket))
                await ticket.wait()
        return ticket.results


# Amberflo's ingest dimension that cancels the earlier event with the same unique id.


def _customer(customer_id: object) -> str:
    if type(customer_id) is not str or not customer_id:
        raise InvalidRequest(f"customer_id must be a non-empty string, got {customer_id!r}")
    return customer_id


@asynccontextmanager
async def open_engine(
    data_dir: str | os.PathLike[str] | None = None,
    shards: int = 8,
    *,
    store: Store | None = None,
    ingest_rules: IngestRules | None = None,
    limits: IngestRules | None = None,
    clock_ms: Callable[[], int] | None = None,
    snapshot_every_bytes: int = DEFAULT_SNAPSHOT_EVERY_BYTES,
    map_bytes: int | None = None,
    max_map_bytes: int | None = None,
    snapshot_on_close: bool = True,
    tune_gc: bool = True,
    switch_interval_s: float | None = DEFAULT_SWITCH_INTERVAL_S,
    hot_window_ms: int | None = DEFAULT_HOT_WINDOW_MS,
    raw_retention_ms: int = DEFAULT_RAW_RETENTION_MS,
    block_cache_bytes: int = DEFAULT_BLOCK_CACHE_BYTES,
    dedup_horizon_ms: int | None = None,
    engine_type: type[Engine] | None = None,
) -> AsyncIterator[Engine]:
    """Open (or create) the engine whose state lives in ``data_dir``.

    Recovers from the latest snapshot plus the WAL tail, starts one actor per
    shard and the WAL writer, and on exit drains pending writes, writes a
    snapshot (unless ``snapshot_on_close=False``) and closes the store.
    ``ingest_rules`` says what an event may look like (``limits`` is its older
    name, still accepted).

    ``tune_gc`` (default on) tunes the process's cyclic garbage collector while
    the engine is open: it freezes the objects alive after recovery (so
    collections never walk the recovered state again) and raises the first
    threshold from 700 to 50,000; on exit it restores the threshold and
    unfreezes. Pass ``tune_gc=False`` if the host program manages the collector.

    ``switch_interval_s`` (default 0.5 ms) is the interpreter's thread switch
    interval while the engine is open (``sys.setswitchinterval``, restored on exit;
    Python's default is 5 ms): the event loop's store commits otherwise wait up to
    that long per written key while a background thread (a correction's scan, block
    encoding) runs. None leaves the interval alone.

    ``dedup_horizon_ms`` is how long a unique id is remembered after the batch that
    carried it arrived (default: the late-event limit, ``ingest_rules.late_ms``, 35
    days); a shorter one than the late-event limit is refused with ``ValueError``.

    ``engine_type``: a subclass of ``Engine`` to open (``engine.open_engine`` opens
    pricing's, ``engine.pricing.engine.PricedEngine``).
    """
    if ingest_rules is not None and limits is not None:
        raise ValueError("pass ingest_rules or its older name limits, not both")
    if switch_interval_s is not None and not switch_interval_s > 0:
        raise ValueError(f"switch_interval_s must be positive, got {switch_interval_s!r}")
    history = HistoryPolicy(clock_ms=clock_ms or wall_clock_ms, hot_window_ms=hot_window_ms,
                            raw_retention_ms=raw_retention_ms)
    if store is None:
        if data_dir is None:
            raise ValueError("open_engine needs a data_dir (or a store)")
        max_map_bytes = max_map_bytes or DEFAULT_MAX_MAP_BYTES
        store = LmdbStore(data_dir, map_bytes=map_bytes or min(DEFAULT_MAP_BYTES, max_map_bytes),
                          max_map_bytes=max_map_bytes)
    try:
        engine = (engine_type or Engine)(store, shards, ingest_rules or limits or IngestRules(),
                        clock_ms or wall_clock_ms, snapshot_every_bytes, history,
                        block_cache_bytes, dedup_horizon_ms)
        with tuned_gc(tune_gc), tuned_switching(switch_interval_s), unwrap_single():
            async with trio.open_nursery() as nursery:
                await nursery.start(engine._run)
                try:
                    yield engine
                finally:
                    with trio.CancelScope(shield=True):
                        await engine._close(snapshot_on_close)
    finally:
        store.close()
