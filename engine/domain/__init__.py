"""The pure domain: meters, batches, buckets, queries, limits and shard state.

Pure, sync and deterministic: no trio, lmdb or socket, no clock (time is an
argument), only the standard library, msgspec, ``engine.schema`` and
``engine.errors``. The modules import each other without a cycle
(``tests/test_layers.py`` checks both), leaves first:

- ``values``, ``windows``: exact numbers and their 64-bit bounds; calendar windows.
- ``aggregates``: aggregation kinds and partial arithmetic.
- ``meters``: meter definitions and ``IngestRules``.
- ``records``: every stored shape (WAL, snapshot, alerts) and its encoding.
- ``batch``: validation and routing of a batch (a hot loop).
- ``series``: one series' bucket columns; one meter's series in a shard.
- ``query``: query plans, cross-shard merge, finalisation.
- ``limits``: alert limits as a shard evaluates them.
- ``shard``: a shard's state, its apply loops and query pass (hot loops).
"""
