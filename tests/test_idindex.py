"""The dedup index's memtable, runs, filters, merges and expiry against a simple model.

Tiny slices, few runs and a fan-in of two, so a handful of keys exercise every path:
runs written over several slices, merges of runs written in slices, drops, orphans of
an interrupted run, and a restart (the index reloaded from the store, its memtable
rebuilt from the "WAL": the groups accepted after the last flushed lsn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.runtime import idindex
from engine.runtime.idindex import Bloom, IdIndex, fingerprints, load_index, run_key
from engine.storage import LmdbStore, MemoryStore

KEYS = [f"calls\0c{i % 5}\0id-{i}".encode() for i in range(60)]


def reload(store: Any) -> IdIndex:
    meta = dict(store.meta_items(b"id"))
    return load_index(meta, store.run_numbers(), store.id_index_statistics()[0])


def finish_jobs(index: IdIndex, store: Any, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not index.pending():
            return
        index.run_slice(store)
    raise AssertionError("background work did not finish")


group = st.tuples(st.just("group"), st.lists(st.sampled_from(range(len(KEYS))), max_size=12))
step = st.one_of(
    group, group, group,
    st.tuples(st.just("freeze"), st.none()),
    st.tuples(st.just("freeze"), st.none()),
    st.tuples(st.just("slice"), st.integers(1, 6)),
    st.tuples(st.just("slice"), st.integers(1, 6)),
    st.tuples(st.just("day"), st.none()),
    st.tuples(st.just("plan"), st.none()),  # the writer asks, then a group comes first
    # A slice in a group commit (which may fail), as large as the group's ids.
    st.tuples(st.just("carry"), st.tuples(st.booleans(), st.integers(0, 12))),
    st.tuples(st.just("expire"), st.integers(1, 6)),
    st.tuples(st.just("restart"), st.none()),
)


@pytest.fixture(params=["memory", "lmdb"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, max_size=80))
def test_the_index_decides_as_a_set_does(store_kind: str, tmp_path_factory: Any,
                                         monkeypatch: pytest.MonkeyPatch,
                                         steps: list[tuple[str, Any]]) -> None:
    monkeypatch.setattr(idindex, "SLICE_KEYS", 4)
    monkeypatch.setattr(idindex, "MAX_RUNS", 3)
    monkeypatch.setattr(idindex, "MERGE_FANIN", 2)
    monkeypatch.setattr(idindex, "MAX_RUN_SPAN_DAYS", 2)
    store: Any = (MemoryStore() if store_kind == "memory"
                  else LmdbStore(tmp_path_factory.mktemp("store")))
    try:
        index = reload(store)
        remembered: dict[bytes, int] = {}  # the model: key -> arrival day
        log: list[tuple[int, dict[bytes, int]]] = []  # lsn -> ids accepted (the "WAL")
        lsn, day, expired_before = 0, 10, 0
        for kind, arg in steps:
            if kind == "group":
                keys = [KEYS[i] for i in arg]
                flags, new = index.decide(store, keys, [day] * len(keys))
                seen: set[bytes] = set()
                for key, flag in zip(keys, flags, strict=True):
                    old = remembered.get(key)
                    if old is not None and old >= expired_before:
                        assert flag, "a remembered id within the horizon must be a duplicate"
                    if old is None and key not in seen:
                        assert not flag, "an id never accepted is no duplicate"
                    if key in seen:
                        assert flag, "a repeat within one group is a duplicate"
                    seen.add(key)
                lsn += 1
                if index.new_day(new):
                    index.freeze(lsn - 1)
                index.accept(new)
                log.append((lsn, new))
                for key in new:
                    remembered[key] = day
            elif kind == "freeze":
                index.freeze(lsn)
            elif kind == "slice":
                for _ in range(arg):
                    if index.pending():
                        index.run_slice(store)
            elif kind == "day":
                day += 1
            elif kind == "plan":
                index.pending()
            elif kind == "carry" and index.pending():
                failed, group_ids = arg
                work = index.prepare(store, group_ids)
                if failed:  # the group's commit failed: nothing of it was written
                    index.aborted()
                else:
                    store.commit([], [], run_slice=work)
                    index.committed()
            elif kind == "expire":
                expired_before = max(expired_before, day - arg)
                index.expire(expired_before)
            else:  # restart: whatever the slices had not finished is lost but the log
                index = reload(store)
                for logged_lsn, new in log:
                    if logged_lsn > index.flushed_lsn:
                        index.accept(new)
        finish_jobs(index, store)
        index.freeze(lsn)
        finish_jobs(index, store)
        assert not index.memtable and not index.frozen
        assert len(index.runs) <= idindex.MAX_RUNS or _spans_block_merges(index)
        # Every run on disk is listed (orphans deleted), and each run's entries are sorted.
        assert store.run_numbers() == [run.number for run in index.runs]
        on_disk = [key for run in index.runs for key in store.read_run(run.number, None, 10**6)]
        assert len(on_disk) == len(set(on_disk)) == index.run_entries()
        for key, key_day in remembered.items():
            if key_day >= expired_before:
                assert run_key(key) in on_disk
    finally:
        store.close()


def _spans_block_merges(index: IdIndex) -> bool:
    runs = index.runs
    return all(max(r.meta.max_day for r in runs[i:i + idindex.MERGE_FANIN])
               - min(r.meta.min_day for r in runs[i:i + idindex.MERGE_FANIN])
               > idindex.MAX_RUN_SPAN_DAYS
               for i in range(len(runs) - idindex.MERGE_FANIN + 1))


def test_a_bloom_filter_has_no_false_negatives_and_few_false_positives() -> None:
    members = [b"m%d" % i for i in range(20_000)]
    others = [b"o%d" % i for i in range(20_000)]
    bloom = Bloom.build(fingerprints(members))
    assert bloom.may_contain(fingerprints(members)).all()
    false_rate = float(np.mean(bloom.may_contain(fingerprints(others))))
    assert false_rate < 0.02  # about 1 % at 10 bits per key and 7 hashes
    assert bloom.nbytes <= 20_000 * idindex.BITS_PER_KEY // 8 + 8
    assert Bloom.from_bytes(bloom.to_bytes()).may_contain(fingerprints(members[:5])).all()


def test_a_long_key_is_stored_shortened_and_still_found(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path)
    try:
        long_keys = [b"calls\0c\0" + b"x" * 500 + bytes([i]) for i in range(3)]
        index = reload(store)
        flags, new = index.decide(store, long_keys, [1, 1, 1])
        assert flags == [False] * 3 and all(len(k) <= idindex.MAX_RUN_KEY_BYTES for k in new)
        index.accept(new)
        index.freeze(1)
        finish_jobs(index, store)
        again = reload(store)
        assert again.decide(store, long_keys, [2, 2, 2])[0] == [True] * 3
    finally:
        store.close()


def _sustained_ingest(pace: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, IdIndex]:
    """Groups of ids committed as the writer commits them, each carrying a slice of the
    background work, a freeze every checkpoint and a new arrival day now and then;
    returns the most ids held in memory at once, and the index."""
    monkeypatch.setattr(idindex, "SLICE_KEYS", 8)
    monkeypatch.setattr(idindex, "MEMTABLE_MAX_KEYS", 4096)
    monkeypatch.setattr(idindex, "BACKGROUND_KEYS_PER_ID", pace)
    store = MemoryStore()
    index = reload(store)
    lsn, day, most_in_memory = 0, 100, 0
    for number in range(800):
        if number and number % GROUPS_PER_DAY == 0:
            day += 1
            index.expire(day - 6)
        keys = [f"calls\0c{lsn % 7}\0id-{lsn}-{i}".encode() for i in range(GROUP_IDS)]
        flags, new = index.decide(store, keys, [day] * GROUP_IDS)
        assert not any(flags)
        work = (index.prepare(store, index.carried_budget(GROUP_IDS))
                if index.pending() else None)
        store.commit([], [], run_slice=work)
        index.committed()
        lsn += 1
        if index.new_day(new):
            index.freeze(lsn - 1)
        index.accept(new)
        if len(index.memtable) >= idindex.MEMTABLE_MAX_KEYS:
            index.freeze(lsn)
        if lsn % GROUPS_PER_CHECKPOINT == 0:
            index.freeze(lsn)
        most_in_memory = max(most_in_memory, index.memory_keys())
    return most_in_memory, index


GROUP_IDS, GROUPS_PER_CHECKPOINT, GROUPS_PER_DAY = 64, 8, 40


def test_background_work_keeps_up_with_ingest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flushes, merges, drops and expiry keep up with sustained ingest, so the memtable
    (what a restart rebuilds from the WAL) stays one checkpoint's ids and a few groups: a
    frozen memtable goes before a merge under way, and slices carry a few keys of work
    per id of their group. With slices only as large as the group (pace 1) the work
    falls behind and the memtable grows to its bound."""
    bound = GROUP_IDS * (GROUPS_PER_CHECKPOINT + 4)
    most, index = _sustained_ingest(idindex.BACKGROUND_KEYS_PER_ID, monkeypatch)
    assert most <= bound
    assert len(index.jobs) <= 8  # (the work left over is a few jobs, not a backlog)
    behind, _ = _sustained_ingest(1, monkeypatch)
    assert behind > 4 * bound
