"""The embedded engine: shard actors, the WAL writer, recovery.

Runtime layer: trio, the domain and the storage layer. Tasks and who owns what:

- **WAL writer** (one task): the only writer of the store. It takes write
  requests from a bounded channel, commits as many as are waiting in one LMDB
  transaction (group commit, fsync on), assigns gap-free log sequence numbers,
  then hands each batch's per-shard slices to the shard mailboxes in lsn order.
  It also takes snapshots between groups.
- **Shard actors** (one task per shard): each owns one ``ShardState``; nothing
  else reads or writes it. Mailboxes are FIFO, so a query sent after an
  ingest was acknowledged sees that ingest (read-your-writes).
- **Callers** (``ingest``, ``query``, ``define_meter``) validate in their own
  task, then wait on a ticket that the writer or the shards complete.

Durability contract: ``ingest`` returns only after the batch's transaction
committed with fsync *and* every shard applied its slice. Dedup decisions are
made while applying, in lsn order, so they are a pure function of the log:
replay after a crash makes the same decisions.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import localcontext, setcontext
from typing import Any

import msgspec
import trio

from engine.domain import records
from engine.domain.batch import (
    IngestLimits,
    MeterDef,
    ShardRouter,
    check_meter,
    merge_meter,
    prepare_batch,
)
from engine.domain.limits import Crossing, LimitDef, LimitError, ShardLimits, check_limit
from engine.domain.query import finish_query, plan_query
from engine.domain.shard import ShardState, restore_shards, state_statistics
from engine.domain.values import EXACT
from engine.errors import (
    DataDirError,
    EngineClosed,
    InvalidRequest,
    MeterConflict,
    MeteringError,
    StorageError,
    StorageFull,
    UnknownMeter,
)
from engine.runtime.alerts import AlertHub, AlertSubscription, alert_from_crossing
from engine.runtime.groups import unwrap_single
from engine.schema import Alert, Event, IngestAck, Limit, Meter, Query, QueryResult
from engine.storage import LmdbStore, Store, StoredSnapshot
from engine.storage.lmdb_store import DEFAULT_MAP_BYTES, DEFAULT_MAX_MAP_BYTES

log = logging.getLogger(__name__)

MAX_GROUP_REQUESTS = 64
MAX_GROUP_BYTES = 8 << 20
WRITE_QUEUE = 64
MAILBOX_SIZE = 64
DEFAULT_SNAPSHOT_EVERY_BYTES = 256 << 20
GC_GEN0_THRESHOLD = 50_000
SNAPSHOT_RETRY_MIN_S = 1.0
SNAPSHOT_RETRY_MAX_S = 60.0
DAMAGED = ("the data directory is damaged or was written by a buggy version: restore it from "
           "a backup; the engine will not start over it")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    shard_count: int
    meter_count: int
    series_count: int
    bucket_count: int
    last_lsn: int
    events_accepted: int
    events_duplicate: int
    batches: int
    group_commits: int
    snapshots: int
    wal_bytes_since_snapshot: int
    recovery_ms: int
    limit_count: int = 0
    alerts: int = 0
    # What the last open replayed from the WAL after the snapshot: 0 after a clean close.
    recovered_wal_records: int = 0
    recovered_wal_bytes: int = 0


class _Ticket:
    """Completion of one request: set by the writer and/or shard actors."""

    __slots__ = ("accepted", "alerts", "crossings", "done", "duplicates", "error", "lsn",
                 "pending", "received_ms", "results")

    def __init__(self, received_ms: int = 0) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.pending = 0
        self.accepted = 0
        self.duplicates = 0
        self.lsn = 0
        self.received_ms = received_ms
        self.results: list[Any] = []
        self.crossings: list[tuple[int, list[Crossing]]] = []  # (shard, crossings)
        self.alerts: list[Alert] = []

    def fail(self, error: BaseException) -> None:
        if self.done.is_set():
            return  # already answered
        self.error = error
        self.done.set()

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise self.error


@dataclass(slots=True, eq=False)
class _Write:
    """A request to the WAL writer.

    ``record`` is a WAL record; ``work`` is what each shard applies for it (a
    batch slice per shard, or one limit operation for every shard).
    """

    ticket: _Ticket
    record: bytes | None = None
    work: list[Any] | None = None
    meta: list[tuple[bytes, bytes]] | None = None
    meter: MeterDef | None = None
    limit_change: tuple[str, Any] | None = None  # ("add", LimitDef) or ("remove", id)
    snapshot: bool = False


_APPLY, _QUERY, _EXPORT = range(3)


class Engine:
    """An open metering engine. Create it with ``open_engine``."""

    def __init__(
        self,
        store: Store,
        shard_count: int,
        limits: IngestLimits,
        clock_ms: Callable[[], int],
        snapshot_every_bytes: int,
    ) -> None:
        if type(shard_count) is not int or not 1 <= shard_count <= 4096:
            raise ValueError(f"shards must be an integer from 1 to 4096, got {shard_count!r}")
        self._store = store
        self.shard_count = shard_count
        self.limits = limits
        self._clock_ms = clock_ms
        self._snapshot_every_bytes = snapshot_every_bytes
        self._route = ShardRouter(shard_count)
        self._meters: dict[str, MeterDef] = {}
        self._states: list[ShardState] = []
        self._last_lsn = 0
        self._closed = False
        self._failure: BaseException | None = None
        self._wal_bytes_since_snapshot = 0
        # After a snapshot failed for lack of space: no automatic retry before this
        # trio time; the wait doubles per failure (SNAPSHOT_RETRY_MIN_S .. _MAX_S).
        self._snapshot_not_before = -math.inf
        self._snapshot_retry_s = SNAPSHOT_RETRY_MIN_S
        self._counters = {"accepted": 0, "duplicates": 0, "batches": 0, "commits": 0, "snaps": 0}
        self._recovery_ms = 0
        self._recovered_wal_records = 0
        self._recovered_wal_bytes = 0
        self._limits: dict[str, LimitDef] = {}  # in the order they were added
        self._hub = AlertHub(store)
        self._next_lsn_to_finish = 1
        self._finished: dict[int, _Ticket] = {}
        self._outstanding: set[_Ticket] = set()  # callers waiting: failed if the engine stops
        self._write_send, self._write_recv = trio.open_memory_channel[_Write](WRITE_QUEUE)
        self._mailboxes = [trio.open_memory_channel[tuple[Any, ...]](MAILBOX_SIZE)
                           for _ in range(shard_count)]

    # ------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Rebuild state: meters, then the latest snapshot, then the WAL tail."""
        started = time.perf_counter()
        for key, raw in self._store.meta_items(b"meter:"):
            try:
                meter_def = check_meter(records.decode_meter(raw), self.limits)
            except (msgspec.DecodeError, ValueError) as exc:
                raise DataDirError(
                    f"stored meter {key!r} is unreadable: {exc}; {DAMAGED}"
                ) from None
            self._meters[meter_def.name] = meter_def
        snapshot = self._store.load_snapshot()
        next_alert_seq = 0
        with localcontext(EXACT):
            if snapshot is None:
                self._states = [ShardState() for _ in range(self.shard_count)]
                for state in self._states:
                    state.limits = ShardLimits()
                applied = 0
            else:
                try:
                    next_alert_seq = self._restore_snapshot(snapshot)
                except (msgspec.DecodeError, KeyError, ValueError, LimitError) as exc:
                    raise DataDirError(
                        f"snapshot at lsn {snapshot.lsn} is corrupt: {exc}; {DAMAGED}"
                    ) from None
                applied = snapshot.lsn
            try:
                self._hub.restore(next_alert_seq)
            except (msgspec.DecodeError, ValueError) as exc:
                raise DataDirError(f"a stored alert is unreadable: {exc}; {DAMAGED}") from None
            for lsn, raw in self._store.read_wal(applied):
                if lsn != applied + 1:
                    raise DataDirError(
                        f"write-ahead log has a gap: expected lsn {applied + 1}, found {lsn}; "
                        f"{DAMAGED}"
                    )
                self._replay(lsn, raw)
                applied = lsn
                self._recovered_wal_records += 1
                self._recovered_wal_bytes += len(raw)
        self._last_lsn = max(applied, self._store.last_lsn())
        self._next_lsn_to_finish = self._last_lsn + 1
        self._route.replay_dims_keys.clear()  # replay is over: its memo is not needed again
        self._recovery_ms = int((time.perf_counter() - started) * 1000)
        log.info("recovered to lsn %d in %d ms (replayed %d WAL records, %d bytes)",
                 self._last_lsn, self._recovery_ms, self._recovered_wal_records,
                 self._recovered_wal_bytes)

    def _restore_snapshot(self, snapshot: StoredSnapshot) -> int:
        parts = [records.decode_part(raw) for raw in snapshot.parts]
        self._states = restore_shards([p.meters for p in parts], self._meters, self._route)
        engine_state = (records.decode_engine_state(snapshot.engine_state)
                        if snapshot.engine_state else records.EngineState())
        for limit in engine_state.limits:
            self._limits[limit.id] = check_limit(limit, self._meters)
        fired = [entry for part in parts for entry in part.fired]
        for index, state in enumerate(self._states):
            state.limits = ShardLimits()
            state.limits.load(list(self._limits.values()), fired, self._route, index)
        return engine_state.next_alert_seq

    def _replay(self, lsn: int, raw: bytes) -> None:
        try:
            record = records.decode_record(raw)
        except msgspec.DecodeError as exc:
            raise DataDirError(
                f"write-ahead log record {lsn} is corrupt: {exc}; {DAMAGED}"
            ) from None
        try:
            work = self._work_for(record)
        except (InvalidRequest, LimitError) as exc:
            raise DataDirError(
                f"write-ahead log record {lsn} cannot be replayed: {exc}; {DAMAGED}"
            ) from None
        ticket = _Ticket(record.received_ms)
        ticket.lsn = lsn
        try:
            for index, (state, item) in enumerate(zip(self._states, work, strict=True)):
                if item:
                    _apply_work(state, index, lsn, item, ticket)
        except Exception as exc:
            raise DataDirError(
                f"write-ahead log record {lsn} could not be applied: {exc!r}; {DAMAGED}"
            ) from exc
        self._hub.append(self._alerts_of(ticket))
        self._wal_bytes_since_snapshot += len(raw)

    def _work_for(self, record: records.WalRecord) -> list[Any]:
        """What each shard applies for a WAL record (also updates the limit registry)."""
        if isinstance(record, records.WalBatch):
            return prepare_batch(record.events, self._meters, self._route, self.limits, None)
        if isinstance(record, records.WalLimit):
            limit = check_limit(record.limit, self._meters)
            self._limits.pop(limit.id, None)
            self._limits[limit.id] = limit
            return [("add", limit, record.received_ms)] * self.shard_count
        self._limits.pop(record.limit_id, None)
        return [("remove", record.limit_id)] * self.shard_count

    def _alerts_of(self, ticket: _Ticket) -> list[Alert]:
        """Number a finished record's crossings in an order that depends only on the log.

        Sorted by (customer, limit, period start, threshold): independent of the
        shard count and of how state was rebuilt, so replay after a crash, even
        with another shard count, gives every alert the seq it was acknowledged with.
        """
        crossings = sorted(
            (crossing for _, found in ticket.crossings for crossing in found),
            key=lambda c: (c[1], c[0], c[5], c[3]),
        )
        seq = self._hub.next_seq
        return [alert_from_crossing(seq + offset, crossing, ticket.received_ms)
                for offset, crossing in enumerate(crossings)]

    def _finish(self, ticket: _Ticket) -> None:
        """A WAL record is applied by every shard: sequence alerts in lsn order, then ack."""
        self._finished[ticket.lsn] = ticket
        while self._next_lsn_to_finish in self._finished:
            done = self._finished.pop(self._next_lsn_to_finish)
            self._next_lsn_to_finish += 1
            done.alerts = self._alerts_of(done)
            self._hub.append(done.alerts)
            done.done.set()

    # --------------------------------------------------------------- tasks

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            # The task that failed first stops the engine: its error, not a nested group,
            # is what ``open_engine`` raises (a storage failure arrives as StorageError).
            with unwrap_single():
                async with trio.open_nursery() as nursery:
                    for index, (_, receive) in enumerate(self._mailboxes):
                        nursery.start_soon(self._shard_actor, index, receive)
                    nursery.start_soon(self._writer)
                    task_status.started()
        finally:
            # However the tasks ended, nobody may wait forever for an answer.
            closed = EngineClosed(f"the engine stopped: {self._failure!r}"
                                  if self._failure else "the engine is closed")
            for ticket in list(self._outstanding):
                ticket.fail(closed)

    async def _shard_actor(self, index: int, receive: trio.MemoryReceiveChannel[Any]) -> None:
        setcontext(EXACT)  # this task's own context: exact decimal sums
        state = self._states[index]
        async with receive:
            async for message in receive:
                op = message[0]
                if op == _APPLY:
                    # One message per group commit: every record of the group, in lsn order.
                    for lsn, item, ticket in message[1]:
                        try:
                            _apply_work(state, index, lsn, item, ticket)
                        except BaseException as exc:
                            # A bug while applying may leave this shard half-updated: stop.
                            self._failure = exc
                            closed = EngineClosed(f"shard {index} failed: {exc!r}")
                            ticket.fail(closed)
                            _fail_waiting(message, receive, closed)
                            raise
                        ticket.pending -= 1
                        if ticket.pending == 0:
                            self._finish(ticket)
                    continue
                ticket = message[-1]
                if op == _QUERY:
                    try:
                        ticket.results.append(state.query(message[1]))
                    except Exception as exc:  # queries never mutate state: not fatal
                        if not isinstance(exc, MeteringError):
                            log.exception("query failed on shard %d", index)
                        ticket.fail(exc)
                else:
                    part = records.ShardPart(state.export(), state.limits.export())
                    ticket.results.append((index, records.encode(part)))
                ticket.pending -= 1
                if ticket.pending == 0:
                    ticket.done.set()

    async def _writer(self) -> None:
        receive = self._write_recv
        async with receive:
            while True:
                try:
                    first = await receive.receive()
                except trio.EndOfChannel:
                    break
                group = [first]
                size = len(first.record or b"")
                while not group[-1].snapshot and (
                    len(group) < MAX_GROUP_REQUESTS and size < MAX_GROUP_BYTES
                ):
                    try:
                        request = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    group.append(request)
                    size += len(request.record or b"")
                with trio.CancelScope(shield=True):
                    await self._commit_group(group)
                    if group[-1].snapshot or (
                        self._wal_bytes_since_snapshot >= self._snapshot_every_bytes
                        and trio.current_time() >= self._snapshot_not_before
                    ):
                        await self._snapshot(group[-1].ticket if group[-1].snapshot else None)

    async def _commit_group(self, group: list[_Write]) -> None:
        wal: list[tuple[int, bytes]] = []
        meta: list[tuple[bytes, bytes]] = []
        lsn = self._last_lsn
        group = self._settle_meter_definitions(group)
        for request in group:
            if request.record is not None:
                lsn += 1
                request.ticket.lsn = lsn
                wal.append((lsn, request.record))
            if request.meta:
                meta.extend(request.meta)
        try:
            await self._commit(wal, meta)
        except StorageFull as exc:
            # Nothing of the group was written: refuse it, keep serving.
            for request in group:
                request.ticket.fail(exc)
            return
        except Exception as exc:
            # The store failed in a way we cannot reason about: stop (fail-stop); the
            # next start recovers from what was durably committed.
            error = _storage_stopped(exc)
            self._failure = error
            for request in group:
                request.ticket.fail(error)
            raise error from exc
        self._last_lsn = lsn
        per_shard: list[list[tuple[int, Any, _Ticket]]] = [[] for _ in self._mailboxes]
        for request in group:
            ticket = request.ticket
            if request.meter is not None:
                self._meters[request.meter.name] = request.meter
            if request.limit_change is not None:
                action, subject = request.limit_change
                if action == "add":
                    self._limits.pop(subject.id, None)
                    self._limits[subject.id] = subject
                else:
                    # Decided in log order: of two concurrent removals only the first removes.
                    ticket.results.append(self._limits.pop(subject, None) is not None)
            if request.work is not None:
                self._wal_bytes_since_snapshot += len(request.record or b"")
                for shard, item in enumerate(request.work):
                    if item:
                        ticket.pending += 1
                        per_shard[shard].append((ticket.lsn, item, ticket))
            if ticket.pending == 0 and not request.snapshot:
                if request.record is not None:
                    self._finish(ticket)
                else:
                    ticket.done.set()
        # Every count is final before any shard can run: send only now.
        for shard, work in enumerate(per_shard):
            if work:
                await self._mailboxes[shard][0].send((_APPLY, work))

    async def _commit(self, wal: list[tuple[int, bytes]], meta: list[tuple[bytes, bytes]]) -> None:
        """One durable transaction: these records, plus every alert not yet stored."""
        alerts = self._hub.take_unpersisted()
        if not (wal or meta or alerts):
            return
        try:
            await self._call_store(self._store.commit, wal, meta, alerts)
        except MeteringError:
            self._hub.give_back(alerts)
            raise
        self._hub.stored()
        self._counters["commits"] += 1

    def _settle_meter_definitions(self, group: list[_Write]) -> list[_Write]:
        """Decide meter definitions here, in commit order: of two conflicting definitions
        of one name the first wins and the second fails with ``MeterConflict``; an
        identical one stores nothing."""
        settled: dict[str, MeterDef] = {}
        kept = []
        for request in group:
            meter = request.meter
            if meter is not None:
                try:
                    new = merge_meter(settled.get(meter.name) or self._meters.get(meter.name),
                                      meter)
                except MeterConflict as exc:
                    request.ticket.fail(exc)
                    continue
                if not new:
                    request.ticket.done.set()
                    continue
                settled[meter.name] = meter
            kept.append(request)
        return kept

    async def _snapshot(self, requester: _Ticket | None) -> None:
        """Snapshot every shard at the current lsn, then drop the WAL it covers."""
        ticket = _Ticket()
        ticket.pending = self.shard_count
        for send, _ in self._mailboxes:
            await send.send((_EXPORT, ticket))
        await ticket.done.wait()
        if ticket.error is not None:  # a shard stopped: there is no consistent state to save
            if requester is not None:
                requester.fail(ticket.error)
            return
        parts = [raw for _, raw in sorted(ticket.results)]
        engine_state = records.EngineState(
            limits=[records.wide_ints_as_decimals(limit.limit) for limit in self._limits.values()],
            next_alert_seq=self._hub.next_seq,
        )
        snapshot = StoredSnapshot(self._last_lsn, self.shard_count, parts,
                                  records.encode(engine_state))
        try:
            await self._commit([], [])  # stores pending alerts: their WAL is about to go
            await self._call_store(self._store.write_snapshot, snapshot)
        except StorageFull as exc:
            # The WAL is intact and keeps covering everything: try again later.
            self._snapshot_not_before = trio.current_time() + self._snapshot_retry_s
            if self._closed:
                log.error("snapshot at lsn %d on close failed; the write-ahead log is kept and "
                          "replayed at the next start: %s", snapshot.lsn, exc)
            else:
                log.error("snapshot at lsn %d failed, retrying in %.1f s at the earliest: %s",
                          snapshot.lsn, self._snapshot_retry_s, exc)
            self._snapshot_retry_s = min(self._snapshot_retry_s * 2, SNAPSHOT_RETRY_MAX_S)
            if requester is not None:
                requester.fail(exc)
            return
        except Exception as exc:
            error = _storage_stopped(exc)
            self._failure = error
            if requester is not None:
                requester.fail(error)
            raise error from exc
        self._snapshot_retry_s = SNAPSHOT_RETRY_MIN_S
        self._snapshot_not_before = -math.inf
        self._wal_bytes_since_snapshot = 0
        self._counters["snaps"] += 1
        if requester is not None:
            requester.lsn = snapshot.lsn
            requester.done.set()

    async def _call_store(self, function: Callable[..., None], *args: Any) -> None:
        """Run a store call on the event-loop thread, then let other tasks run.

        Not in a worker thread: under CPU load (busy query tasks) a worker thread
        waiting for the GIL was starved for seconds (ingest acks took 5-7 s with ten
        concurrent query loops), while a group commit inline costs about as much as
        the thread hand-off did (measured: no throughput loss; see docs/benchmarks.md).
        """
        function(*args)
        await trio.lowlevel.checkpoint()

    async def _submit(self, request: _Write) -> _Ticket:
        self._check_open()
        self._outstanding.add(request.ticket)
        try:
            try:
                await self._write_send.send(request)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise EngineClosed("the engine is closed") from None
            await request.ticket.wait()
        finally:
            self._outstanding.discard(request.ticket)
        return request.ticket

    def _check_open(self) -> None:
        if self._failure is not None:
            raise EngineClosed(f"the engine stopped after an internal error: {self._failure!r}")
        if self._closed:
            raise EngineClosed("the engine is closed")

    async def _close(self, snapshot: bool) -> None:
        """Stop taking requests, let the writer drain and snapshot, stop the shards."""
        self._closed = True
        if self._failure is None and snapshot:
            ticket = _Ticket()
            try:
                await self._write_send.send(_Write(ticket, snapshot=True))
                await ticket.done.wait()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        await self._write_send.aclose()
        for send, _ in self._mailboxes:
            await send.aclose()

    # ---------------------------------------------------------- public API

    async def define_meter(self, meter: Meter) -> Meter:
        """Define a meter (idempotent). A different aggregation for a known name is refused."""
        if type(meter) is not Meter:
            raise InvalidRequest(f"expected a Meter, got {type(meter).__name__}")
        try:
            meter_def = check_meter(meter, self.limits)
        except ValueError as exc:
            raise InvalidRequest(f"meter {meter.name!r}: {exc}") from None
        if not merge_meter(self._meters.get(meter.name), meter_def):
            return self._meters[meter.name].meter
        key = b"meter:" + meter.name.encode()
        # The writer decides again in commit order, where a concurrent definition may win.
        await self._submit(_Write(_Ticket(), meta=[(key, records.encode(meter))], meter=meter_def))
        return meter

    def meters(self) -> list[Meter]:
        return [self._meters[name].meter for name in sorted(self._meters)]

    async def ingest(self, events: Sequence[Event], *, report_alerts: bool = False) -> IngestAck:
        """Validate, log durably (fsync), apply; then acknowledge.

        Raises ``BatchRejected`` naming every bad event; then nothing is applied.
        With ``report_alerts=True`` the ack lists the limit crossings this batch caused,
        so a caller can enforce a hard limit synchronously.
        """
        self._check_open()
        if not isinstance(events, list):
            events = list(events)
        now_ms = self._clock_ms()
        slices = prepare_batch(events, self._meters, self._route, self.limits, now_ms)
        request = _Write(_Ticket(now_ms), record=records.encode_batch(events, now_ms), work=slices)
        ticket = await self._submit(request)
        self._counters["accepted"] += ticket.accepted
        self._counters["duplicates"] += ticket.duplicates
        self._counters["batches"] += 1
        return IngestAck(accepted=ticket.accepted, duplicates=ticket.duplicates, lsn=ticket.lsn,
                         alerts=ticket.alerts if report_alerts else [])

    async def add_limit(self, limit: Limit) -> Limit:
        """Add (or replace, by id) a limit; durable when this returns.

        The limit is evaluated at once for the current period: customers already
        at or over a threshold get an alert immediately.
        """
        self._check_open()
        try:
            limit_def = check_limit(limit, self._meters)
        except LimitError as exc:
            raise InvalidRequest(f"limit {getattr(limit, 'id', '?')!r}: {exc}") from None
        now_ms = self._clock_ms()
        record = records.encode(records.WalLimit(records.wide_ints_as_decimals(limit), now_ms))
        # Keep the limit as the log will give it back after a restart ("2.5" -> Decimal).
        stored = records.decode_record(record)
        assert isinstance(stored, records.WalLimit)
        limit_def = check_limit(stored.limit, self._meters)
        await self._submit(_Write(
            _Ticket(now_ms), record=record,
            work=[("add", limit_def, now_ms)] * self.shard_count, limit_change=("add", limit_def),
        ))
        return stored.limit

    async def remove_limit(self, limit_id: str) -> bool:
        """Remove a limit; False if there was none with that id."""
        self._check_open()
        if limit_id not in self._limits:
            return False
        now_ms = self._clock_ms()
        ticket = await self._submit(_Write(
            _Ticket(now_ms), record=records.encode(records.WalRemoveLimit(limit_id, now_ms)),
            work=[("remove", limit_id)] * self.shard_count, limit_change=("remove", limit_id),
        ))
        return bool(ticket.results and ticket.results[0])

    async def list_limits(self) -> list[Limit]:
        return [limit.limit for limit in self._limits.values()]

    @asynccontextmanager
    async def subscribe(self, from_seq: int = 0) -> AsyncIterator[AlertSubscription]:
        """Alerts with seq >= ``from_seq``: stored ones first, then live ones as they happen."""
        self._check_open()
        if type(from_seq) is not int or from_seq < 0:
            raise InvalidRequest(f"from_seq must be a non-negative integer, got {from_seq!r}")
        yield AlertSubscription(self._hub, from_seq)

    def next_alert_seq(self) -> int:
        return self._hub.next_seq

    async def query(self, query: Query) -> QueryResult:
        """Answer ``query`` from the shards that can hold matching customers."""
        self._check_open()
        if type(query) is not Query:
            raise InvalidRequest(f"expected a Query, got {type(query).__name__}")
        meter = self._meters.get(query.meter_api_name)
        if meter is None:
            raise UnknownMeter(f"unknown meter {query.meter_api_name!r}")
        plan = plan_query(query, meter)
        if not plan.cuts_ms:
            shards = []  # empty range
        elif plan.customers is not None:
            shards = sorted({self._route(customer) for customer in plan.customers})
        else:
            shards = list(range(self.shard_count))
        ticket = _Ticket()
        ticket.pending = len(shards)
        if shards:
            self._outstanding.add(ticket)
            try:
                for shard in shards:
                    try:
                        await self._mailboxes[shard][0].send((_QUERY, plan, ticket))
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        raise EngineClosed("the engine is closed") from None
                await ticket.wait()
            finally:
                self._outstanding.discard(ticket)
        return finish_query(plan, ticket.results)

    async def snapshot(self) -> int:
        """Write a snapshot now and truncate the WAL; returns the snapshot's lsn."""
        ticket = await self._submit(_Write(_Ticket(), snapshot=True))
        return ticket.lsn

    def statistics(self) -> EngineStatistics:
        series = buckets = 0
        for state in self._states:
            s, b = state_statistics(state)
            series += s
            buckets += b
        return EngineStatistics(
            shard_count=self.shard_count,
            meter_count=len(self._meters),
            series_count=series,
            bucket_count=buckets,
            last_lsn=self._last_lsn,
            events_accepted=self._counters["accepted"],
            events_duplicate=self._counters["duplicates"],
            batches=self._counters["batches"],
            group_commits=self._counters["commits"],
            snapshots=self._counters["snaps"],
            wal_bytes_since_snapshot=self._wal_bytes_since_snapshot,
            recovery_ms=self._recovery_ms,
            limit_count=len(self._limits),
            alerts=self._hub.next_seq,
            recovered_wal_records=self._recovered_wal_records,
            recovered_wal_bytes=self._recovered_wal_bytes,
        )

    def export_state(self) -> bytes:
        """Canonical bytes of all state (for tests: equal state ⇔ equal bytes)."""
        shards = [records.ShardPart(state.export(), state.limits.export())
                  for state in self._states]
        engine_state = records.EngineState(
            [records.wide_ints_as_decimals(limit.limit) for limit in self._limits.values()],
            self._hub.next_seq,
        )
        return records.encode([shards, engine_state])


def _storage_stopped(exc: BaseException) -> StorageError:
    """The error for a store failure that stops the engine (anything but a full disk)."""
    return StorageError(
        f"storage failure, the engine stopped (fail-stop): {exc}. The request was not "
        "applied; restart the engine to recover what was acknowledged."
    )


def _fail_waiting(
    current: tuple[Any, ...], receive: trio.MemoryReceiveChannel[Any], error: EngineClosed
) -> None:
    """A shard stopped: fail every ticket still waiting on it, so nothing waits forever
    (the rest of the current message, and whatever is queued in its mailbox)."""
    tickets = [ticket for _, _, ticket in current[1]]
    while True:
        try:
            message = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
        if message[0] == _APPLY:
            tickets.extend(ticket for _, _, ticket in message[1])
        else:
            tickets.append(message[-1])
    for ticket in tickets:
        ticket.fail(error)


def _apply_work(state: ShardState, index: int, lsn: int, item: Any, ticket: _Ticket) -> None:
    """Apply one WAL record's share for one shard, collecting its limit crossings."""
    if type(item) is list:  # a batch slice
        accepted, duplicates, crossings = state.apply(lsn, item)
        ticket.accepted += accepted
        ticket.duplicates += duplicates
    elif item[0] == "add":
        _, limit, received_ms = item
        crossings = state.limits.add(limit, state.meters.get(limit.meter.name), received_ms)
    else:
        state.limits.remove(item[1])
        crossings = []
    if crossings:
        ticket.crossings.append((index, crossings))


@asynccontextmanager
async def open_engine(
    data_dir: str | os.PathLike[str] | None = None,
    shards: int = 8,
    *,
    store: Store | None = None,
    limits: IngestLimits | None = None,
    clock_ms: Callable[[], int] | None = None,
    snapshot_every_bytes: int = DEFAULT_SNAPSHOT_EVERY_BYTES,
    map_bytes: int | None = None,
    max_map_bytes: int | None = None,
    snapshot_on_close: bool = True,
    tune_gc: bool = True,
) -> AsyncIterator[Engine]:
    """Open (or create) the engine whose state lives in ``data_dir``.

    Recovers from the latest snapshot plus the WAL tail, starts one actor per
    shard and the WAL writer, and on exit drains pending writes, writes a
    snapshot (unless ``snapshot_on_close=False``) and closes the store.

    ``tune_gc`` (default on) tunes the process's cyclic garbage collector while
    the engine is open: it freezes the objects alive after recovery (so
    collections never walk the recovered state again) and raises the first
    threshold from 700 to 50,000; on exit it restores the threshold and
    unfreezes. The engine's state is mostly GC-tracked containers that live as
    long as the engine, and walking them repeatedly cost a large share of
    ingest time (see docs/benchmarks.md). Pass ``tune_gc=False`` if the host
    program manages the collector itself.
    """
    if store is None:
        if data_dir is None:
            raise ValueError("open_engine needs a data_dir (or a store)")
        max_map_bytes = max_map_bytes or DEFAULT_MAX_MAP_BYTES
        store = LmdbStore(data_dir, map_bytes=map_bytes or min(DEFAULT_MAP_BYTES, max_map_bytes),
                          max_map_bytes=max_map_bytes)
    try:
        engine = Engine(
            store,
            shards,
            limits or IngestLimits(),
            clock_ms or wall_clock_ms,
            snapshot_every_bytes,
        )
        engine._recover()
        previous_thresholds = gc.get_threshold()
        if tune_gc:
            # Recovered state lives as long as the engine: keep the cyclic GC off it.
            gc.collect()
            gc.freeze()
            gc.set_threshold(max(previous_thresholds[0], GC_GEN0_THRESHOLD), 20, 100)
        try:
            with unwrap_single():
                async with trio.open_nursery() as nursery:
                    await nursery.start(engine._run)
                    try:
                        yield engine
                    finally:
                        with trio.CancelScope(shield=True):
                            await engine._close(snapshot_on_close)
        finally:
            if tune_gc:
                gc.set_threshold(*previous_thresholds)
                gc.unfreeze()
    finally:
        store.close()
