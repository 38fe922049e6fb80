"""unique_count limits' states in checkpoints: chunks of what changed, not the whole sets.

A month's (or the whole history's) distinct values per customer grow with the period;
checkpoints store them as a log of chunks beside the head's (engine.domain.limits), so
that a checkpoint writes the values added since the one before. These tests restart an
engine from such checkpoints (with a WAL tail after the last) and compare the limits'
states and alerts with what was ingested; the Hypothesis model in
tests/test_limits_model.py restores chunks among its other restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import Event, Limit, Meter, open_engine
from engine.domain.distinct import value_hash
from engine.domain.head import LIMIT_CHUNK_BIT, parse_chunk_key
from engine.domain.limits import MAX_UNIQUE_CHUNKS
from engine.storage.lmdb_store import LmdbStore
from tests.helpers.events import MINUTE, NOW
from tests.helpers.internals import store_of

USERS = Meter(name="users", aggregation="unique_count", unique_dimension="user")
MONTH = Limit(id="month-users", meter_api_name="users", thresholds=[12], period="month")
TOTAL = Limit(id="all-users", meter_api_name="users", thresholds=[40], period="total")


def seen(customer: str, users: list[int], at: int = NOW - 5 * MINUTE) -> list[Event]:
    return [Event(meter_api_name="users", customer_id=customer, meter_value=1,
                  meter_time_in_millis=at + i, dimensions={"user": f"u{user}"})
            for i, user in enumerate(users)]


def states_of(eng: Any) -> dict[tuple[str, str], set[int]]:
    """Every unique_count limit state held, as (limit id, customer) -> its values'
    hashes (``engine.domain.distinct``)."""
    out: dict[tuple[str, str], set[str]] = {}
    for actor in eng._actors:
        for limit_id, periods in actor.state.alert_limits.states.items():
            for period in periods.values():
                for customer, partial in period.partials.items():
                    out[(limit_id, customer)] = set(partial)
    return out


def stored_limit_chunks(source: Path | Any) -> list[tuple[int, str, int, bytes]]:
    """The limit chunks of the last checkpoint: of a closed data directory, or of an
    open engine's store."""
    store = LmdbStore(source) if isinstance(source, Path) else store_of(source)
    try:
        snapshot = store.load_snapshot()
        assert snapshot is not None
        chunks = []
        for key, raw in snapshot.head:
            part, name, seq = parse_chunk_key(key)
            if part & LIMIT_CHUNK_BIT:
                chunks.append((part & ~LIMIT_CHUNK_BIT, name, seq, raw))
        return chunks
    finally:
        if isinstance(source, Path):
            store.close()


def opened(path: Path) -> Any:
    return open_engine(path, shards=2, clock_ms=lambda: NOW, snapshot_on_close=False)


async def test_checkpoints_write_the_values_added_and_a_restart_unites_them(
        tmp_path: Path) -> None:
    async with opened(tmp_path) as eng:
        await eng.define_meter(USERS)
        await eng.add_limit(MONTH)
        await eng.add_limit(TOTAL)
        await eng.ingest(seen("acme", [0, 1, 2, 3]) + seen("globex", [0, 1]))
        await eng.snapshot()
        await eng.ingest(seen("acme", [2, 4, 5, 6, 7]))  # u2 again: not a new value
        await eng.snapshot()
        await eng.ingest(seen("acme", [8, 9]))  # the WAL tail after the last checkpoint
        before = states_of(eng)
    assert before[("month-users", "acme")] == {value_hash(f"u{i}") for i in range(10)}
    chunks = stored_limit_chunks(tmp_path)
    # Per limit: the whole states the limit was added with and the first batch, then
    # the second checkpoint's chunk with only the values it added (u4 to u7 of acme),
    # as hashes.
    for limit_id in ("month-users", "all-users"):
        mine = sorted((seq, raw) for _, name, seq, raw in chunks if name == limit_id)
        assert len(mine) == 2
        def holds(user: str, raw: bytes) -> bool:  # (a state's hashes, 8 bytes each)
            return value_hash(user).to_bytes(8, "little") in raw

        assert all(holds(f"u{i}", mine[1][1]) for i in (4, 5, 6, 7))
        assert not holds("u0", mine[1][1]) and not holds("u2", mine[1][1])
    async with opened(tmp_path) as eng:
        assert states_of(eng) == before
        ack = await eng.ingest(seen("acme", [1, 10]), report_alerts=True)
        assert ack.alerts == []  # 11 distinct
        ack = await eng.ingest(seen("acme", [3, 11]), report_alerts=True)
        assert [(a.limit_id, a.customer_id, int(a.value)) for a in ack.alerts] == [
            ("month-users", "acme", 12)]


async def test_a_limit_with_many_chunks_is_written_whole_again(tmp_path: Path) -> None:
    async with opened(tmp_path) as eng:
        await eng.define_meter(USERS)
        await eng.add_limit(MONTH)
        for user in range(2 * MAX_UNIQUE_CHUNKS + 3):
            await eng.ingest(seen("acme", [user]))
            await eng.snapshot()
            per_shard: dict[int, int] = {}
            for part, _, _, _ in stored_limit_chunks(eng):
                per_shard[part] = per_shard.get(part, 0) + 1
            assert max(per_shard.values()) <= MAX_UNIQUE_CHUNKS + 1
        before = states_of(eng)
    assert len(before[("month-users", "acme")]) == 2 * MAX_UNIQUE_CHUNKS + 3
    async with opened(tmp_path) as eng:
        assert states_of(eng) == before


async def test_a_removed_limit_leaves_no_chunk_and_a_replaced_one_starts_over(
        tmp_path: Path) -> None:
    async with opened(tmp_path) as eng:
        await eng.define_meter(USERS)
        await eng.add_limit(MONTH)
        await eng.add_limit(TOTAL)
        await eng.ingest(seen("acme", [0, 1, 2]))
        await eng.snapshot()
        await eng.remove_limit("all-users")
        await eng.add_limit(Limit(id="month-users", meter_api_name="users", thresholds=[3],
                                  period="month", customer_id="globex"))
        await eng.ingest(seen("globex", [5]) + seen("acme", [6]))
        await eng.snapshot()
        before = states_of(eng)
    assert before == {("month-users", "globex"): {value_hash("u5")}}
    assert {name for _, name, _, _ in stored_limit_chunks(tmp_path)} == {"month-users"}
    async with opened(tmp_path) as eng:
        assert states_of(eng) == before
