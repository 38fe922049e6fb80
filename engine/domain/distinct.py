"""A unique_count limit's distinct values, kept as 64-bit hashes: 8 bytes a value.

Domain layer: the standard library, numpy (merging and bulk lookups of the sorted hash
arrays) and xxhash (the hash).

Why: a month or ``total`` limit on a unique_count meter holds every distinct value of
its period per customer, and that grows with the period. As a Python set of strs it
cost about 80 bytes a value, the largest part of the engine's memory growth with
limits on (``docs/benchmarks.md``). A limit needs only to know whether a value is new
and how many there are, so it keeps each value's xxh3 64-bit hash: a sorted
``array('Q')``, plus a small set of hashes added since the array was last merged
(merged once it holds a sixteenth of the array, so an insert costs a constant
amortized share of a merge).

Exactness: two distinct values of one (limit, customer, period) count once if their
hashes are equal. For n values the chance that any two of them collide is about
n² / 2^65: 3e-11 at 32,000 values, 3e-7 at 3.2 million. Queries never use these
hashes (they count the values themselves), and a correction rebuilds a limit's state
from the values.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator

import numpy as np
from xxhash import xxh3_64_intdigest

_DTYPE = np.dtype("<u8")
MERGE_AT_LEAST = 32  # recent hashes merged into the array at this many, or len/16
# Up to this many candidates are looked up one by one (bisect, ~1 us each); more at
# once with numpy (a fixed ~10 us, then ~50 ns each).
BISECT_AT_MOST = 8


def value_hash(value: str) -> int:
    return xxh3_64_intdigest(value.encode("utf-8", "surrogatepass"))


def _packed(hashes: Iterable[int]) -> array[int]:
    """Hashes as a sorted array without repeats."""
    return array("Q", sorted(set(hashes)))


class DistinctHashes:
    """The distinct values of a limit's period for one customer, as hashes."""

    __slots__ = ("packed", "recent")

    def __init__(self, packed: array[int] | None = None,
                 recent: set[int] | None = None) -> None:
        # sorted, no repeats, disjoint from recent; never changed in place once shared
        self.packed: array[int] = array("Q") if packed is None else packed
        self.recent: set[int] = set() if recent is None else recent

    @classmethod
    def of_values(cls, values: Iterable[str]) -> DistinctHashes:
        return cls(_packed(value_hash(value) for value in values))

    @classmethod
    def of_bytes(cls, raw: bytes) -> DistinctHashes:
        """Inverse of ``to_bytes``. Stored bytes are not trusted to be canonical: they
        are checked to be strictly increasing (one linear pass) and sorted and
        deduplicated only if not (a hashing sort of every restored state was most of a
        restart's time)."""
        view = np.frombuffer(raw, dtype=_DTYPE)
        if len(view) > 1 and not bool((view[1:] > view[:-1]).all()):
            return cls(array("Q", _sorted_unique(view).astype(np.uint64).tobytes()))
        packed = array("Q")
        packed.frombytes(raw)
        if sys.byteorder != "little":
            packed.byteswap()
        return cls(packed)

    def __len__(self) -> int:
        return len(self.packed) + len(self.recent)

    def __iter__(self) -> Iterator[int]:
        """The hashes (ints), in no particular order."""
        yield from self.packed
        yield from self.recent

    def add_hashes(self, hashes: set[int]) -> list[int]:
        """Add the hashes; returns those that were new. ``hashes`` is not changed."""
        recent = self.recent
        packed = self.packed
        size = len(packed)
        if len(hashes) <= BISECT_AT_MOST:
            new = []
            for hash_ in hashes:
                if hash_ in recent:
                    continue
                if size:
                    slot = bisect_left(packed, hash_)
                    if slot < size and packed[slot] == hash_:
                        continue
                new.append(hash_)
        else:
            fresh = hashes - recent
            if size and fresh:
                view = np.frombuffer(packed, dtype=np.uint64)
                candidates = np.fromiter(fresh, dtype=np.uint64, count=len(fresh))
                slots = np.searchsorted(view, candidates)
                slots[slots == size] = 0
                new = candidates[view[slots] != candidates].tolist()
            else:
                new = list(fresh)
        if new:
            recent.update(new)
            if len(recent) >= max(MERGE_AT_LEAST, size >> 4):
                self._merge()
        return new

    def add_bytes(self, raws: list[bytes]) -> None:
        """Add the hashes of several ``to_bytes`` outputs at once, with one sort (a
        restart loading a state's increments)."""
        parts = [np.frombuffer(self.packed, dtype=np.uint64)]
        if self.recent:
            parts.append(np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
        parts.extend(np.frombuffer(raw, dtype=_DTYPE) for raw in raws)
        self.packed = array("Q", _sorted_unique(np.concatenate(parts)).astype(np.uint64,
                                                                            copy=False).tobytes())
        self.recent = set()

    def to_bytes(self) -> bytes:
        """Canonical bytes: every hash, sorted, 8 bytes little-endian each."""
        self._merge()
        return _little_endian(self.packed)

    def _merge(self) -> None:
        """The recent hashes into the array: disjoint from it, so an insert at their
        sorted places (one copy of the array, no sort of it) keeps it sorted and
        without repeats."""
        if not self.recent:
            return
        recent = np.sort(np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
        packed = np.frombuffer(self.packed, dtype=np.uint64)
        merged = np.insert(packed, np.searchsorted(packed, recent), recent)
        self.packed = array("Q", merged.tobytes())
        self.recent = set()


def _sorted_unique(hashes: np.ndarray) -> np.ndarray:
    """Sorted, without repeats (a sort and a mask: ``np.unique`` hashes first, slower
    here)."""
    ordered = np.sort(hashes)
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def hashes_bytes(hashes: Iterable[int]) -> bytes:
    """Hashes as ``to_bytes`` writes them (sorted)."""
    return _little_endian(_packed(hashes))


def _little_endian(packed: array[int]) -> bytes:
    if sys.byteorder == "little":
        return packed.tobytes()
    swapped = array("Q", packed)
    swapped.byteswap()
    return swapped.tobytes()
