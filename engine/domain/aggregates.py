"""Aggregation kinds and their partials: the arithmetic queries and limits share.

Pure domain layer: standard library, ``engine.schema`` and
``engine.domain.values`` only; it imports no other domain module, so every
module that aggregates may import it.

A *partial* is the mergeable state of one aggregation over some buckets:
sum/count/max/min: a number; avg: ``[sum, count]``; latest: ``(ts, seq,
value)``; unique_count: a set of strings. (A unique_count *bucket* is its one
distinct value as a ``str``, or a set of two or more: most minute buckets of
a series hold one event, and a str costs a pointer where a set costs 216
bytes.) ``slice_partial`` reads one from a
series' bucket columns, ``merge_partial`` combines two (associative and
commutative, so buckets and shards may be merged in any grouping), and
``finalize`` turns one into the value a query row or a limit reports. Sums
stay exact: callers merge inside the ``values.EXACT`` context where Decimals
meet.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any, Protocol

from engine.domain.values import average
from engine.schema import AGGREGATIONS

# Aggregation kinds as small ints so the hot loops branch on an int compare.
SUM, COUNT, MAX, MIN, AVG, LATEST, UNIQUE = range(7)
KIND_BY_AGGREGATION = dict(zip(AGGREGATIONS, range(7), strict=True))


class BucketColumns(Protocol):
    """The per-bucket columns of one series (``series.Series``), as partials read them.

    Which columns exist depends on the kind: ``values`` for all but count,
    ``counts`` for count and avg, ``times`` and ``seqs`` for latest.
    """

    values: Any
    counts: Any
    times: Any
    seqs: Any


def slice_partial(kind: int, series: BucketColumns, lo: int, hi: int) -> Any:
    """The partial of buckets ``lo`` to ``hi`` (exclusive; at least one) of a series."""
    if kind == SUM:
        return sum(series.values[lo:hi])
    if kind == COUNT:
        return sum(series.counts[lo:hi])
    if kind == MAX:
        return max(series.values[lo:hi])
    if kind == MIN:
        return min(series.values[lo:hi])
    if kind == AVG:
        return [sum(series.values[lo:hi]), sum(series.counts[lo:hi])]
    if kind == LATEST:
        times, seqs = series.times, series.seqs
        best = max(range(lo, hi), key=lambda i: (times[i], seqs[i]))
        return (times[best], seqs[best], series.values[best])
    # A unique_count bucket is its one distinct value (a str) or a set of two or more.
    buckets = series.values[lo:hi]
    try:
        return set(buckets)  # in C, when every bucket holds one value (the usual case)
    except TypeError:  # a bucket holds a set (unhashable): unite them one by one
        pass
    distinct: set[str] = set()
    for values in buckets:
        if type(values) is str:
            distinct.add(values)
        else:
            distinct |= values
    return distinct


def unique_union(left: str | set[str] | frozenset[str], right: str | set[str] | frozenset[str],
                 ) -> str | set[str]:
    """Two unique_count buckets merged, as a bucket: one value stays a str (new object
    otherwise: neither argument is changed)."""
    if isinstance(left, str):
        if isinstance(right, str):
            return left if left == right else {left, right}
        return left if len(right) == 1 and left in right else {left, *right}
    if isinstance(right, str):
        return set(left) if right in left else {right, *left}
    merged = set(left) | right
    return next(iter(merged)) if len(merged) == 1 else merged


_slice_serials = itertools.count(1)


class RememberedSlice(frozenset[str]):
    """The distinct values of a head series' bucket range, kept until a bucket of the
    series changes (``engine.domain.shard.distinct_slice``): shared, so never changed
    (a merge makes a new set), and named by a ``serial`` never reused in the process,
    which ``DistinctCounts`` remembers counts by."""

    __slots__ = ("serial",)

    def __init__(self, values: Any) -> None:
        super().__init__()
        self.serial = next(_slice_serials)


class PackedDistinct:
    """A unique_count partial not yet united: sealed days' packed rollups (NUL-joined
    sorted strs, or tuples of values that hold a NUL: ``blocks.pack_distinct``) and
    sets. Shards hand these on so that a group's values from every shard and day are
    united once, when counted (``distinct_values``), not once per shard and again
    when the shards' partials merge.

    ``count``, when not None, is the number of distinct values of ``parts``, already
    worked out by the shard that built it (``blocks.count_over_summary``); merging
    anything into the partial forgets it. ``keys``, when not None, names every part
    for ``DistinctCounts``: a sealed rollup's part as (the rollup's serial, the id of
    the part it holds; serials start at 1), a ``RememberedSlice`` as (0, its serial),
    a small set (``NAMED_BY_VALUES_MAX``) by its values (a frozenset of them); a part
    without a name (a larger set) makes it None."""

    __slots__ = ("count", "keys", "parts")

    def __init__(self, parts: list[Any], count: int | None = None,
                 keys: list[Any] | None = None) -> None:
        self.parts = parts
        self.count = count
        self.keys = keys

    def add(self, part: Any) -> None:
        """Take one more part (a set, frozenset or another ``PackedDistinct``'s parts)."""
        self.count = None
        if type(part) is PackedDistinct:
            self.parts.extend(part.parts)
            if self.keys is not None:
                if part.keys is None:
                    self.keys = None
                else:
                    self.keys.extend(part.keys)
            return
        self.parts.append(part)
        if self.keys is not None:
            self.keys = _named(self.keys, part)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedDistinct):
            return distinct_values(self) == distinct_values(other)
        return isinstance(other, (set, frozenset)) and distinct_values(self) == other

    __hash__ = None  # type: ignore[assignment]


# A set part of at most this many values is named by its values (a frozenset of them):
# cheaper than remembering it (late events into a sealed day are a few per series).
NAMED_BY_VALUES_MAX = 16


def _named(keys: list[Any], part: Any) -> list[Any] | None:
    """``keys`` with the name of one more set part, or None if it has none."""
    if type(part) is RememberedSlice:
        keys.append((0, part.serial))
    elif type(part) in (set, frozenset) and len(part) <= NAMED_BY_VALUES_MAX:
        keys.append(frozenset(part))
    else:
        return None
    return keys


class DistinctCounts:
    """Counts of unique_count partials whose parts all have names (``PackedDistinct.keys``),
    remembered within a byte budget, least recently used dropped first: a query
    repeated over the same sealed days and unchanged head slices unites each group's
    values once, not per run. Exact: a name stands for one immutable part, never
    reused (serials are never reused, and a rollup part's id is unique while its
    rollup lives; a rollup never changes), or the values themselves (a small set).
    Nothing but those values is kept alive by a name.

    Owned by the engine's query path (``engine.runtime.engine``), one per engine."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._counts: OrderedDict[frozenset[Any], tuple[int, int]] = OrderedDict()
        self.cached_bytes = 0

    def count(self, partial: PackedDistinct) -> int:
        keys = partial.keys
        if keys is None or len(keys) < 2 or not self.budget_bytes:
            return len(distinct_values(partial))
        name = frozenset(keys)
        found = self._counts.get(name)
        if found is not None:
            self._counts.move_to_end(name)
            return found[0]
        count = len(distinct_values(partial))
        # The entry, its frozenset of names and the names (a small set's: its values).
        size = 200 + sum(80 if type(key) is tuple else 100 + 60 * len(key) for key in keys)
        self._counts[name] = (count, size)
        self.cached_bytes += size
        while self.cached_bytes > self.budget_bytes and self._counts:
            _, (_, dropped) = self._counts.popitem(last=False)
            self.cached_bytes -= dropped
        return count


def distinct_values(partial: Any) -> set[str] | frozenset[str]:
    """The values of a unique_count partial: a set, or a ``PackedDistinct`` united (one
    join, split and set in C for its packed strs)."""
    if type(partial) is not PackedDistinct:
        return partial  # type: ignore[no-any-return]
    texts = [part for part in partial.parts if type(part) is str]
    values = set("\x00".join(texts).split("\x00")) if texts else set()
    if len(texts) < len(partial.parts):
        for part in partial.parts:
            if type(part) is not str:
                values.update(part)
    return values


def merge_partial(kind: int, left: Any, right: Any) -> Any:
    """Merge two partials; may reuse ``left`` (see ``copy_partial``)."""
    if kind == SUM or kind == COUNT:
        return left + right
    if kind == MAX:
        return right if right > left else left
    if kind == MIN:
        return right if right < left else left
    if kind == AVG:
        return [left[0] + right[0], left[1] + right[1]]
    if kind == LATEST:
        return right if right[:2] > left[:2] else left
    if type(left) is PackedDistinct:
        left.add(right)
        return left
    if type(right) is PackedDistinct or type(left) is RememberedSlice:
        # Not united here: a remembered slice stays named, and is never changed.
        merged = PackedDistinct([left], keys=_named([], left))
        merged.add(right)
        return merged
    left |= right
    return left


def copy_partial(kind: int, partial: Any) -> Any:
    """A partial safe to merge into while ``partial`` is still needed: unique_count
    partials are sets, merged in place."""
    if kind == UNIQUE:
        if type(partial) is PackedDistinct:
            return PackedDistinct(list(partial.parts), partial.count,
                                  None if partial.keys is None else list(partial.keys))
        return set(partial)
    return partial


def finalize(kind: int, partial: Any, counts: DistinctCounts | None = None) -> Any:
    """The reported value of a partial: avg divides, latest drops its order key,
    unique_count counts (remembered in ``counts``, when given, for partials whose parts
    all have names)."""
    if kind in (SUM, COUNT, MAX, MIN):
        return partial
    if kind == AVG:
        return average(partial[0], partial[1])
    if kind == LATEST:
        return partial[2]
    if type(partial) is PackedDistinct and partial.count is not None:
        return partial.count
    if type(partial) is PackedDistinct and len(partial.parts) == 1:
        # One series-day or summary alone (one customer by day): its values are distinct
        # already, so count them without building a set.
        only = partial.parts[0]
        return only.count("\x00") + 1 if type(only) is str else len(only)
    if type(partial) is PackedDistinct and counts is not None:
        return counts.count(partial)
    return len(distinct_values(partial))
