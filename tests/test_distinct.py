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
    hashes_of_bytes,
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
    assert raw == hashes_bytes(model) and hashes_of_bytes(raw) == model
    assert set(DistinctHashes.of_bytes(raw)) == model and not state.recent


def test_recent_hashes_are_merged_into_the_array() -> None:
    state = DistinctHashes()
    for number in range(MERGE_AT_LEAST * 40):
        assert state.add_hashes({value_hash(f"u{number}")}) != []
        assert len(state.recent) < max(MERGE_AT_LEAST, len(state.packed) >> 4)
    assert len(state) == MERGE_AT_LEAST * 40
    assert state.add_hashes({value_hash("u7"), value_hash("u1000")}) == []
