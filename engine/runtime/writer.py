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
5. Dedup is decided here, for the group's own commit: every unique id of the group's
   batches is looked up in the dedup index (``engine.runtime.idindex``: memtable, sorted
   runs behind Bloom filters, the legacy tree), in lsn order; the batches' duplicates
   are logged in the same commit, dropped from their shards' columns before any shard
   sees the group, and the new ids join the memtable once the commit is durable.
6. Between group commits it runs the index's background work (writing the frozen
   memtable as a run, merging runs, dropping expired ones) and expires legacy index
   entries older than the horizon, in bounded slices, never all at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from engine.domain import records
from engine.domain.batch import ShardRouter, ShardSlice
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
from engine.runtime.corrections import CORRECTION_LSN, USED_PREFIX, CorrectionBook
from engine.runtime.dedup import batch_keys, drop_duplicates, encode_decisions, key_events
from engine.runtime.groups import unwrap_single
from engine.runtime.history import HistoryPolicy
from engine.runtime.idindex import DECIDED_FROM_KEY, LSN, MEMTABLE_MAX_KEYS, IdIndex
from engine.runtime.lifecycle import Lifecycle
from engine.runtime.messages import (
    Apply,
    ApplyCorrection,
    ApplyGroup,
    DefineMeter,
    ExportState,
    GatherTicket,
    HideCustomer,
    InstallLimit,
    LogBatch,
    LogCorrection,
    LogCustomerChange,
    LogExtension,
    LoggedTicket,
    LogLimitChange,
    PutCustomer,
    SealDays,
    ShardCheckpoint,
    ShardMessage,
    SnapshotTicket,
    TakeSnapshot,
    WriteRequest,
)
from engine.schema import Customer
from engine.storage import Store, StoredSnapshot
from engine.storage.base import ARRIVAL_DAY_MS, RunSlice

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_GROUP_REQUESTS = 64
MAX_GROUP_BYTES = 8 << 20
# A checkpoint is due once the WAL since the last one reaches ``snapshot_every_bytes`` and
# this many times what the last one wrote (blocks aside).
CHECKPOINT_SHARE_OF_WAL = 2
# Late events for sealed days are merged into their blocks at most this often (in WAL
# bytes), shard by shard between group commits, and at requested checkpoints.
COMPACT_EVERY_BYTES = 256 << 20
# ... and sooner for a shard whose deltas hold at least this many buckets (a backfill of
# history arrives as late events: merged a few days per pass while it goes on, so that
# neither memory nor the queries' minute walks grow with it) ...
COMPACT_DELTA_BUCKETS = 1 << 18
# ... and, whatever their size, once neither a write nor a query has come for this long:
# one shard's pass after another, COMPACT_IDLE_GAP_S apart, until every delta is merged.
COMPACT_IDLE_S = 1.0
COMPACT_IDLE_GAP_S = 0.005
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
# The dedup index's background slices (``IdIndex.run_slice``, a few ms each): the least
# time between two.
INDEX_SLICE_GAP_S = 0.005
# ... and how long the writer waits for a request to carry a slice before it writes the
# slice in a transaction of its own (an fsync more, and a long one on a busy disk).
INDEX_IDLE_S = 0.5
# While a requested checkpoint waits for a shard's sealing and no request comes, how
# often the writer looks again.
REQUESTED_POLL_S = 0.002
# How long a due checkpoint waits for the encoder thread's blocks before it encodes
# the rest itself, in its own turn (a safety net: no shard seals while blocks wait for
# the encoder, so it has at most one shard's sealing to finish).
ENCODE_WAIT_S = 10.0


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
        index: IdIndex,
        decided_from: int | None,
        delta_buckets: list[int],
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
        self.index = index
        # The first lsn whose dedup decisions are logged (None: none yet; the first group
        # commit stores its own first lsn).
        self._decided_from = decided_from
        self._next_index_slice_at = -math.inf  # trio time
        self.index_slices = 0
        self.expiry_slices = 0
        self.ids_expired = 0
        self._history = history  # the engine's clock, hot window and raw-event retention
        self._blocks = blocks
        # [lsn, clock ms] per checkpoint within the raw-event retention (EngineState).
        self._wal_marks = wal_marks
        # Where each shard's sealed history ends, as far as the messages sent to it go:
        # days that left the hot window are sealed one shard at a time between group
        # commits (``_seal_in_background``), and by requested checkpoints.
        self._shard_sealed = list(sealed_before_minutes)
        self._sealing: trio.Event | None = None  # set when the shard sealing now is done
        self._sealed_since_checkpoint = False  # a SealDays went out since the last one
        self._wal_bytes_since_compaction = 0
        self._compaction_owed: set[int] = set()  # shards to merge their deltas next
        # Each shard's late-event buckets waiting in its deltas (an upper bound), written
        # by the shard actors after their turns (``ShardState.delta_buckets``).
        self._delta_buckets = delta_buckets
        self._last_request_at = -math.inf  # trio time the last group was committed
        # Trio time the last query was sent to the shards (set by the engine): idle
        # compaction waits for reads too, so that no query waits behind its passes.
        self.last_read_at = -math.inf
        self._next_idle_compaction_at = -math.inf  # trio time
        # Requested checkpoints (``snapshot()``, close) waiting for every shard to seal
        # up to ``_requested_target`` and merge its deltas (``_requested_compact``), one
        # shard at a time between group commits, as in the background.
        self._requested: list[SnapshotTicket] = []
        self._requested_target = 0
        self._requested_compact: set[int] = set()
        # The next checkpoint writes every head chunk anew (engine.domain.head): after a
        # restore that cannot reuse the stored chunks, and after a checkpoint failed.
        self._head_rewrite = head_rewrite
        # The last checkpoint written (EngineStatistics).
        self.checkpoint_bytes = 0
        self.checkpoint_state_bytes = 0  # of it, what every checkpoint writes: not blocks
        self.checkpoint_head_chunks = 0
        self.checkpoint_head_chunks_dropped = 0
        self.checkpoint_ms = 0.0
        # Cancelled positions and re-admissible unique ids (engine.runtime.corrections).
        self.corrections = CorrectionBook()
        self._route = ShardRouter(len(mailboxes))
        self._held: WriteRequest | None = None  # a correction that ended the group before
        self._index_idle = False  # no request came for INDEX_IDLE_S: slices run back to back
        self._encoder_wait_since: float | None = None  # a due checkpoint waits for blocks

    async def run(self, requests: trio.MemoryReceiveChannel[WriteRequest],
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Sealed blocks are encoded on a worker thread, off the shards' turns. The
        # writer's own failure, not a group around it, is what stops the engine.
        with unwrap_single():
            async with requests, trio.open_nursery() as nursery:
                nursery.start_soon(self._blocks.encode_in_background)
                await self._seal_at_open()
                # Idle time counts from the open: a restart answers its first queries
                # before idle compaction starts.
                self._last_request_at = trio.current_time()
                task_status.started()
                await self._serve_requests(requests)
                nursery.cancel_scope.cancel()

    async def _serve_requests(self, requests: trio.MemoryReceiveChannel[WriteRequest]
                              ) -> None:
        while True:
            if self._held is not None:
                first, self._held = self._held, None
            else:
                try:
                    first = await self._next_request(requests)
                except trio.EndOfChannel:
                    break
                self._index_idle = False
            group = [first]
            size = _record_bytes(first)
            # A snapshot request ends a group: it covers everything before it. A
            # correction is a group of its own (it reads the log up to the lsn
            # before it).
            while not isinstance(group[-1], TakeSnapshot | LogCorrection) and (
                len(group) < MAX_GROUP_REQUESTS and size < MAX_GROUP_BYTES
            ):
                try:
                    request = requests.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if isinstance(request, LogCorrection):
                    self._held = request
                    break
                group.append(request)
                size += _record_bytes(request)
            with trio.CancelScope(shield=True):
                await self._commit_group(group)
                self._last_request_at = trio.current_time()
                last = group[-1]
                if isinstance(last, TakeSnapshot):
                    self._want_snapshot(last.ticket)
                elif ((self.wal_bytes_since_snapshot >= self._checkpoint_every_bytes()
                       or self._sealed_everywhere())
                      and trio.current_time() >= self._snapshot_not_before
                      and not self._waiting_for_encoder()):
                    await self._snapshot([])
                await self._serve_background()
        with trio.CancelScope(shield=True):
            await self._finish_flush()

    async def _finish_flush(self) -> None:
        """On close, write out the run being flushed (the close's checkpoint froze the
        memtable), so the next start rebuilds no memtable from before that checkpoint.
        Bounded by ``MEMTABLE_MAX_KEYS``; merges and drops wait for the next run."""
        while self._lifecycle.failure is None and self.index.flushing():
            await self._index_slice()
            if self._next_index_slice_at > trio.current_time() + INDEX_SLICE_GAP_S:
                return  # no room: the next start rebuilds the memtable from the WAL

    async def _next_request(self, requests: trio.MemoryReceiveChannel[WriteRequest]
                            ) -> WriteRequest:
        """The next request; while an expiry pass runs, a slice of it whenever one is due
        (after the group before, or while no request comes)."""
        while True:
            if self._requested:
                # A requested checkpoint waits for its shards' sealing: take requests as
                # they come, and move it on between them.
                with trio.move_on_after(REQUESTED_POLL_S):
                    return await requests.receive()
                with trio.CancelScope(shield=True):
                    await self._serve_background()
                continue
            self._start_expiry_pass()
            idle_compaction_at = max(
                max(self._last_request_at, self.last_read_at) + COMPACT_IDLE_S,
                self._next_idle_compaction_at)
            due = [at for at, pending in ((self._next_index_slice_at, self.index.pending()),
                                          (self._next_slice_at, self._expiry_key is not None),
                                          (idle_compaction_at, self._idle_work()))
                   if pending]
            if not due:
                return await requests.receive()
            if trio.current_time() >= min(due):
                if self._idle_work() and trio.current_time() >= idle_compaction_at:
                    with trio.CancelScope(shield=True):
                        await self._idle_compaction()
                elif self.index.pending() and trio.current_time() >= self._next_index_slice_at:
                    # A request first, if one comes soon: its group commit carries the
                    # slice; a transaction of its own (an fsync more) only when idle.
                    # Once idle, slices follow one another until a request comes.
                    if not self._index_idle:
                        with trio.move_on_after(INDEX_IDLE_S):
                            return await requests.receive()
                        self._index_idle = True
                    await self._index_slice()
                else:
                    await self._expire_slice()
                continue
            with trio.move_on_at(min(due)):
                return await requests.receive()

    def _idle_work(self) -> bool:
        """Deltas to merge, or blocks (merged or sealed) not yet written."""
        return any(self._delta_buckets) or self._blocks.unwritten_count() > 0

    async def _idle_compaction(self) -> None:
        """No write or query for COMPACT_IDLE_S: the next shard's pass over what late
        events left in its deltas (a bounded number of blocks, in the shard's own turn);
        once every delta is merged, the checkpoint that writes the blocks, so that they
        leave memory for the cache and a restart does not read the deltas again."""
        now = trio.current_time()
        self._next_idle_compaction_at = now + COMPACT_IDLE_GAP_S
        if any(self._delta_buckets):
            await self._seal_in_background(idle=True)
        elif ((self._sealing is None or self._sealing.is_set())
              and not self._waiting_for_encoder()):
            if now < self._snapshot_not_before:
                self._next_idle_compaction_at = self._snapshot_not_before
            else:
                await self._snapshot([])

    async def _index_slice(self) -> None:
        """One bounded slice of the dedup index's background work."""
        if not await self._upkeep("dedup index upkeep", self.index.run_slice, self._store):
            self._next_index_slice_at = trio.current_time() + EXPIRY_FULL_RETRY_S
            return
        self.index_slices += 1
        self._next_index_slice_at = trio.current_time() + INDEX_SLICE_GAP_S

    async def _upkeep(self, what: str, function: Callable[..., Any], *args: Any) -> Any:
        """One background store call between group commits; None (logged) when it found
        no room, to be tried again later. Damage or any other failure stops the engine."""
        try:
            with trio.CancelScope(shield=True):
                return await call_store(function, *args)
        except StorageFull as exc:
            log.warning("%s found no room, retrying in %.0f s: %s", what, EXPIRY_FULL_RETRY_S,
                        exc)
            return None
        except DataDirError as exc:  # a damaged entry: stop, saying so (not a write error)
            self._lifecycle.stop(exc)
            raise
        except Exception as exc:
            error = storage_stopped(exc)
            self._lifecycle.stop(error)
            raise error from exc

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
        done = await self._upkeep("dedup index expiry", self._store.expire_ids,
                                  self._expiry_key, cutoff_day, snapshot_lsn,
                                  self.expiry_slice_keys)
        if done is None:
            self._next_slice_at = trio.current_time() + EXPIRY_FULL_RETRY_S
            return
        self.expiry_slices += 1
        self.ids_expired += done.deleted
        self.index.legacy_entries = max(0, self.index.legacy_entries - done.deleted)
        self._next_slice_at = trio.current_time() + self.expiry_gap_s
        self._expiry_key = done.next_key
        if done.next_key is None:
            self._expiry_done = self._expiry_pass

    async def _commit_group(self, group: list[WriteRequest]) -> None:
        if isinstance(group[0], LogCorrection):
            await self._commit_correction(group[0])
            return
        wal: list[tuple[int, bytes]] = []
        meta: list[tuple[bytes, bytes]] = []
        keys: list[bytes] = []
        days: list[int] = []
        # The batches that carry unique ids, with their slices and how many keys each has.
        deduped: list[tuple[LogBatch, list[ShardSlice | None], int]] = []
        lsn = self.last_lsn
        group = self._settle(group)
        for request in group:
            match request:
                case LogBatch(ticket, record, work):
                    lsn += 1
                    ticket.lsn = lsn
                    wal.append((lsn, record))
                    slices = [item.slice if item else None for item in work]
                    batch_ids = batch_keys(slices)
                    if batch_ids:
                        keys.extend(batch_ids)
                        days.extend([ticket.received_ms // ARRIVAL_DAY_MS] * len(batch_ids))
                        deduped.append((request, slices, len(batch_ids)))
                case (LogLimitChange(ticket, record) | LogCustomerChange(ticket, record)
                      | LogExtension(ticket, record)):
                    lsn += 1
                    ticket.lsn = lsn
                    wal.append((lsn, record))
                case DefineMeter(_, _, key, value):
                    meta.append((key, value))
        if self._decided_from is None and wal:
            meta.append((DECIDED_FROM_KEY, LSN.pack(self.last_lsn + 1)))
        readmitted: list[tuple[bytes, int]] = []
        try:
            duplicates, new = self.index.decide(self._store, keys, days) if keys else ([], {})
            readmitted = self._readmit(keys, duplicates, meta) if self.corrections.readmit else []
            decisions: list[tuple[int, bytes]] = []
            flag = 0
            for batch, slices, count in deduped:
                flags = duplicates[flag:flag + count]
                flag += count
                if True in flags:  # (rare: only then the keys' event indices are needed)
                    decisions.append((batch.ticket.lsn, encode_decisions(
                        [event for event, dup in zip(key_events(slices), flags, strict=True)
                         if dup])))
            # A slice of the index's background work rides along, so it costs no fsync
            # of its own under load.
            run_slice = (self.index.prepare(self._store, self.index.carried_budget(len(keys)))
                         if self.index.pending()
                         and trio.current_time() >= self._next_index_slice_at else None)
            await self._commit(wal, meta, decisions, run_slice)
            if run_slice is not None:
                self.index_slices += 1
                self._next_index_slice_at = trio.current_time() + INDEX_SLICE_GAP_S
        except StorageFull as exc:
            self.index.aborted()
            self._give_back(readmitted)
            # Nothing of the group was written: refuse it, keep serving.
            for request in group:
                request.ticket.fail(exc)
            return
        except Exception as exc:
            self.index.aborted()
            error = storage_stopped(exc)
            self._lifecycle.stop(error)
            for request in group:
                request.ticket.fail(error)
            raise error from exc
        self.index.committed()
        if self.index.new_day(new):
            self.index.freeze(self.last_lsn)
        self.last_lsn = lsn
        if self._decided_from is None and wal:
            self._decided_from = wal[0][0]
        self.index.accept(new)
        if len(self.index.memtable) >= MEMTABLE_MAX_KEYS:
            self.index.freeze(lsn)
        flag = 0
        for batch, slices, count in deduped:
            batch.ticket.duplicates = drop_duplicates(slices, duplicates, flag)
            flag += count
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

    def _readmit(self, keys: list[bytes], duplicates: list[bool],
                 meta: list[tuple[bytes, bytes]]) -> list[tuple[bytes, int]]:
        """A unique id a correction cancelled is accepted once more (its first re-send
        after the cancel): its duplicate flag is cleared and the re-admission used up, in
        this commit's catalogue entries."""
        readmit = self.corrections.readmit
        used: list[tuple[bytes, int]] = []
        for position, key in enumerate(keys):
            if duplicates[position] and key in readmit:
                duplicates[position] = False
                correction_lsn = readmit.pop(key)[0]
                used.append((key, correction_lsn))
                meta.append((USED_PREFIX + key, CORRECTION_LSN.pack(correction_lsn)))
        return used

    def _give_back(self, used: list[tuple[bytes, int]]) -> None:
        self.corrections.readmit.update((key, [lsn]) for key, lsn in used)

    async def _commit_correction(self, request: LogCorrection) -> None:
        """Log a correction alone: catch its scan up to the last committed lsn (a worker
        thread; nothing else is in flight), build its record for the next lsn, commit it
        with its catalogue entries, then hand each shard its rebuilt minutes."""
        ticket, pending = request.ticket, request.pending
        lsn = self.last_lsn + 1
        try:
            record, per_shard_changes, meta = await trio.to_thread.run_sync(
                pending.finish, self._store, self.corrections.positions, self.last_lsn,
                self._route)
        except MeteringError as exc:
            ticket.fail(exc)
            return
        ticket.lsn = lsn
        try:
            await self._commit([(lsn, record)], meta)
        except StorageFull as exc:
            ticket.fail(exc)
            return
        except Exception as exc:
            error = storage_stopped(exc)
            self._lifecycle.stop(error)
            ticket.fail(error)
            raise error from exc
        self.last_lsn = lsn
        self.wal_bytes_since_snapshot += len(record)
        self.corrections.positions.merge(pending.bitmaps)
        self.corrections.readmit.update(pending.readmit)
        ticket.accepted = pending.count
        ticket.pending = len(self._mailboxes)
        for shard, changes in enumerate(per_shard_changes):
            await self._mailboxes[shard].send(ApplyGroup([Apply(
                lsn, ApplyCorrection(pending.meter, changes), ticket)]))

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
                      decisions: list[tuple[int, bytes]] | None = None,
                      run_slice: RunSlice | None = None) -> None:
        """One durable transaction: these records, logged dedup decisions and slice of
        dedup index work, plus every alert not yet stored."""
        alerts = self._hub.take_unpersisted()
        if not (wal or meta or alerts or run_slice):
            return
        try:
            await call_store(self._store.commit, wal, meta, alerts, None, decisions, run_slice)
        except MeteringError:
            self._hub.give_back(alerts)
            raise
        self._hub.stored()
        self.group_commits += 1

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

    async def _seal_at_open(self) -> None:
        """Before the first request: every shard behind the hot window seals (in its turn,
        before anything else reaches it), so an engine just opened is sealed as far as
        its clock says whatever its checkpoint held; a live engine and the same log
        replayed then agree on where each shard's history is sealed."""
        target = self._history.seal_before_minute(self._history.clock_ms())
        sealing = []
        for index, sealed in enumerate(self._shard_sealed):
            if sealed < target:
                self._shard_sealed[index] = target
                self._sealed_since_checkpoint = True
                sealing.append(trio.Event())
                await self._mailboxes[index].send(SealDays(sealing[-1], target,
                                                           self.last_lsn, False))
        for done in sealing:
            await done.wait()

    def _sealed_everywhere(self) -> bool:
        """Every shard sealed up to the hot window since the last checkpoint: the next
        one is due now, so that the blocks waiting in memory and where each shard's
        sealed history ends are durable (a crash then does not make the next start
        seal the day again, nor put replayed late events elsewhere than the live
        engine did)."""
        return (self._sealed_since_checkpoint
                and (self._sealing is None or self._sealing.is_set())
                and min(self._shard_sealed)
                >= self._history.seal_before_minute(self._history.clock_ms()))

    def _waiting_for_encoder(self) -> bool:
        """A checkpoint is due: wait for the encoder task to finish the blocks sealed for
        it (``BlockCache.encode_in_background``). No shard seals meanwhile
        (``_seal_in_background``), so that is one shard's sealing at most; after
        ENCODE_WAIT_S (a starved thread) the checkpoint encodes the rest itself."""
        if not self._blocks.encoding_pending():
            self._encoder_wait_since = None
            return False
        now = trio.current_time()
        if self._encoder_wait_since is None:
            self._encoder_wait_since = now
        return now - self._encoder_wait_since < ENCODE_WAIT_S

    def _want_snapshot(self, ticket: SnapshotTicket) -> None:
        """A requested checkpoint: it seals every shard up to the hot window and merges
        every shard's deltas first, a shard at a time between group commits, then
        checkpoints (``_serve_background``); the ticket is answered then. Requests
        arriving meanwhile share that checkpoint, which covers them."""
        if not self._requested:
            self._requested_target = self._history.seal_before_minute(
                self._history.clock_ms())
            self._requested_compact = set(range(len(self._mailboxes)))
            self._compaction_owed.clear()
            self._wal_bytes_since_compaction = 0
        self._requested.append(ticket)

    async def _serve_background(self) -> None:
        """After a group commit (or while idle with a checkpoint requested): the next
        shard's sealing, then the requested checkpoint once its sealing is done."""
        await self._seal_in_background()
        if (self._requested and (self._sealing is None or self._sealing.is_set())
                and not self._requested_compact and not self._waiting_for_encoder()
                and min(self._shard_sealed) >= self._requested_target):
            tickets, self._requested = self._requested, []
            await self._snapshot(tickets)

    async def _seal_in_background(self, idle: bool = False) -> None:
        """After a group commit: if no shard is sealing, have the shard furthest behind
        seal the days that left the hot window (or one that owes a compaction merge its
        deltas), in its own mailbox turn, without waiting for it. One shard's day at a
        time, so an ack waits behind at most one shard's sealing, never a checkpoint's
        worth of them. Its blocks are written by the next checkpoint.

        A shard owes a compaction every COMPACT_EVERY_BYTES of WAL, before a requested
        checkpoint, while its deltas hold COMPACT_DELTA_BUCKETS or more (the fullest such
        shard first), and, with ``idle`` (no write or query for COMPACT_IDLE_S), while they hold
        any."""
        if self._sealing is not None and not self._sealing.is_set():
            return
        if self._waiting_for_encoder():
            # The last shard's blocks wait for the encoder thread: seal no more until
            # they are encoded, so the encoder never falls behind by more than one
            # shard's day and a checkpoint never waits for (or encodes) more.
            return
        self._blocks.encode_now()  # (a thread starved past ENCODE_WAIT_S: done here)
        self._sealing = None
        target = self._history.seal_before_minute(self._history.clock_ms())
        if self._requested:
            target = max(target, self._requested_target)
        behind = min((sealed, index) for index, sealed in enumerate(self._shard_sealed))
        owed = self._compaction_owed | self._requested_compact
        for index, buckets in enumerate(self._delta_buckets):
            if buckets >= COMPACT_DELTA_BUCKETS or (idle and buckets):
                owed.add(index)
        if behind[0] < target:
            index = behind[1]
        elif owed:
            index = max(owed, key=lambda shard: (self._delta_buckets[shard], -shard))
        else:
            return
        compact = index in owed or behind[0] < target
        self._compaction_owed.discard(index)
        self._requested_compact.discard(index)
        self._sealing = trio.Event()
        if self._shard_sealed[index] < target:  # (not for a compaction alone)
            self._sealed_since_checkpoint = True
        self._shard_sealed[index] = max(target, self._shard_sealed[index])
        await self._mailboxes[index].send(SealDays(self._sealing, self._shard_sealed[index],
                                                   self.last_lsn, compact))

    async def _snapshot(self, requesters: list[SnapshotTicket]) -> None:
        """Checkpoint: every shard encodes its head at the current lsn; the parts, the
        blocks sealed since the last one and the trimming of the WAL past the raw-event
        retention are one transaction. ``requesters``: the requests it answers (their
        sealing and compaction were done before, ``_want_snapshot``)."""
        started = trio.current_time()
        self._encoder_wait_since = None
        now_ms = self._history.clock_ms()
        target = max(self._history.seal_before_minute(now_ms), *self._shard_sealed)
        # Sealing a day is most of the work (cutting, encoding and compressing the day's
        # blocks): checkpoints leave it to ``_seal_in_background``, a shard at a time
        # between group commits. Compaction decodes and re-encodes a block per (meter,
        # day) with late events: at most every COMPACT_EVERY_BYTES of WAL (late events
        # waiting longer are merged in fewer rewrites), shard by shard in the
        # background too, and before a requested checkpoint.
        compaction_due = (self._wal_bytes_since_compaction + self.wal_bytes_since_snapshot
                          >= COMPACT_EVERY_BYTES)
        full = self._head_rewrite
        ticket: GatherTicket[ShardCheckpoint] = GatherTicket(len(self._mailboxes))
        for mailbox in self._mailboxes:
            # A shard seals here only if that cuts nothing (its head begins later).
            await mailbox.send(ExportState(ticket, target, self.last_lsn, full, False, False))
        await ticket.done.wait()
        if ticket.error is not None:  # a shard stopped: there is no consistent state to save
            for requester in requesters:
                requester.fail(ticket.error)
            return
        for share in ticket.results:
            self._shard_sealed[share.index] = share.sealed_before_minute
        sealed_since = self._sealed_since_checkpoint
        self._sealed_since_checkpoint = False  # (again True if this one is not written)
        if compaction_due:
            self._compaction_owed = set(range(len(self._mailboxes)))
        self._wal_bytes_since_compaction = (
            0 if compaction_due
            else self._wal_bytes_since_compaction + self.wal_bytes_since_snapshot)
        fault_point("checkpoint.exported")
        shares = sorted(ticket.results, key=lambda share: share.index)
        marks, trim_through = self._history.wal_marks_after(self._wal_marks, self.last_lsn,
                                                            now_ms)
        # The memtable's log is the WAL after the last flushed run: keep it.
        trim_through = min(trim_through, self.index.flushed_lsn)
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
            # Stores pending alerts with the state that made them; with an empty memtable,
            # also that the WAL so far holds no id the runs lack.
            await self._commit([], self.index.flushed_meta(self.last_lsn))
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
            self._sealed_since_checkpoint = sealed_since
            for requester in requesters:
                requester.fail(exc)
            return
        except Exception as exc:
            error = storage_stopped(exc)
            self._lifecycle.stop(error)
            for requester in requesters:
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
        # The memtable so far becomes a run (written in slices between group commits),
        # so a restart rebuilds the memtable from about one checkpoint's WAL tail.
        self.index.freeze(self.last_lsn)
        self.index.expire((now_ms - self._expiry_keep_ms) // ARRIVAL_DAY_MS)
        for requester in requesters:
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
