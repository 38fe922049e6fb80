"""``engine.domain.distinct.DistinctHashes`` against a plain set of hashes: whatever the
order and size of the additions (across its merges of recent hashes, both lookup paths)
it reports exactly the hashes that were new, counts them, and its bytes round-trip."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.domain.distinct import (
    BISECT_AT_MOST,
    MERGE_AT_LEAST,
    DistinctHashes,
    hashes_bytes,
    value_hash,
)

# Small value universes make repeats common; batch sizes straddle the bisect/numpy split.
values = st.text(alphabet="abcdefghij", min_size=1, max_size=3)
batches = st.lists(st.sets(values, max_size=3 * BISECT_AT_MOST), max_size=40)


@settings(max_examples=150, deadline=None)
@given(start=st.sets(values, max_size=200), batches=batches)
def test_hashes_match_a_set_model(start: set[str], batches: list[set[str]]) -> None:
    state = DistinctHashes.of_values(start)
    model = {value_hash(value) for value in start}
    for batch in batches:
        hashes = {value_hash(value) for value in batch}
        before = set(hashes)
        new = state.add_hashes(hashes)
        assert hashes == before  # the argument is not changed
        assert sorted(new) == sorted(hashes - model)
        model |= hashes
        assert len(state) == len(model) and set(state) == model
        assert len(set(state.packed)) == len(state.packed)  # no repeats
        assert list(state.packed) == sorted(state.packed)
        assert not state.recent & set(state.packed)
    raw = state.to_bytes()
    assert raw == hashes_bytes(model)
    assert set(DistinctHashes.of_bytes(raw)) == model and not state.recent


def test_recent_hashes_are_merged_into_the_array() -> None:
    state = DistinctHashes()
    for number in range(MERGE_AT_LEAST * 40):
        assert state.add_hashes({value_hash(f"u{number}")}) != []
        assert len(state.recent) < max(MERGE_AT_LEAST, len(state.packed) >> 4)
    assert len(state) == MERGE_AT_LEAST * 40
    assert state.add_hashes({value_hash("u7"), value_hash("u1000")}) == []


@settings(max_examples=100, deadline=None)
@given(hashes=st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=60))
def test_bytes_not_in_canonical_order_load_sorted_without_repeats(hashes: list[int]) -> None:
    """Stored bytes in any order, with repeats, load as the canonical state."""
    raw = b"".join(hash_.to_bytes(8, "little") for hash_ in hashes)
    state = DistinctHashes.of_bytes(raw)
    assert list(state.packed) == sorted(set(hashes)) and not state.recent
    assert state.add_hashes(set(hashes)) == []


@settings(max_examples=100, deadline=None)
@given(start=st.sets(values, max_size=50), recent=st.sets(values, max_size=5),
       increments=st.lists(st.sets(values, max_size=30), max_size=6))
def test_added_bytes_unite_with_the_state(start: set[str], recent: set[str],
                                          increments: list[set[str]]) -> None:
    state = DistinctHashes.of_values(start)
    state.add_hashes({value_hash(value) for value in recent})
    state.add_bytes([hashes_bytes(value_hash(value) for value in increment)
                     for increment in increments])
    model = {value_hash(value) for value in start | recent | set().union(*increments)}
    assert list(state.packed) == sorted(model) and not state.recent
