"""Dedup decisions against the on-disk unique-id index: live (the WAL writer) and replay.

Runtime layer: the standard library and the domain only; never trio, never the store
(the writer and recovery pass the store's answers in). One module for both sides, so
the live decision and the one replay recomputes cannot drift apart.

The index holds one entry per (meter, customer, unique id) remembered: key ``id_key``,
value the lsn of the first batch that carried it and that batch's arrival day
(``engine.storage.base.ID_VALUE``). The decisions:

- live (``WalWriter._commit_group``): the keys of a group's batches, in lsn order and
  within a batch in the order ``batch_keys`` walks them, are put without overwriting
  in the group's own commit transaction; a put that finds its key is a duplicate.
  Equal keys of one batch all sit in one ``Columns`` (one meter, one customer, so one
  shard), in event order: the first occurrence wins, as it did in memory.
- replay (``replay_duplicates``): the index already holds the tail's entries, so an
  event is a duplicate iff its key's stored lsn is below its batch's lsn, or the key
  came earlier in the same batch. Expiry never deletes an entry the WAL tail needs
  (only entries at or below the snapshot's lsn), so a tail key that is missing, or
  stored with a later lsn, is damage.
- migration (``first_occurrences``): a store from before the index had the ids in its
  snapshot's ``seen`` lists and decided the tail by them; replaying that decision
  gives the entries the index would hold.

``drop_duplicates`` then removes the duplicates from the shards' ``Columns``; the shard
actors apply only accepted events.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import msgspec

from engine.domain.batch import Columns, ShardSlice
from engine.domain.records import EventIds, MeterPart, WalBatch

# LMDB's default maximum key size.
MAX_KEY_BYTES = 511
DIGEST_BYTES = 16
# A long (or NUL-carrying) key keeps this many bytes of its natural form (locality),
# then 0xFF, then the digest.
HASHED_PREFIX_BYTES = MAX_KEY_BYTES - 1 - DIGEST_BYTES


def id_key(meter: str, customer: str, unique_id: str) -> bytes:
    """The index key of one remembered id: ``meter NUL customer NUL unique_id`` in UTF-8.

    Natural order keeps one customer's ids together. A key longer than LMDB allows, or
    one with a NUL in a part (which would make the split ambiguous), is replaced by
    its first ``HASHED_PREFIX_BYTES`` bytes, a 0xFF byte and the 16-byte blake2b
    digest of an unambiguous encoding (the parts' lengths first). Collisions: 0xFF never
    occurs in UTF-8, so a hashed key never equals a natural one; two hashed keys are
    equal only if their digests are, a chance of about n**2 / 2**129 for n such keys
    (below 1e-14 for a trillion of them).
    """
    key = f"{meter}\0{customer}\0{unique_id}".encode()
    if len(key) <= MAX_KEY_BYTES and key.count(0) == 2:
        return key
    return _hashed_key(meter, customer, unique_id, key)


def _hashed_key(meter: str, customer: str, unique_id: str, natural: bytes) -> bytes:
    exact = f"{len(meter)}\0{len(customer)}\0{meter}\0{customer}\0{unique_id}".encode()
    digest = hashlib.blake2b(exact, digest_size=DIGEST_BYTES).digest()
    return natural[:HASHED_PREFIX_BYTES] + b"\xff" + digest


def _columns_with_ids(slices: Iterable[ShardSlice | None]) -> Iterator[tuple[str, Columns]]:
    for shard_slice in slices:
        if shard_slice:
            for meter, columns in shard_slice:
                if columns.unique_ids.count(None) != len(columns):
                    yield meter.name, columns


def batch_keys(slices: Iterable[ShardSlice | None]) -> list[bytes]:
    """The index keys of a batch's events that carry a unique id, in the order
    ``drop_duplicates`` expects their flags."""
    keys: list[bytes] = []
    for meter, columns in _columns_with_ids(slices):
        prefix = meter + "\0"
        # id_key inlined for the common short key (a call per event costs ~0.1 µs), its
        # two checks made for the whole column at once, in C; a column that fails them
        # (rare) is built key by key.
        natural = [f"{prefix}{customer}\0{unique_id}".encode()
                   for customer, unique_id in zip(columns.customers, columns.unique_ids,
                                                  strict=True)
                   if unique_id is not None]
        if (max(map(len, natural)) > MAX_KEY_BYTES
                or b"".join(natural).count(0) != 2 * len(natural)):
            natural = [id_key(meter, customer, unique_id)
                       for customer, unique_id in zip(columns.customers, columns.unique_ids,
                                                      strict=True)
                       if unique_id is not None]
        keys.extend(natural)
    return keys


def logged_keys(events: list[EventIds]) -> list[bytes]:
    """The index keys of a logged batch's events that carry a unique id (``batch_keys``
    for a record read with ``decode_batch_ids``: what a restart puts in the memtable)."""
    natural = [f"{e.meter_api_name}\0{e.customer_id}\0{e.unique_id}".encode()
               for e in events if e.unique_id is not None]
    if natural and (max(map(len, natural)) > MAX_KEY_BYTES
                    or b"".join(natural).count(0) != 2 * len(natural)):
        return [id_key(e.meter_api_name, e.customer_id, e.unique_id)
                for e in events if e.unique_id is not None]
    return natural


def key_events(slices: Iterable[ShardSlice | None]) -> list[int]:
    """The batch's event index of each key of ``batch_keys``, same order: the logged
    decisions name events by it, which does not depend on the shard count."""
    events: list[int] = []
    for _, columns in _columns_with_ids(slices):
        events.extend(index for index, unique_id in zip(columns.indices, columns.unique_ids,
                                                        strict=True)
                      if unique_id is not None)
    return events


def encode_decisions(duplicate_events: list[int]) -> bytes:
    """A batch's logged dedup decisions: the indices of its events that were duplicates."""
    return msgspec.msgpack.encode(duplicate_events)


def decode_decisions(raw: bytes | None) -> set[int]:
    """The event indices a batch's logged decisions name as duplicates (None: none)."""
    return set(msgspec.msgpack.decode(raw, type=list[int])) if raw else set()


def logged_duplicates(raw: bytes | None, events: list[int]) -> list[bool]:
    """The duplicate flag of each key (``events``: ``key_events``) from logged decisions."""
    duplicate = decode_decisions(raw)
    return [event in duplicate for event in events]


def drop_duplicates(slices: Iterable[ShardSlice | None], duplicates: list[bool],
                    start: int = 0) -> int:
    """Remove the events flagged in ``duplicates[start:]`` (one flag per key of
    ``batch_keys``, same order) from their ``Columns``; return how many were removed.

    Lists are rebuilt only for the columns that hold a duplicate (rare).
    """
    flag = start
    dropped = 0
    for _, columns in _columns_with_ids(slices):
        unique_ids = columns.unique_ids
        carrying = len(unique_ids) - unique_ids.count(None)
        flags = duplicates[flag:flag + carrying]
        flag += carrying
        if True not in flags:
            continue
        keep: list[int] = []
        flag_at = 0
        for position, unique_id in enumerate(unique_ids):
            if unique_id is not None:
                flag_at += 1
                if flags[flag_at - 1]:
                    continue
            keep.append(position)
        dropped += len(unique_ids) - len(keep)
        columns.customers = [columns.customers[p] for p in keep]
        columns.dims_keys = [columns.dims_keys[p] for p in keep]
        columns.times = [columns.times[p] for p in keep]
        columns.values = [columns.values[p] for p in keep]
        columns.unique_ids = [unique_ids[p] for p in keep]
        columns.indices = [columns.indices[p] for p in keep]
        if columns.unique_values:
            columns.unique_values = [columns.unique_values[p] for p in keep]
    return dropped


class IndexDamaged(Exception):
    """The index contradicts the WAL tail being replayed (recovery reports it as damage)."""


def replay_duplicates(keys: list[bytes], stored_lsns: list[int | None], lsn: int) -> list[bool]:
    """The live decision, recomputed for batch ``lsn`` from the index as stored."""
    flags: list[bool] = []
    earlier: set[bytes] = set()
    for key, stored in zip(keys, stored_lsns, strict=True):
        if stored is None or stored > lsn:
            raise IndexDamaged(
                f"the dedup index {'lacks' if stored is None else 'has a later lsn for'} "
                f"{key[:60]!r}, which batch {lsn} carried")
        duplicate = stored < lsn or key in earlier
        earlier.add(key)
        flags.append(duplicate)
    return flags


def remembered_keys(parts: Iterable[MeterPart]) -> Iterator[bytes]:
    """The keys of the ids a snapshot from before the index remembered (``MeterPart.seen``)."""
    for part in parts:
        for customer, unique_id in part.seen:
            yield id_key(part.meter, customer, unique_id)


def first_occurrences(batch: WalBatch, known: set[bytes]) -> list[bytes]:
    """The keys ``batch`` was the first to carry, as a store from before the index decided
    them (an id was a duplicate iff it was in ``known``); adds them to ``known``."""
    new: list[bytes] = []
    for event in batch.events:
        if event.unique_id is not None:
            key = id_key(event.meter_api_name, event.customer_id, event.unique_id)
            if key not in known:
                known.add(key)
                new.append(key)
    return new
