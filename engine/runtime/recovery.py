"""Recovery: rebuild the engine's state from the store before any task runs.

Runtime layer: the storage layer, the domain, the catalog, the alert hub, the block
cache and the shard apply function; synchronous (it runs before the engine's tasks start, so
it owns everything it touches while it runs). Order: meter definitions, then the
latest snapshot (shard states, limits, fired thresholds, next alert seq), then
the WAL tail replayed in lsn order through the same ``apply_work`` the shard
actors use, so replay makes exactly the decisions the live engine made. Dedup
decisions are read as the writer logged them (batches from ``ids_decided_from`` on),
or, for batches logged before that, recomputed from the legacy dedup tree
(``engine.runtime.dedup``); a store from before the index gets the tree first
(``_build_id_index``), in one write transaction, from its snapshot's remembered ids
and its WAL tail. The dedup index's memtable is rebuilt from the WAL after its last
flushed run (``engine.runtime.idindex``), which may begin before the snapshot.

Anything unreadable stops the start with ``DataDirError``: the engine never
starts over a state it cannot trust.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import localcontext
from typing import Any

import msgspec

from engine.domain import records
from engine.domain.batch import ShardRouter, prepare_batch
from engine.domain.blocks import (
    block_key,
    decode_block,
    encode_block,
    merge_buckets,
    parse_block_key,
)
from engine.domain.head import LIMIT_CHUNK_BIT, parse_chunk_key
from engine.domain.limits import LimitError, check_limit
from engine.domain.meters import IngestRules, check_meter
from engine.domain.series import MeterShard
from engine.domain.shard import ShardState, restore_shards
from engine.domain.values import EXACT
from engine.errors import DataDirError, InvalidRequest
from engine.runtime.acks import number_alerts
from engine.runtime.alerts import AlertHub
from engine.runtime.blocks import BlockCache
from engine.runtime.catalog import Catalog
from engine.runtime.dedup import (
    IndexDamaged,
    batch_keys,
    drop_duplicates,
    first_occurrences,
    key_events,
    logged_duplicates,
    logged_keys,
    remembered_keys,
    replay_duplicates,
)
from engine.runtime.extensions import acknowledge
from engine.runtime.idindex import (
    BLOOM_PREFIX,
    DECIDED_FROM_KEY,
    FLUSHED_LSN_KEY,
    LSN,
    MAX_RUN_KEY_BYTES,
    RUN_META_PREFIX,
    IdIndex,
    load_index,
    run_key,
)
from engine.runtime.messages import (
    ApplyCorrection,
    ApplySlice,
    DropLimit,
    InstallLimit,
    LoggedTicket,
    ShardWork,
)
from engine.runtime.shards import apply_work, shard_part
from engine.storage import Store, StoredSnapshot
from engine.storage.base import ARRIVAL_DAY_MS, ID_VALUE

log = logging.getLogger(__name__)

DAMAGED = ("the data directory is damaged or was written by a buggy version: restore it from "
           "a backup; the engine will not start over it")


@dataclass(frozen=True, slots=True)
class Recovered:
    states: list[ShardState]
    last_lsn: int
    wal_bytes_since_snapshot: int
    recovery_ms: int
    # What was replayed from the WAL after the snapshot: 0 after a clean close.
    wal_records: int
    wal_bytes: int
    wal_marks: list[list[int]]
    index: IdIndex = field(default_factory=lambda: IdIndex([], [], 0, 0, 0))  # memtable rebuilt
    decided_from: int | None = None  # the first lsn with logged dedup decisions
    snapshot_lsn: int = 0  # the lsn the loaded snapshot covers (0: none)
    migrated_ids: int = -1  # entries put into a dedup index built at this start (-1: none)
    # The replayed batches' events: accepted, and dropped as duplicates.
    replayed_accepted: int = 0
    replayed_duplicates: int = 0


@contextmanager
def damaged_if(what: str, *errors: type[Exception]) -> Iterator[None]:
    """Translate ``errors`` raised in the body into a ``DataDirError`` about ``what``.

    Not ``errors.map_exceptions``: replay must also turn our own ``InvalidRequest``
    (a logged batch that no longer validates) into damage, where ``map_exceptions``
    lets every ``MeteringError`` through.
    """
    try:
        yield
    except errors as exc:
        raise DataDirError(f"{what}: {exc}; {DAMAGED}") from None


def recover(store: Store, shard_count: int, rules: IngestRules, route: ShardRouter,
            catalog: Catalog, hub: AlertHub, now_ms: int = 0,
            blocks: BlockCache | None = None) -> Recovered:
    """Fill ``catalog`` and ``hub`` from the store and return the rebuilt shard states.

    ``now_ms`` (the engine clock) dates the ids a dedup index built now takes over.
    ``blocks``: the engine's block cache, whose index is loaded (after any resharding)
    and through which the shards read their sealed history during the replay, as they
    do live (a correction reaching a sealed day rewrites its block; limits read sealed
    usage); the blocks the replay makes stay pinned for the first checkpoint.
    """
    started = time.perf_counter()
    for key, raw in store.meta_items(b"meter:"):
        with damaged_if(f"stored meter {key!r} is unreadable", msgspec.DecodeError, ValueError):
            catalog.put_meter(check_meter(records.decode_meter(raw), rules))
    snapshot = store.load_snapshot()
    migrated_ids = -1
    if store.needs_id_index():
        migrated_ids = _build_id_index(store, snapshot, now_ms)
    next_alert_seq = 0
    wal_marks: list[list[int]] = []
    wal_records = wal_bytes = wal_bytes_since_snapshot = 0
    replayed = [0, 0]  # accepted, duplicates
    with localcontext(EXACT):
        if snapshot is None:
            states = [ShardState(rules.late_ms) for _ in range(shard_count)]
            applied = 0
        else:
            with damaged_if(f"snapshot at lsn {snapshot.lsn} is corrupt",
                            msgspec.DecodeError, KeyError, ValueError, LimitError):
                states, next_alert_seq, wal_marks = _restore_snapshot(snapshot, catalog, route,
                                                                      rules.late_ms)
            applied = snapshot.lsn
            if snapshot.shard_count != shard_count:
                with damaged_if("a sealed block is unreadable", msgspec.DecodeError, KeyError,
                                ValueError, zlib.error):
                    _reshard_blocks(store, snapshot, states, catalog, route)
        if blocks is not None:
            blocks.load_index()
            for part, state in enumerate(states):
                state.blocks = blocks.reader(part, shard_count)
        with damaged_if("a stored alert is unreadable", msgspec.DecodeError, ValueError):
            hub.restore(next_alert_seq)
        with damaged_if("the dedup index is unreadable", msgspec.DecodeError, KeyError,
                        ValueError):
            index, decided_from = _load_index(store)
        # The memtable holds the ids of batches after the last flushed run (logged
        # decisions only: the ones before are in the legacy tree).
        rebuild_after = (None if decided_from is None
                         else max(index.flushed_lsn, decided_from - 1))
        start = applied if rebuild_after is None else min(applied, rebuild_after)
        expected = start + 1
        for lsn, raw in store.read_wal(start):
            if lsn != expected:
                raise DataDirError(
                    f"write-ahead log has a gap: expected lsn {expected}, found {lsn}; {DAMAGED}"
                )
            expected += 1
            if lsn <= applied:
                _remember_ids(lsn, raw, index)
                continue
            _replay(lsn, raw, states, rules, route, catalog, hub, store, replayed, decided_from,
                    index if rebuild_after is not None and lsn > rebuild_after else None)
            applied = lsn
            wal_records += 1
            wal_bytes += len(raw)
            wal_bytes_since_snapshot += len(raw)
    last_lsn = max(applied, store.last_lsn())
    route.replay_dims_keys.clear()  # replay is over: its memo is not needed again
    recovery_ms = int((time.perf_counter() - started) * 1000)
    log.info("recovered to lsn %d in %d ms (replayed %d WAL records, %d bytes)",
             last_lsn, recovery_ms, wal_records, wal_bytes)
    return Recovered(states, last_lsn, wal_bytes_since_snapshot, recovery_ms, wal_records,
                     wal_bytes, wal_marks, index, decided_from,
                     0 if snapshot is None else snapshot.lsn, migrated_ids, *replayed)


def _load_index(store: Store) -> tuple[IdIndex, int | None]:
    meta = dict(store.meta_items(RUN_META_PREFIX))
    meta.update(store.meta_items(BLOOM_PREFIX))
    meta.update(store.meta_items(FLUSHED_LSN_KEY))
    decided = dict(store.meta_items(DECIDED_FROM_KEY)).get(DECIDED_FROM_KEY)
    index = load_index(meta, store.run_numbers(), store.id_index_statistics()[0])
    return index, None if decided is None else LSN.unpack(decided)[0]


def _remember_ids(lsn: int, raw: bytes, index: IdIndex) -> None:
    """Put the ids of batch ``lsn`` (covered by the snapshot, after the last flushed run)
    into the memtable. Its duplicates' ids are in the index already: putting them too
    changes nothing. Only the ids are decoded: a restart may read a few hundred
    thousand of them."""
    with damaged_if(f"write-ahead log record {lsn} is corrupt", msgspec.DecodeError):
        batch = records.decode_batch_ids(raw)
    if batch is not None:
        keys = logged_keys(batch.events)
        if keys and max(map(len, keys)) > MAX_RUN_KEY_BYTES:
            keys = [run_key(key) for key in keys]
        index.accept(dict.fromkeys(keys, batch.received_ms // ARRIVAL_DAY_MS))


def _build_id_index(store: Store, snapshot: StoredSnapshot | None, now_ms: int) -> int:
    """Give a store from before the dedup index (format 1 or 2) its index, in one write
    transaction (so a crash leaves the store as it was, and the next start does it
    again): the ids its snapshot remembered (``MeterPart.seen``, lsn 0, arrival day
    today) and the first occurrences in its WAL tail, decided as the old engine did.
    Returns the number of entries."""
    started = time.perf_counter()
    known: set[bytes] = set()
    if snapshot is not None:
        with damaged_if(f"snapshot at lsn {snapshot.lsn} is corrupt", msgspec.DecodeError,
                        ValueError):
            for raw in snapshot.parts:
                known.update(remembered_keys(records.decode_part(raw).meters))
    today = ID_VALUE.pack(0, now_ms // ARRIVAL_DAY_MS)
    entries = [(key, today) for key in known]
    for lsn, raw in store.read_wal(0 if snapshot is None else snapshot.lsn):
        with damaged_if(f"write-ahead log record {lsn} is corrupt", msgspec.DecodeError):
            record = records.decode_record(raw)
        if isinstance(record, records.WalBatch):
            value = ID_VALUE.pack(lsn, record.received_ms // ARRIVAL_DAY_MS)
            entries.extend((key, value) for key in first_occurrences(record, known))
    entries.sort()  # in key order: LMDB fills its pages in sequence
    store.build_id_index(entries)
    log.info("built the dedup index (%d ids) in %.0f ms", len(entries),
             (time.perf_counter() - started) * 1000)
    return len(entries)


def _restore_snapshot(snapshot: StoredSnapshot, catalog: Catalog, route: ShardRouter,
                      late_ms: int) -> tuple[list[ShardState], int, list[list[int]]]:
    parts = [records.decode_part(raw) for raw in snapshot.parts]
    chunks = []
    limit_chunks = []
    for key, raw in snapshot.head:
        part, meter, hour = parse_chunk_key(key)
        if part & LIMIT_CHUNK_BIT:  # a unique_count limit's states (meter: limit id)
            if part & ~LIMIT_CHUNK_BIT < len(parts):
                limit_chunks.append((part & ~LIMIT_CHUNK_BIT, meter, hour,
                                     records.decode_limit_chunk(raw)))
        elif part < len(parts):  # (a checkpoint with fewer parts dropped all chunks)
            chunks.append((part, meter, hour, records.decode_meter_part(raw)))
    states = restore_shards(parts, catalog.meter_defs, route, late_ms, chunks)
    engine_state = (records.decode_engine_state(snapshot.engine_state)
                    if snapshot.engine_state else records.EngineState())
    for limit in engine_state.limits:
        catalog.put_limit(check_limit(limit, catalog.meter_defs))
    for customer in engine_state.customers:
        catalog.put_customer(customer)
    for customer_id in engine_state.hidden_customers:
        catalog.hide_customer(customer_id)
    fired = [entry for part in parts for entry in part.fired]
    limit_states = [entry for part in parts for entry in part.limit_states]
    limit_defs = list(catalog.limit_defs.values())
    if catalog.extension is not None:
        catalog.extension.restore(engine_state.extension)
        limit_defs += catalog.extension.feed_defs(catalog.meter_defs)
    for index, state in enumerate(states):
        state.alert_limits.load(limit_defs, fired, route, index, limit_states)
        state.alert_limits.load_unique_chunks(limit_chunks, route, index)
    return states, engine_state.next_alert_seq, engine_state.wal_marks


def _reshard_blocks(store: Store, snapshot: StoredSnapshot, states: list[ShardState],
                    catalog: Catalog, route: ShardRouter) -> None:
    """Opened with another shard count: move every sealed series to its new shard's
    block, and write the rerouted checkpoint with them in one transaction (so a crash
    leaves the old layout or the new one). Reads all sealed history once."""
    keys = store.block_keys()
    if not keys:
        return
    by_day: dict[tuple[str, int], list[bytes]] = {}
    for key in keys:
        meter, day, _ = parse_block_key(key)
        by_day.setdefault((meter, day), []).append(key)
    new_blocks: list[tuple[bytes, bytes]] = []
    for (meter, day), day_keys in sorted(by_day.items()):
        meter_def = catalog.meter_defs[meter]
        per_part: dict[int, MeterShard] = {}
        for key in day_keys:
            raw = store.read_block(key)
            if raw is None:
                continue
            for (customer, dims_key), series in decode_block(meter_def, raw)[1].series.items():
                target = per_part.get(route(customer))
                if target is None:
                    target = per_part[route(customer)] = MeterShard(meter_def)
                merge_buckets(target, dims_key, series)
        for part, block in sorted(per_part.items()):
            new_blocks.append((block_key(meter, day, part),
                               encode_block(block, day, route.shard_count, part, snapshot.lsn)))
    parts = [records.encode(shard_part(state)) for state in states]
    written = {key for key, _ in new_blocks}
    store.write_snapshot(
        StoredSnapshot(snapshot.lsn, route.shard_count, parts, snapshot.engine_state),
        new_blocks, 0, [key for key in keys if key not in written], reset_head=True)
    log.info("resharded sealed history from %d to %d shards (%d blocks)",
             snapshot.shard_count, route.shard_count, len(new_blocks))


def _replay(lsn: int, raw: bytes, states: list[ShardState], rules: IngestRules,
            route: ShardRouter, catalog: Catalog, hub: AlertHub, store: Store,
            replayed: list[int], decided_from: int | None, id_index: IdIndex | None) -> None:
    with damaged_if(f"write-ahead log record {lsn} is corrupt", msgspec.DecodeError):
        record = records.decode_record(raw)
    ticket = LoggedTicket(record.received_ms)
    ticket.lsn = lsn
    action = catalog.extension.decode(record) if catalog.extension is not None else None
    if action is not None:
        _replay_extension(catalog, action, states, ticket, hub)
        return
    with damaged_if(f"write-ahead log record {lsn} cannot be replayed",
                    InvalidRequest, LimitError):
        work = _work_for(record, len(states), rules, route, catalog)
    slices = [item.slice if isinstance(item, ApplySlice) else None for item in work]
    keys = batch_keys(slices)
    if keys:
        if decided_from is not None and lsn >= decided_from:
            with damaged_if(f"the dedup decisions of batch {lsn} are unreadable",
                            msgspec.DecodeError, ValueError):
                logged = store.read_decisions(lsn)
                # Most batches have no duplicate: no decisions, nothing to map or drop.
                duplicates = (logged_duplicates(logged, key_events(slices)) if logged
                              else [False] * len(keys))
            if id_index is not None:
                day = record.received_ms // ARRIVAL_DAY_MS
                id_index.accept({run_key(key): day
                              for key, dup in zip(keys, duplicates, strict=True) if not dup})
        else:
            with damaged_if(f"write-ahead log record {lsn} cannot be replayed", IndexDamaged):
                duplicates = replay_duplicates(keys, store.read_ids(keys), lsn)
        ticket.duplicates = drop_duplicates(slices, duplicates)
    try:
        for index, (state, item) in enumerate(zip(states, work, strict=True)):
            if item is not None:
                apply_work(state, index, lsn, item, ticket)
    except Exception as exc:
        raise DataDirError(
            f"write-ahead log record {lsn} could not be applied: {exc!r}; {DAMAGED}"
        ) from exc
    acknowledge(catalog.extension, ticket)
    hub.append(number_alerts(ticket.crossings, hub.next_seq, ticket.received_ms))
    replayed[0] += ticket.accepted
    replayed[1] += ticket.duplicates


def _replay_extension(catalog: Catalog, action: Any, states: list[ShardState],
                      ticket: LoggedTicket, hub: AlertHub) -> None:
    """An extension's record: as the writer and the ack sequencer handle it live."""
    extension = catalog.extension
    assert extension is not None
    for work in extension.commit(action, ticket.received_ms, catalog.meter_defs):
        for index, state in enumerate(states):
            apply_work(state, index, ticket.lsn, work, ticket)
    ticket.extension.append(action)
    acknowledge(extension, ticket)
    hub.append(number_alerts(ticket.crossings, hub.next_seq, ticket.received_ms))


def _work_for(record: records.WalRecord, shard_count: int, rules: IngestRules,
              route: ShardRouter, catalog: Catalog) -> list[ShardWork | None]:
    """What each shard applies for a WAL record (limit records also update the catalog)."""
    if isinstance(record, records.WalBatch):
        slices = prepare_batch(record.events, catalog.meter_defs, route, rules, None)
        return [ApplySlice(s) if s else None for s in slices]
    if isinstance(record, records.WalCorrection):
        meter = catalog.meter_defs[record.meter]
        per_shard: list[list[records.CorrectedMinutes]] = [[] for _ in range(shard_count)]
        for minutes in record.minutes:
            per_shard[route(minutes.customer_id)].append(minutes)
        return [ApplyCorrection(meter, changes) for changes in per_shard]
    if isinstance(record, records.WalPutCustomer):
        catalog.put_customer(record.customer)
        return [None] * shard_count
    if isinstance(record, records.WalHideCustomer):
        catalog.hide_customer(record.customer_id)
        return [None] * shard_count
    if isinstance(record, records.WalExtension) or (
            isinstance(record, records.WalLimit) and record.limit.measure != "usage"):
        return [None] * shard_count  # an extension's record, opened without the extension
    change: ShardWork
    if isinstance(record, records.WalLimit):
        limit = check_limit(record.limit, catalog.meter_defs)
        catalog.put_limit(limit)
        change = InstallLimit(limit, record.received_ms)
    else:
        catalog.drop_limit(record.limit_id)
        change = DropLimit(record.limit_id)
    return [change] * shard_count
