"""The engine's statistics record: trio's ``statistics()`` convention, a frozen record.

Runtime layer: the domain's shard state (read-only). ``Engine.statistics()`` reads
each owner's counters; the reading is not atomic across owners, but every field
is a value its owner really had.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from engine.domain.shard import ShardState, state_statistics


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """A consistent-enough reading of the engine's counters (docs/api.md lists the fields)."""

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
    # Sealed history: event time before this is in blocks (0: nothing sealed yet); the
    # blocks written, and the decoded copies the block cache holds within its budget.
    sealed_before_ms: int = 0
    block_count: int = 0
    block_cache_bytes: int = 0
    block_cache_hits: int = 0
    block_cache_misses: int = 0
    # Blocks sealed but not yet written by a checkpoint (held in memory, pinned), and of
    # them those the encoder thread has not yet encoded (engine.runtime.blocks).
    blocks_unwritten: int = 0
    blocks_unencoded: int = 0
    # Late events' buckets for sealed days waiting in the deltas for compaction (an
    # upper bound; 0 once background compaction has merged them all into blocks).
    delta_buckets: int = 0
    # The dedup index (engine.runtime.idindex): ids remembered (memtable, runs and the
    # legacy tree of older stores), the bytes of the legacy tree's pages (on disk, mapped
    # from the file: not in the Python heap); the ids in memory, the sorted runs on disk
    # and the bytes of their Bloom filters (in memory).
    dedup_index_entries: int = 0
    dedup_index_bytes: int = 0
    dedup_memtable_ids: int = 0
    dedup_runs: int = 0
    dedup_filter_bytes: int = 0
    # Background work of the index not yet done (runs to write, merge or delete): while
    # it is not 0 the engine writes its store even with no request coming.
    dedup_jobs_pending: int = 0
    # The last checkpoint: the bytes it wrote (parts, head chunks, blocks), the head's hour
    # chunks it wrote and deleted (only the hours that changed), and its duration.
    checkpoint_bytes: int = 0
    checkpoint_head_chunks: int = 0
    checkpoint_head_chunks_dropped: int = 0
    checkpoint_ms: float = 0.0


def series_and_buckets(states: Iterable[ShardState]) -> tuple[int, int]:
    """Series and (series, minute) buckets held, summed over shards."""
    series = buckets = 0
    for state in states:
        shard_series, shard_buckets = state_statistics(state)
        series += shard_series
        buckets += shard_buckets
    return series, buckets
