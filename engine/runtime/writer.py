"""The WAL writer: the only task that writes the store.

Runtime layer: trio, the storage layer, the domain and the runtime's messages.
Rules of this file:

1. It is the only caller of ``Store.commit`` and ``Store.write_snapshot`` while the
   engine runs. It owns ``last_lsn``, the WAL bytes written since the last snapshot,
   the snapshot schedule and backoff, and the commit counters.
2. Group commit: it takes as many requests as are waiting (up to a count and a size)
   and commits them in one transaction with fsync, assigning gap-free lsns.
3. Only after that commit returns does anything learn of the group: the catalog
   changes (in commit order), and each shard's mailbox gets its work for the whole
   group in one message. So nothing is applied or acknowledged before it is durable.
4. Fail-stop: a full disk refuses the group and keeps serving; any other store
   error stops the engine, and the next start recovers what was committed.
5. Dedup is decided here, in the group's own commit: every unique id of the group's
   batches is put into the store's dedup index without overwriting, in lsn order; a
   put that finds its key marks a duplicate, which is then dropped from its shard's
   columns before any shard sees the group (``engine.runtime.dedup``).
6. Between group commits it expires dedup index entries older than the horizon, in
   bounded slices (``_expire_slice``), never all at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from engine.domain import records
from engine.domain.meters import MeterDef, merge_meter
from engine.errors import (
    CustomerExists,
    DataDirError,
    MeterConflict,
    MeteringError,
    StorageError,
    StorageFull,
    UnknownCustomer,
)
from engine.faults import fault_point
from engine.runtime.acks import AckSequencer
from engine.runtime.alerts import AlertHub
from engine.runtime.blocks import BlockCache
from engine.runtime.catalog import Catalog
from engine.runtime.dedup import batch_keys, drop_duplicates
from engine.runtime.history import HistoryPolicy
from engine.runtime.lifecycle import Lifecycle
from engine.runtime.messages import (
    Apply,
    ApplyGroup,
    DefineMeter,
    ExportState,
    GatherTicket,
    HideCustomer,
    InstallLimit,
    LogBatch,
    LogCustomerChange,
    LogExtension,
    LoggedTicket,
    LogLimitChange,
    PutCustomer,
    ShardCheckpoint,
    ShardMessage,
    SnapshotTicket,
    TakeSnapshot,
    WriteRequest,
)
from engine.schema import Customer
from engine.storage import Store, StoredSnapshot
from engine.storage.base import ARRIVAL_DAY_MS, ID_VALUE

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_GROUP_REQUESTS = 64
MAX_GROUP_BYTES = 8 << 20
# A checkpoint is due once the WAL since the last one reaches ``snapshot_every_bytes`` and
# this many times what the last one wrote (blocks aside).
CHECKPOINT_SHARE_OF_WAL = 2
# Shards that seal a day that left the hot window per automatic checkpoint.
SEAL_SHARDS_PER_CHECKPOINT = 2
# Late events for sealed days are merged into their blocks at most this often (in WAL
# bytes), at sealing checkpoints and at requested ones.
COMPACT_EVERY_BYTES = 256 << 20
# After a snapshot failed for lack of space, the next automatic try waits this long,
# doubling per failure up to the maximum.
SNAPSHOT_RETRY_MIN_S = 1.0
SNAPSHOT_RETRY_MAX_S = 60.0
# Dedup index expiry: entries looked at per slice (a few ms of LMDB work), the least
# time between two slices (so a pass costs the ingest path little), and the wait after
# a slice that found no room.
EXPIRY_SLICE_KEYS = 2048
EXPIRY_SLICE_GAP_S = 0.05
EXPIRY_FULL_RETRY_S = 60.0


class WalWriter:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        hub: AlertHub,
        acks: AckSequencer,
        lifecycle: Lifecycle,
        mailboxes: list[trio.MemorySendChannel[ShardMessage]],
        *,
        last_lsn: int,
        wal_bytes_since_snapshot: int,
        snapshot_every_bytes: int,
        dedup_horizon_ms: int,
        future_ms: int,
        snapshot_lsn: int,
        history: HistoryPolicy,
        blocks: BlockCache,
        wal_marks: list[list[int]],
        sealed_before_minutes: list[int],
        head_rewrite: bool = False,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._hub = hub
        self._acks = acks
        self._lifecycle = lifecycle
        self._mailboxes = mailboxes
        self._snapshot_every_bytes = snapshot_every_bytes
        self.last_lsn = last_lsn
        self.wal_bytes_since_snapshot = wal_bytes_since_snapshot
        self.group_commits = 0
        self.snapshots = 0
        self._snapshot_not_before = -math.inf  # trio time
        self._snapshot_retry_s = SNAPSHOT_RETRY_MIN_S
        # An entry may go once its arrival day lies wholly before now - horizon - future
        # tolerance: an event can carry a timestamp up to future_ms after its arrival,
        # so a retry with the same timestamp is then always refused as late.
        self._expiry_keep_ms = dedup_horizon_ms + future_ms
        self.snapshot_lsn = snapshot_lsn  # expiry keeps every entry the WAL tail needs
        self.expiry_slice_keys = EXPIRY_SLICE_KEYS
        self.expiry_gap_s = EXPIRY_SLICE_GAP_S
        self._expiry_key: bytes | None = None  # where the running pass goes on; None: idle
        self._expiry_pass: tuple[int, int] | None = None  # (cutoff day, snapshot lsn) of it
        self._expiry_done: tuple[int, int] | None = None  # ... of the last finished pass
        self._next_slice_at = -math.inf  # trio time
        self.expiry_slices = 0
        self.ids_expired = 0
        self._history = history  # the engine's clock, hot window and raw-event retention
        self._blocks = blocks
        # [lsn, clock ms] per checkpoint within the raw-event retention (EngineState).
        self._wal_marks = wal_marks
        # Where each shard's sealed history ends: automatic checkpoints seal a day on
        # SEAL_SHARDS_PER_CHECKPOINT shards at a time (see ``_snapshot``).
        self._shard_sealed = list(sealed_before_minutes)
        self._wal_bytes_since_compaction = 0
        # The next checkpoint writes every head chunk anew (engine.domain.head): after a
        # restore that cannot reuse the stored chunks, and after a checkpoint failed.
        self._head_rewrite = head_rewrite
        # The last checkpoint written (EngineStatistics).
        self.checkpoint_bytes = 0
        self.checkpoint_state_bytes = 0  # of it, what every checkpoint writes: not blocks
        self.checkpoint_head_chunks = 0
        self.checkpoint_head_chunks_dropped = 0
        self.checkpoint_ms = 0.0

    async def run(self, requests: trio.MemoryReceiveChannel[WriteRequest]) -> None:
        async with requests:
            while True:
                try:
                    first = await self._next_request(requests)
                except trio.EndOfChannel:
                    break
                group = [first]
                size = _record_bytes(first)
                # A snapshot request ends a group: it covers everything before it.
                while not isinstance(group[-1], TakeSnapshot) and (
                    len(group) < MAX_GROUP_REQUESTS and size < MAX_GROUP_BYTES
                ):
                    try:
                        request = requests.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    group.append(request)
                    size += _record_bytes(request)
                with trio.CancelScope(shield=True):
                    await self._commit_group(group)
                    last = group[-1]
                    if isinstance(last, TakeSnapshot):
                        await self._snapshot(last.ticket)
                    elif ((self.wal_bytes_since_snapshot >= self._checkpoint_every_bytes()
                           or self._seal_due())
                          and trio.current_time() >= self._snapshot_not_before):
                        await self._snapshot(None)

    async def _next_request(self, requests: trio.MemoryReceiveChannel[WriteRequest]
                            ) -> WriteRequest:
        """The next request; while an expiry pass runs, a slice of it whenever one is due
        (after the group before, or while no request comes)."""
        while True:
            self._start_expiry_pass()
            if self._expiry_key is None:
                return await requests.receive()
            if trio.current_time() >= self._next_slice_at:
                await self._expire_slice()
                continue
            with trio.move_on_at(self._next_slice_at):
                return await requests.receive()

    def _start_expiry_pass(self) -> None:
        """Start a pass over the index when the cutoff day or the snapshot moved since
        the last one started (entries the WAL tail needs are kept until a snapshot
        covers them)."""
        if self._expiry_key is not None:
            return
        cutoff_day = (self._history.clock_ms() - self._expiry_keep_ms) // ARRIVAL_DAY_MS
        wanted = (cutoff_day, self.snapshot_lsn)
        if cutoff_day > 0 and wanted != self._expiry_done:
            self._expiry_pass = wanted
            self._expiry_key = b""

    async def _expire_slice(self) -> None:
        """One bounded slice of the running expiry pass: one short write transaction."""
        assert self._expiry_key is not None and self._expiry_pass is not None
        cutoff_day, snapshot_lsn = self._expiry_pass
        try:
            with trio.CancelScope(shield=True):
                done = await call_store(self._store.expire_ids, self._expiry_key, cutoff_day,
                                        snapshot_lsn, self.expiry_slice_keys)
        except StorageFull as exc:
            log.warning("dedup index expiry found no room, retrying in %.0f s: %s",
                        EXPIRY_FULL_RETRY_S, exc)
            self._next_slice_at = trio.current_time() + EXPIRY_FULL_RETRY_S
            return
        except DataDirError as exc:  # a damaged entry: stop, saying so (not a write error)
            self._lifecycle.stop(exc)
            raise
        except Exception as exc:
            error = storage_stopped(exc)
            self._lifecycle.stop(error)
            raise error from exc
        self.expiry_slices += 1
        self.ids_expired += done.deleted
        self._next_slice_at = trio.current_time() + self.expiry_gap_s
        self._expiry_key = done.next_key
        if done.next_key is None:
            self._expiry_done = self._expiry_pass

    async def _commit_group(self, group: list[WriteRequest]) -> None:
        wal: list[tuple[int, bytes]] = []
        meta: list[tuple[bytes, bytes]] = []
        ids: list[tuple[bytes, bytes]] = []
        # The batches that carry unique ids, with how many keys each put.
        deduped: list[tuple[LogBatch, int]] = []
        lsn = self.last_lsn
        group = self._settle(group)
        for request in group:
            match request:
                case LogBatch(ticket, record, work):
                    lsn += 1
                    ticket.lsn = lsn
                    wal.append((lsn, record))
                    keys = batch_keys(item.slice if item else None for item in work)
                    if keys:
                        value = ID_VALUE.pack(lsn, ticket.received_ms // ARRIVAL_DAY_MS)
                        ids.extend([(key, value) for key in keys])
                        deduped.append((request, len(keys)))
                case (LogLimitChange(ticket, record) | LogCustomerChange(ticket, record)
                      | LogExtension(ticket, record)):
                    lsn += 1
                    ticket.lsn = lsn
                    wal.append((lsn, record))
                case DefineMeter(_, _, key, value):
                    meta.append((key, value))
        try:
            duplicates = await self._commit(wal, meta, ids)
        except StorageFull as exc:
            # Nothing of the group was written: refuse it, keep serving.
            for request in group:
                request.ticket.fail(exc)
            return
        except Exception as exc:
            error = storage_stopped(exc)
            self._lifecycle.stop(error)
            for request in group:
                request.ticket.fail(error)
            raise error from exc
        self.last_lsn = lsn
        flag = 0
        for batch, key_count in deduped:
            batch.ticket.duplicates = drop_duplicates(
                (item.slice if item else None for item in batch.work), duplicates, flag)
            flag += key_count
        per_shard: list[list[Apply]] = [[] for _ in self._mailboxes]
        for request in group:
            match request:
                case LogBatch(ticket, record, work):
                    self.wal_bytes_since_snapshot += len(record)
                    for shard, item in enumerate(work):
                        if item is not None:
                            ticket.pending += 1
                            per_shard[shard].append(Apply(ticket.lsn, item, ticket))
                    if ticket.pending == 0:
                        self._acks.finish(ticket)
                case LogLimitChange(ticket, record, change):
                    self.wal_bytes_since_snapshot += len(record)
                    if isinstance(change, InstallLimit):
                        self._catalog.put_limit(change.limit)
                    else:
                        # Decided in log order: of two concurrent removals only the first removes.
                        ticket.removed = self._catalog.drop_limit(change.limit_id)
                    ticket.pending = len(per_shard)
                    for items in per_shard:
                        items.append(Apply(ticket.lsn, change, ticket))
                case LogCustomerChange(ticket, record, change):
                    self.wal_bytes_since_snapshot += len(record)
                    if isinstance(change, PutCustomer):
                        self._catalog.put_customer(change.customer)
                    else:
                        self._catalog.hide_customer(change.customer_id)
                        ticket.removed = True
                    self._acks.finish(ticket)
                case DefineMeter(meter=meter):
                    self._catalog.put_meter(meter)
                    request.ticket.finish()
                case LogExtension(ticket, record, action):
                    self.wal_bytes_since_snapshot += len(record)
                    self._commit_extension(ticket, action, per_shard)
        # Every count is final before any shard can run: send only now.
        for shard, shard_items in enumerate(per_shard):
            if shard_items:
                await self._mailboxes[shard].send(ApplyGroup(shard_items))

    def _commit_extension(self, ticket: LoggedTicket, action: Any,
                          per_shard: list[list[Apply]]) -> None:
        """The extension applies its record in commit order; every shard gets its work."""
        extension = self._catalog.extension
        assert extension is not None
        work = extension.commit(action, ticket.received_ms, self._catalog.meter_defs)
        ticket.extension.append(action)
        if not work:
            self._acks.finish(ticket)
            return
        ticket.pending = len(per_shard) * len(work)
        for items in per_shard:
            items.extend(Apply(ticket.lsn, item, ticket) for item in work)

    async def _commit(self, wal: list[tuple[int, bytes]], meta: list[tuple[bytes, bytes]],
                      ids: list[tuple[bytes, bytes]] | None = None) -> list[bool]:
        """One durable transaction: these records and dedup keys, plus every alert not yet
        stored. Returns the duplicate flag of each key."""
        alerts = self._hub.take_unpersisted()
        if not (wal or meta or alerts):
            return []
        try:
            duplicates = await call_store(self._store.commit, wal, meta, alerts, ids)
        except MeteringError:
            self._hub.give_back(alerts)
            raise
        self._hub.stored()
        self.group_commits += 1
        return duplicates

    def _settle(self, group: list[WriteRequest]) -> list[WriteRequest]:
        """Decide definitions here, in commit order, against the catalog and the requests
        before them in the group; drop what needs no record, fail what conflicts.

        Meters: of two conflicting definitions of one name the first wins and the
        second fails with ``MeterConflict``; an identical one stores nothing.
        Customers: an add of a customer that has a named record fails with
        ``CustomerExists``, an update of an unknown or deleted one with
        ``UnknownCustomer``; deleting an already deleted one stores nothing.
        """
        meters: dict[str, MeterDef] = {}
        # Customer id -> (record, hidden) as of the requests kept so far in this group.
        staged: dict[str, tuple[Customer | None, bool]] = {}
        kept: list[WriteRequest] = []
        catalog = self._catalog
        for request in group:
            if isinstance(request, DefineMeter):
                meter = request.meter
                try:
                    new = merge_meter(meters.get(meter.name) or catalog.meter_defs.get(meter.name),
                                      meter)
                except MeterConflict as exc:
                    request.ticket.fail(exc)
                    continue
                if not new:
                    request.ticket.finish()
                    continue
                meters[meter.name] = meter
            elif isinstance(request, LogCustomerChange):
                change = request.change
                cid = change.customer.id if isinstance(change, PutCustomer) else change.customer_id
                record, hidden = staged.get(
                    cid, (catalog.customers.get(cid), cid in catalog.hidden_customers))
                if isinstance(change, HideCustomer):
                    if hidden:
                        request.ticket.finish()  # ``removed`` stays False: already deleted
                        continue
                    staged[cid] = (record, True)
                elif change.mode == "add" and not hidden and record is not None and record.name:
                    request.ticket.fail(CustomerExists(f"customer {cid!r} already exists"))
                    continue
                elif change.mode == "update" and (hidden or (record is None
                                                             and not change.known_by_usage)):
                    request.ticket.fail(UnknownCustomer(f"unknown customer {cid!r}"))
                    continue
                else:
                    staged[cid] = (change.customer, False)
            kept.append(request)
        return kept

    def _checkpoint_every_bytes(self) -> int:
        """The WAL bytes after which the next checkpoint is due: ``snapshot_every_bytes``,
        or more when checkpoints are large (limits' states of long periods are written
        whole each time), so checkpoints never write more than 1/CHECKPOINT_SHARE_OF_WAL
        of the WAL's volume again."""
        return max(self._snapshot_every_bytes,
                   CHECKPOINT_SHARE_OF_WAL * self.checkpoint_state_bytes)

    @property
    def sealed_before_minute(self) -> int:
        """Event time before this minute is sealed on every shard."""
        return min(self._shard_sealed)

    def _seal_due(self) -> bool:
        """Whether a day left the hot window and some shard has not sealed it yet."""
        return (self._history.seal_before_minute(self._history.clock_ms())
                > self.sealed_before_minute)

    async def _snapshot(self, requester: SnapshotTicket | None) -> None:
        """Checkpoint: every shard seals what left the hot window and encodes its head at
        the current lsn; the parts, the new blocks and the trimming of the WAL past the
        raw-event retention are one transaction."""
        started = trio.current_time()
        now_ms = self._history.clock_ms()
        target = max(self._history.seal_before_minute(now_ms), *self._shard_sealed)
        # Sealing a day is most of a checkpoint's work (cutting, encoding and compressing
        # the day's blocks): an automatic checkpoint does it on a few shards, the ones
        # behind the longest first, and the next group commit's checkpoint goes on
        # (``_seal_due``); a requested one (``snapshot()``, close) on every shard.
        behind = sorted((sealed, index) for index, sealed in enumerate(self._shard_sealed)
                        if sealed < target)
        if requester is None:
            behind = behind[:SEAL_SHARDS_PER_CHECKPOINT]
        chosen = {index for _, index in behind}
        # Compaction decodes and re-encodes a block per (meter, day) with late events:
        # at most every COMPACT_EVERY_BYTES of WAL (checkpoints come far more often, and
        # late events waiting longer are merged in fewer rewrites), when sealing, and
        # when asked.
        compact = (requester is not None or bool(chosen)
                   or (self._wal_bytes_since_compaction + self.wal_bytes_since_snapshot
                       >= COMPACT_EVERY_BYTES))
        full = self._head_rewrite
        ticket: GatherTicket[ShardCheckpoint] = GatherTicket(len(self._mailboxes))
        for index, mailbox in enumerate(self._mailboxes):
            # The others seal too if that cuts nothing (their heads begin later).
            await mailbox.send(ExportState(ticket, target, self.last_lsn, full,
                                           index in chosen, compact))
        await ticket.done.wait()
        if ticket.error is not None:  # a shard stopped: there is no consistent state to save
            if requester is not None:
                requester.fail(ticket.error)
            return
        for share in ticket.results:
            self._shard_sealed[share.index] = share.sealed_before_minute
        self._wal_bytes_since_compaction = (
            0 if compact else self._wal_bytes_since_compaction + self.wal_bytes_since_snapshot)
        fault_point("checkpoint.exported")
        shares = sorted(ticket.results, key=lambda share: share.index)
        marks, trim_through = self._history.wal_marks_after(self._wal_marks, self.last_lsn,
                                                            now_ms)
        engine_state = self._catalog.engine_state(self._hub.next_seq)
        engine_state.wal_marks = marks
        snapshot = StoredSnapshot(self.last_lsn, len(self._mailboxes),
                                  [share.part for share in shares],
                                  records.encode(engine_state),
                                  [chunk for share in shares for chunk in share.head])
        drop_head = [key for share in shares for key in share.drop_head]
        blocks = self._blocks.unwritten()
        # Whatever happens next, the shards have taken these chunks off their dirty lists:
        # until a checkpoint is written, the next one rewrites every chunk.
        self._head_rewrite = True
        try:
            await self._commit([], [])  # stores pending alerts with the state that made them
            await call_store(self._store.write_snapshot, snapshot, blocks, trim_through, (),
                             drop_head, full)
        except StorageFull as exc:
            # The WAL is intact and keeps covering everything: try again later.
            self._snapshot_not_before = trio.current_time() + self._snapshot_retry_s
            if self._lifecycle.closed:
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
            error = storage_stopped(exc)
            self._lifecycle.stop(error)
            if requester is not None:
                requester.fail(error)
            raise error from exc
        fault_point("checkpoint.written")
        self._head_rewrite = False
        self.checkpoint_state_bytes = (sum(map(len, snapshot.parts))
                                       + len(snapshot.engine_state)
                                       + sum(len(raw) for _, raw in snapshot.head))
        self.checkpoint_bytes = self.checkpoint_state_bytes + sum(len(raw) for _, raw in blocks)
        self.checkpoint_head_chunks = len(snapshot.head)
        self.checkpoint_head_chunks_dropped = len(drop_head)
        self.checkpoint_ms = (trio.current_time() - started) * 1000
        self._snapshot_retry_s = SNAPSHOT_RETRY_MIN_S
        self._snapshot_not_before = -math.inf
        self._wal_marks = marks
        self._blocks.written([key for key, _ in blocks])
        self.snapshot_lsn = snapshot.lsn
        self.wal_bytes_since_snapshot = 0
        self.snapshots += 1
        if requester is not None:
            requester.lsn = snapshot.lsn
            requester.finish()


def _record_bytes(request: WriteRequest) -> int:
    if isinstance(request, LogBatch | LogLimitChange):
        return len(request.record)
    return 0


async def call_store(function: Callable[..., T], *args: Any) -> T:
    """Run a store call on the event-loop thread, then let other tasks run.

    Not in a worker thread: under CPU load (busy query tasks) a worker thread
    waiting for the GIL was starved for seconds (ingest acks took 5-7 s with ten
    concurrent query loops), while a group commit inline costs about as much as
    the thread hand-off did (measured: no throughput loss; see docs/benchmarks.md).
    """
    result = function(*args)
    await trio.lowlevel.checkpoint()
    return result


def storage_stopped(exc: BaseException) -> StorageError:
    """The error for a store failure that stops the engine (anything but a full disk)."""
    return StorageError(
        f"storage failure, the engine stopped (fail-stop): {exc}. The request was not "
        "applied; restart the engine to recover what was acknowledged."
    )
