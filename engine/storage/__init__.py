"""Storage layer: the LMDB write-ahead log, snapshots, meter catalogue and dedup index.

May import the standard library, lmdb, msgspec and ``engine.errors``; never trio
(``tests/test_layers.py`` holds the full allow-list). ``LmdbStore`` is the real
store; ``MemoryStore`` is a fake with the same contract for tests that run
under a virtual clock, and for tests that want no disk at all.
"""

from engine.storage.base import Store, StoredBackup, StoredSnapshot
from engine.storage.lmdb_store import LmdbStore
from engine.storage.memory import MemoryStore

__all__ = ["LmdbStore", "MemoryStore", "Store", "StoredBackup", "StoredSnapshot"]
