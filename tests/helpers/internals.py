"""The one place where tests reach into engine internals.

Each function names what a test needs that the public API does not give yet. When
the runtime's internals move, only this module changes. Wanted public hooks:

- ``store_of``: the engine's ``Store`` (its type, the WAL records), with
  ``map_size_of`` (the LMDB map size now) and ``checksums_on`` (whether the store
  writes record checksums, off for a format-1 store); a read-only ``Engine.store``
  property, and ``map_size_bytes`` and ``checksums`` in ``Engine.statistics()``,
  would do.
- ``dimension_sets_of``: how many distinct dimension sets the ingest router has
  memoised; a counter in ``Engine.statistics()`` would do.
- ``recovered_of`` and ``writer_of``: replay and dedup index expiry counters; fields in
  ``Engine.statistics()`` would do.
- ``keep_recent_alerts``: the size of the in-memory alert window that a subscriber
  can catch up from without the store; an ``open_engine(..., recent_alerts=N)``
  argument would do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb

from engine import Engine


def store_of(eng: Engine) -> Any:
    """The ``Store`` the engine writes to."""
    return eng._store


def map_size_of(eng: Engine) -> int:
    """The LMDB map size of the engine's store, in bytes (it grows as the store fills)."""
    return int(store_of(eng).env.info()["map_size"])


def checksums_on(eng: Engine) -> Any:
    """Whether the engine's LMDB store writes and checks record checksums (the store's
    own flag, unconverted, so that ``is False`` still means what it says)."""
    return store_of(eng)._checksums


def dimension_sets_of(eng: Engine) -> int:
    """How many distinct dimension sets the engine's router has memoised."""
    return len(eng._route.dims_keys)  # type: ignore[attr-defined]


def keep_recent_alerts(eng: Engine, count: int) -> None:
    """Shrink (or grow) the window of recent alerts kept in memory for subscribers."""
    eng._hub._recent_limit = count


def recovered_of(eng: Engine) -> Any:
    """What the last open recovered (``engine.runtime.recovery.Recovered``): the replayed
    events accepted and dropped as duplicates, the ids a dedup index built at open took."""
    return eng._recovered  # type: ignore[attr-defined]


def writer_of(eng: Engine) -> Any:
    """The WAL writer: its dedup index expiry knobs (``expiry_slice_keys``,
    ``expiry_gap_s``) and counters (``expiry_slices``, ``ids_expired``)."""
    return eng._writer  # type: ignore[attr-defined]


def format_of(path: Path) -> bytes:
    """The data format marker of the store in data directory ``path`` (read directly
    from LMDB, the engine closed): what a migration wrote."""
    env = lmdb.open(str(path / "lmdb"), readonly=True, lock=False, max_dbs=16)
    try:
        with env.begin() as txn:
            return bytes(txn.get(b"format", db=env.open_db(b"meta", txn=txn, create=False)))
    finally:
        env.close()
