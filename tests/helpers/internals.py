"""The one place where tests reach into engine internals.

Each function names what a test needs that the public API does not give yet. When
the runtime's internals move, only this module changes. Wanted public hooks:

- ``store_of``: the engine's ``Store`` (the LMDB map size, the WAL records, whether
  checksums are on); a read-only ``Engine.store`` property would do.
- ``dimension_sets_of``: how many distinct dimension sets the ingest router has
  memoised; a counter in ``Engine.statistics()`` would do.
- ``keep_recent_alerts``: the size of the in-memory alert window that a subscriber
  can catch up from without the store; an ``open_engine(..., recent_alerts=N)``
  argument would do.
"""

from __future__ import annotations

from typing import Any

from engine import Engine


def store_of(eng: Engine) -> Any:
    """The ``Store`` the engine writes to."""
    return eng._store


def dimension_sets_of(eng: Engine) -> int:
    """How many distinct dimension sets the engine's router has memoised."""
    return len(eng._route.dims_keys)  # type: ignore[attr-defined]


def keep_recent_alerts(eng: Engine, count: int) -> None:
    """Shrink (or grow) the window of recent alerts kept in memory for subscribers."""
    eng._hub._recent_limit = count
