"""Cancelled positions as per-record bitmaps and re-admissible keys packed in chunks
(engine.runtime.corrections), against plain sets; stores written with the older
one-entry-per-position and uncompressed-key formats still load."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.runtime.corrections import (
    CORRECTION_LSN,
    PACKED_READMIT_PREFIX,
    POSITION,
    POSITION_PREFIX,
    READMIT_CHUNK,
    READMIT_PREFIX,
    RUN,
    RUNS_PREFIX,
    USED_PREFIX,
    CancelledPositions,
    CorrectionBook,
    extend_runs,
    pack_readmit,
    run_bitmaps,
    unpack_readmit,
)


def runs_of(pairs: list[tuple[int, int]]) -> list[int]:
    """Runs as ``PendingCorrection.resolve`` builds them: pairs in log order."""
    runs: list[int] = []
    for lsn, index in sorted(pairs):
        extend_runs(runs, lsn, index)
    return runs


# Scattered positions and whole stretches (runs long enough to fill whole bytes).
stretch_st = st.tuples(st.integers(1, 6), st.integers(0, 70), st.integers(1, 40)).map(
    lambda t: {(t[0], i) for i in range(t[1], min(80, t[1] + t[2]))})
positions_st = st.lists(
    st.one_of(stretch_st, st.sets(st.tuples(st.integers(1, 6), st.integers(0, 79)),
                                  max_size=30)), max_size=4,
).map(lambda parts: set().union(*parts))


@settings(max_examples=150, deadline=None)
@given(st.lists(positions_st, min_size=1, max_size=4))
def test_merged_bitmaps_hold_exactly_the_cancelled_positions(corrections):
    book = CancelledPositions()
    model: set[tuple[int, int]] = set()
    for pairs in corrections:
        runs = runs_of(list(pairs))
        assert sum(runs[2::3]) == len(pairs)
        book.merge(run_bitmaps(runs))
        model |= pairs
        for lsn in range(0, 8):
            for index in range(0, 80):
                assert ((lsn, index) in book) == ((lsn, index) in model), (lsn, index)
        assert len(book) == len(model)


def test_packed_keys_round_trip_across_chunks():
    keys = [b"calls\x00acme\x00e-%d" % i for i in range(2 * READMIT_CHUNK + 5)]
    assert unpack_readmit(pack_readmit(keys)) == keys
    assert unpack_readmit(pack_readmit([])) == []


class MetaOnly:
    def __init__(self, meta: dict[bytes, bytes]) -> None:
        self.meta = meta

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        return sorted((k, v) for k, v in self.meta.items() if k.startswith(prefix))


def test_a_book_loads_both_formats_and_forgets_used_readmissions():
    old, new = CORRECTION_LSN.pack(5), CORRECTION_LSN.pack(9)
    meta = {
        # Before runs: one packed (lsn, index) per position; keys uncompressed.
        POSITION_PREFIX + old: POSITION.pack(3, 0) + POSITION.pack(3, 2),
        READMIT_PREFIX + old: msgspec.msgpack.encode([b"k-a", b"k-b", b"k-c"]),
        # Now: runs, keys compressed; k-b cancelled again by the later correction.
        RUNS_PREFIX + new: RUN.pack(4, 10, 3) + RUN.pack(7, 0, 1),
        PACKED_READMIT_PREFIX + new: pack_readmit([b"k-b", b"k-d"]),
        # k-a's re-admission by correction 5 was used.
        USED_PREFIX + b"k-a": CORRECTION_LSN.pack(5),
    }
    book = CorrectionBook.load(MetaOnly(meta))
    cancelled = {(3, 0), (3, 2), (4, 10), (4, 11), (4, 12), (7, 0)}
    for lsn in range(9):
        for index in range(14):
            assert ((lsn, index) in book.positions) == ((lsn, index) in cancelled)
    assert {key: cell[0] for key, cell in book.readmit.items()} == {
        b"k-b": 9, b"k-c": 5, b"k-d": 9}
