"""Shard actors: one task per shard, the only code that touches its ``ShardState``.

Runtime layer: trio, the domain, the runtime's messages and acks; never the
store. Rules of this file:

1. An actor awaits nothing but its mailbox: applying, querying and exporting are
   synchronous domain calls, so a shard's state never changes mid-request.
2. Mailboxes are FIFO, so a query sent after an ingest was acknowledged sees it
   (read-your-writes).
3. A failure while applying may leave the shard half-updated: the actor stops the
   engine (fail-stop) and fails every ticket still waiting on it. A failing query
   mutates nothing and fails only its own ticket.
"""

from __future__ import annotations

import logging
from decimal import setcontext

import trio

from engine.domain import records
from engine.domain.aggregates import DistinctCounts
from engine.domain.head import chunk_key, limit_chunk_key
from engine.domain.query import keep_top_groups
from engine.domain.shard import ShardState
from engine.domain.values import EXACT
from engine.errors import EngineClosed, MeteringError
from engine.faults import fault_point
from engine.runtime.acks import AckSequencer
from engine.runtime.blocks import BlockCache
from engine.runtime.lifecycle import Lifecycle
from engine.runtime.messages import (
    Apply,
    ApplyCorrection,
    ApplyGroup,
    ApplySlice,
    DropLimit,
    ExportState,
    FindCustomers,
    FindDimensionKeys,
    InstallLimit,
    LoggedTicket,
    RunQuery,
    SealDays,
    ShardCheckpoint,
    ShardMessage,
    ShardWork,
    Ticket,
)

log = logging.getLogger(__name__)


def apply_work(state: ShardState, index: int, lsn: int, work: ShardWork,
               ticket: LoggedTicket) -> None:
    """Apply one WAL record's share for one shard, collecting its limit crossings.

    Shared by the actors and by recovery's replay, so both make the same decisions.
    """
    match work:
        case ApplySlice(shard_slice):
            accepted, duplicates, crossings = state.apply(lsn, shard_slice, ticket.received_ms)
            ticket.accepted += accepted
            ticket.duplicates += duplicates
        case InstallLimit(limit, received_ms):
            crossings = state.alert_limits.add(limit, received_ms)
        case DropLimit(limit_id):
            state.alert_limits.remove(limit_id)
            crossings = []
        case ApplyCorrection(meter, changes):
            crossings = state.correct(meter, changes, lsn)
    if crossings:
        ticket.crossings.append((index, crossings))
    if state.alert_limits.feed:
        ticket.feed.extend(state.alert_limits.take_feed())


def shard_part(state: ShardState, canonical: bool = True,
               head_chunked: bool = False) -> records.ShardPart:
    """One shard's checkpoint part: its head, its limits' fired thresholds, its deltas,
    where its sealed history begins, and its limits' per-period states. ``canonical``
    (the default) sorts every set, so equal states give equal bytes; checkpoints skip
    that (sorting was most of a checkpoint's time, measured). ``head_chunked``: the
    head is left out, stored in hour chunks instead (``shard_checkpoint``)."""
    limits = state.alert_limits
    return records.ShardPart([] if head_chunked else state.export(canonical), limits.export(),
                             state.sealed_before_minute, state.export_deltas(canonical),
                             state.export_sealed_customers(),
                             limits.export_states(canonical, unique=not head_chunked),
                             head_chunked)


def shard_checkpoint(state: ShardState, index: int, full: bool) -> ShardCheckpoint:
    """This shard's share of a checkpoint (after sealing): its part without the head,
    and the head's hour chunks that changed since the last one (all with ``full``)."""
    head: list[tuple[bytes, bytes]] = []
    drop_head: list[bytes] = []
    for meter, hour, chunk in state.head_checkpoint(full):
        key = chunk_key(index, meter, hour)
        if chunk is None:
            drop_head.append(key)
        else:
            head.append((key, records.encode(chunk)))
    # unique_count limits' states: what changed since the last checkpoint, as chunks
    # stored beside the head's (engine.domain.limits).
    puts, drops = state.alert_limits.unique_chunks(whole=full)
    head.extend((limit_chunk_key(index, limit_id, seq), records.encode(payload))
                for limit_id, seq, payload in puts)
    drop_head.extend(limit_chunk_key(index, limit_id, seq) for limit_id, seq in drops)
    part = records.encode(shard_part(state, canonical=False, head_chunked=True))
    return ShardCheckpoint(index, part, head, drop_head, state.sealed_before_minute)


def customers_with_usage(state: ShardState, ids: list[str] | None) -> set[str]:
    """The customers (of ``ids``, or all) with usage of any meter on this shard."""
    per_meter = [state.customers_of(name)
                 for name in {*state.meters, *state.deltas, *state.sealed_customers}]
    if ids is None:
        return set().union(*per_meter)
    return {cid for cid in ids if any(cid in customers for customers in per_meter)}


class ShardActor:
    def __init__(self, index: int, state: ShardState, acks: AckSequencer,
                 lifecycle: Lifecycle, blocks: BlockCache, shard_count: int,
                 delta_buckets: list[int], distinct_counts: DistinctCounts) -> None:
        self.index = index
        # The engine's unique_count counts, shared with its finishing step (the same
        # thread): a shard ranking its groups for ``take`` counts them through it.
        self._distinct_counts = distinct_counts
        # Shared with the WAL writer: this shard's entry is ``state.delta_buckets`` after
        # each of its turns that can change it (the writer schedules compaction by it).
        self._delta_buckets = delta_buckets
        self.state = state
        self._acks = acks
        self._lifecycle = lifecycle
        self._blocks = blocks
        self._shard_count = shard_count

    async def run(self, mailbox: trio.MemoryReceiveChannel[ShardMessage]) -> None:
        setcontext(EXACT)  # this task's own context: exact decimal sums
        async with mailbox:
            async for message in mailbox:
                match message:
                    case ApplyGroup(items):
                        self._apply_group(items, mailbox)
                        self._delta_buckets[self.index] = self.state.delta_buckets
                    case RunQuery(plan, ticket):
                        try:
                            result = self.state.query(plan)
                            if plan.shard_take:
                                result = keep_top_groups(plan, result, self._distinct_counts)
                        except Exception as exc:  # queries never mutate state: not fatal
                            if not isinstance(exc, MeteringError):
                                log.exception("query failed on shard %d", self.index)
                            ticket.fail(exc)
                            result = {}
                        ticket.add(result)
                    case ExportState(ticket, seal_before_minute, lsn, full, seal, compact):
                        try:
                            if not seal:  # only if that cuts nothing
                                first = self.state.head_from_minute()
                                if first is not None and first < seal_before_minute:
                                    seal_before_minute = self.state.sealed_before_minute
                            self._seal(seal_before_minute, lsn, compact)
                        except BaseException as exc:
                            # Sealing moves buckets: a failure may leave them half moved.
                            self._lifecycle.stop(exc)
                            ticket.fail(EngineClosed(f"shard {self.index} failed: {exc!r}"))
                            raise
                        self._delta_buckets[self.index] = self.state.delta_buckets
                        ticket.add(shard_checkpoint(self.state, self.index, full))
                    case SealDays(done, seal_before_minute, lsn, compact):
                        try:
                            self._seal(seal_before_minute, lsn, compact)
                        except BaseException as exc:
                            self._lifecycle.stop(exc)  # buckets may be half moved
                            raise
                        finally:
                            self._delta_buckets[self.index] = self.state.delta_buckets
                            done.set()
                    case FindCustomers(ids, ticket):
                        ticket.add(customers_with_usage(self.state, ids))
                    case FindDimensionKeys(meter, start_ms, end_ms, customers, ticket):
                        try:
                            keys = self.state.dimension_keys(meter, start_ms, end_ms,
                                                             customers)
                        except Exception as exc:  # a read, like a query: not fatal
                            log.exception("dimension keys failed on shard %d", self.index)
                            ticket.fail(exc)
                            keys = set()
                        ticket.add(keys)

    def _seal(self, seal_before_minute: int, lsn: int, compact: bool) -> None:
        """Seal and compact, and make the new blocks readable before anything else runs
        (encoded later, off this turn: ``BlockCache.encode_in_background``)."""
        built = self.state.seal(seal_before_minute, lsn, self._shard_count, self.index,
                                compact, encode=False)
        for meter, day, block, raw in built:
            self._blocks.add(meter, day, self.index, block, raw, self._shard_count, lsn)
        if built:  # (a seal that cut nothing, as at every open, is not a point to stop at)
            fault_point("seal.cut")

    def _apply_group(self, items: list[Apply],
                     mailbox: trio.MemoryReceiveChannel[ShardMessage]) -> None:
        """One message per group commit: every record of the group, in lsn order."""
        for lsn, work, ticket in items:
            try:
                apply_work(self.state, self.index, lsn, work, ticket)
            except BaseException as exc:
                self._lifecycle.stop(exc)
                closed = EngineClosed(f"shard {self.index} failed: {exc!r}")
                # Every ticket of this group (finished ones ignore it) and of the queue.
                waiting: list[Ticket] = [item.ticket for item in items]
                waiting.extend(_drain(mailbox))
                for stuck in waiting:
                    stuck.fail(closed)
                raise
            ticket.pending -= 1
            if ticket.pending == 0:
                self._acks.finish(ticket)


def _drain(mailbox: trio.MemoryReceiveChannel[ShardMessage]) -> list[Ticket]:
    """The tickets of every message still queued for a shard that stopped."""
    tickets: list[Ticket] = []
    while True:
        try:
            message = mailbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return tickets
        match message:
            case ApplyGroup(items):
                tickets.extend(item.ticket for item in items)
            case RunQuery(_, ticket) | ExportState(ticket) | FindCustomers(_, ticket):
                tickets.append(ticket)
            case FindDimensionKeys(ticket=ticket):
                tickets.append(ticket)
