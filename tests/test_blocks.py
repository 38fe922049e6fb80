"""engine.domain.blocks: the stored block formats and the rollup read path.

Pure and fast: shard states are driven directly (no engine, no store). Two shards
see the same events: one keeps every bucket in its head, the other seals its days
into blocks (format 2, or format 1 as blocks written before the rollup section
existed) and takes late events into its deltas, compacted at the next seal. Every
query (whole-day windows read rollups only; other windows and zones, and ranges
that cut a day, read minute columns) and every limit read must answer the same.
"""

from __future__ import annotations

import zlib
from decimal import Decimal, localcontext
from typing import Any
from unittest.mock import patch

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.domain import records
from engine.domain.aggregates import DistinctCounts
from engine.domain.blocks import (
    MAGIC,
    BlockRollup,
    decode_block,
    decode_rollups,
    encode_block,
    merge_rollups,
    pack_distinct,
    rollup_of,
    unpack_distinct,
)
from engine.domain.meters import MeterDef
from engine.domain.query import finish_query, plan_query
from engine.domain.series import MeterShard
from engine.domain.shard import ShardState
from engine.domain.values import EXACT
from engine.errors import InvalidQuery
from engine.runtime.blocks import BlockCache
from engine.schema import AGGREGATIONS, Event, Query, Take
from tests.test_shard import METERS, Router, apply

DAY = 86_400_000
MINUTE = 60_000
D0 = 1_750_000_000_000 // DAY * DAY  # a UTC midnight


class StoredBlocks:
    """A ``BlockReader`` over stored bytes, as the runtime's cache reads them."""

    def __init__(self, legacy: bool) -> None:
        self.legacy = legacy
        self.raw: dict[tuple[str, int], bytes] = {}
        self.rollup_reads = self.full_reads = 0

    def put(self, name: str, day: int, raw: bytes) -> None:
        if self.legacy:  # what a format-1 engine wrote: the minute section alone
            length = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 4], "big")
            raw = raw[len(MAGIC) + 4 + length:]
            assert raw[:1] == b"\x78"
        self.raw[(name, day)] = raw

    def days(self, meter: str) -> list[int]:
        return sorted(day for name, day in self.raw if name == meter)

    def load(self, meter: MeterDef, day: int) -> MeterShard | None:
        self.full_reads += 1
        raw = self.raw.get((meter.name, day))
        return None if raw is None else decode_block(meter, raw)[1]

    load_copy = load

    def load_rollup(self, meter: MeterDef, day: int) -> BlockRollup | None:
        self.rollup_reads += 1
        raw = self.raw.get((meter.name, day))
        return None if raw is None else decode_rollups(meter, raw)

    def load_summary(self, meter: MeterDef, days: list[int]) -> BlockRollup | None:
        rollups = [self.load_rollup(meter, day) for day in days]
        if any(rollup is None for rollup in rollups):
            return None
        return merge_rollups(meter, rollups)  # type: ignore[arg-type]


user_values = st.sampled_from(["u1", "u2", "u3", "", "ü"])
amounts = st.one_of(st.integers(-1000, 1000), st.integers(-(10**20), 10**20),
                    st.decimals(-1000, 1000, places=2, allow_nan=False))


@st.composite
def events_in(draw: Any, first_ms: int, last_ms: int, count: int) -> list[Event]:
    out = []
    for _ in range(count):
        aggregation = draw(st.sampled_from(AGGREGATIONS))
        dims = draw(st.dictionaries(st.just("region"), st.sampled_from(["eu", "us"]),
                                    max_size=1))
        if aggregation == "unique_count":
            dims["user"] = draw(user_values)
        ts = draw(st.one_of(st.integers(first_ms, last_ms),
                            st.integers(first_ms // MINUTE, last_ms // MINUTE).map(
                                lambda m: m * MINUTE)))
        out.append(Event(aggregation, draw(st.sampled_from(["acme", "globex", "initech"])),
                         draw(amounts), ts, dims, None))
    return out


def run_query(states: list[ShardState], query: Query, counts: DistinctCounts | None = None
              ) -> Any:
    plan = plan_query(query, METERS[query.meter_api_name])
    with localcontext(EXACT):
        try:
            result = finish_query(plan, [state.query(plan) for state in states], counts)
        except InvalidQuery:  # a cut inside a minute: both sides must refuse alike
            return "refused"
    return [(row.window_start_ms, row.group, row.value) for row in result.rows]


@st.composite
def queries(draw: Any) -> Query:
    window = draw(st.sampled_from([None, "day", "week", "month", "hour"]))
    first_day = draw(st.integers(-1, 6))
    start = D0 + first_day * DAY + draw(st.sampled_from([0, 0, 3_600_000, 45 * MINUTE]))
    days = draw(st.integers(0, 8 if window != "hour" else 2))
    end = start + days * DAY + draw(st.sampled_from([0, 0, MINUTE, 5 * 3_600_000]))
    return Query(draw(st.sampled_from(AGGREGATIONS)), start, end, window=window,
                 timezone=draw(st.sampled_from(["UTC", "UTC", "Asia/Kathmandu",
                                                "America/St_Johns"])),
                 group_by=draw(st.sampled_from([[], ["customer_id"], ["region"],
                                                ["customer_id", "region"]])),
                 filter=draw(st.sampled_from([{}, {"region": ["eu"]},
                                              {"customer_id": ["acme", "initech"]}])),
                 take=None)


class CacheStore:
    """The store calls the runtime's block cache makes."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes] = {}

    def read_block(self, key: bytes) -> bytes | None:
        return self.blocks.get(key)

    def block_keys(self) -> list[bytes]:
        return sorted(self.blocks)


class CachedBlocks:
    """Stand-in for ``StoredBlocks`` that goes through the runtime's ``BlockCache``:
    blocks pinned until a checkpoint writes them, then decoded on demand; summaries
    of several days dropped when a block changes."""

    def __init__(self, cache: BlockCache, store: CacheStore, part: int) -> None:
        self.cache, self.store, self.part = cache, store, part

    def put(self, name: str, day: int, block: MeterShard, raw: bytes, write: bool) -> None:
        self.cache.add(name, day, self.part, block, raw)
        if write:
            written = self.cache.unwritten()
            self.store.blocks.update(written)
            self.cache.written([key for key, _ in written])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), reader_kind=st.sampled_from(["format 2", "format 1", "cache", "cache"]))
def test_sealed_blocks_answer_as_the_head_does(data: Any, reader_kind: str) -> None:
    shard_count = 2
    head_only = [ShardState() for _ in range(shard_count)]
    sealed = [ShardState() for _ in range(shard_count)]
    store = CacheStore()
    cache = BlockCache(store, data.draw(st.sampled_from([0, 200_000, 1 << 26, 1 << 26])))  # type: ignore[arg-type]
    readers: list[Any] = [
        CachedBlocks(cache, store, part) if reader_kind == "cache"
        else StoredBlocks(reader_kind == "format 1") for part in range(shard_count)]
    for part, state in enumerate(sealed):
        state.blocks = cache.reader(part) if reader_kind == "cache" else readers[part]
    route_a, route_b = Router(shard_count), Router(shard_count)
    lsn = 0
    # Three rounds: events (late ones into sealed days from the second on), then a seal
    # that moves the boundary forward and compacts the deltas into new block versions.
    for sealed_days in (3, 5, 6):
        lsn += 1
        batch = data.draw(events_in(D0, D0 + 7 * DAY - 1, data.draw(st.integers(1, 25))))
        assert apply(head_only, route_a, batch, lsn) == apply(sealed, route_b, batch, lsn)
        before_minute = (D0 + sealed_days * DAY) // MINUTE
        for part, (state, reader) in enumerate(zip(sealed, readers, strict=True)):
            with localcontext(EXACT):
                built = state.seal(before_minute, lsn, shard_count, part)
            write = data.draw(st.booleans())
            for name, day, block, raw in built:
                if isinstance(reader, CachedBlocks):
                    reader.put(name, day, block, raw, write)
                else:
                    reader.put(name, day, raw)
        # The same whole-range queries every round (a cached summary of their days must
        # not outlive a compaction of one of them), then drawn ones.
        fixed = [Query(aggregation, D0 + first * DAY, D0 + 3 * DAY, group_by=group_by)
                 for aggregation in AGGREGATIONS for first, group_by in (
                     (0, []), (1, ["customer_id"]))]
        for query in fixed + [data.draw(queries()) for _ in range(6)]:
            assert run_query(sealed, query) == run_query(head_only, query), query
        for aggregation in AGGREGATIONS:
            meter = METERS[aggregation]
            start = D0 + data.draw(st.integers(0, 6)) * DAY
            end = start + data.draw(st.integers(0, 3)) * DAY + data.draw(
                st.sampled_from([0, 7 * MINUTE]))
            for customer in ("acme", "globex"):
                got = [state.usage_partial(meter, customer, (), start, end)
                       for state in sealed]
                want = [state.usage_partial(meter, customer, (), start, end)
                        for state in head_only]
                assert got == want


def test_a_whole_day_window_reads_rollups_only() -> None:
    state = ShardState()
    reader = StoredBlocks(legacy=False)
    state.blocks = reader
    route = Router(1)
    batch = [Event("unique_count", "acme", 1, D0 + k * 7 * MINUTE, {"user": f"u{k % 5}"}, None)
             for k in range(400)]
    apply([state], route, batch, 1)
    for _, day, _, raw in state.seal((D0 + 2 * DAY) // MINUTE, 1, 1, 0):
        reader.put("unique_count", day, raw)
    reader.rollup_reads = reader.full_reads = 0  # sealing read through load_copy
    assert run_query([state], Query("unique_count", D0, D0 + 2 * DAY, window="day")) == [
        (D0, {}, 5), (D0 + DAY, {}, 5)]
    assert (reader.rollup_reads, reader.full_reads) == (2, 0)
    # A window in another zone cuts the days: minute columns, same exactness.
    assert run_query([state], Query("unique_count", D0, D0 + 2 * DAY)) == [(D0, {}, 5)]
    run_query([state], Query("unique_count", D0, D0 + 2 * DAY, window="day",
                             timezone="Asia/Kathmandu"))
    assert reader.full_reads == 2


def test_the_rollup_section_equals_the_minute_columns() -> None:
    """Format 2's stored rollups decode to what the minute columns give (every kind,
    widened values, an empty unique value), and a format-1 block decodes."""
    route = Router(1)
    for aggregation in AGGREGATIONS:
        state = ShardState()
        batch = [Event(aggregation, "acme", value, D0 + k * MINUTE, {"user": user}, None)
                 for k, (value, user) in enumerate([(5, "a"), (10**19, "b"),
                                                    (Decimal("1.25"), ""), (-3, "z")])]
        apply([state], route, batch, 1)
        [(_, day, block, raw)] = state.seal((D0 + DAY) // MINUTE, 1, 1, 0)
        assert raw.startswith(MAGIC)
        stored = decode_rollups(METERS[aggregation], raw).series
        assert stored == rollup_of(block, day).series
        legacy = zlib.compress(records.encode(records.decode_block(zlib.decompress(
            raw[len(MAGIC) + 4 + int.from_bytes(raw[4:8], "big"):]))), 1)
        assert decode_rollups(METERS[aggregation], legacy).series == stored
        assert encode_block(decode_block(METERS[aggregation], legacy)[1], day, 1, 0, 1) == raw


def test_distinct_values_pack_into_one_str_unless_one_holds_a_nul() -> None:
    # Ingest refuses NUL in dimension values; a stored value with one still round-trips.
    assert pack_distinct({"b", "", "a"}) == "\x00a\x00b"
    assert list(unpack_distinct(pack_distinct({"b", "", "a"}))) == ["", "a", "b"]
    assert pack_distinct({"a\x00b", "c"}) == ["a\x00b", "c"]
    assert unpack_distinct(("a\x00b", "c")) == ("a\x00b", "c")


async def test_a_store_of_format_1_blocks_opens_answers_and_compacts_to_format_2() -> None:
    """Blocks written before the rollup section existed: the engine reads them (whole
    days and minute windows alike), and a late event's compaction rewrites its day in
    format 2; every answer stays the model's."""
    from engine import open_engine
    from engine.storage import MemoryStore
    from tests.helpers.strategies import METERS as ENGINE_METERS
    from tests.model import Model

    store = MemoryStore()
    now = [D0 + 6 * DAY]
    model = Model(meters={m.name: m for m in ENGINE_METERS})
    batch = [Event(m.name, ("acme", "globex")[i % 2], i, D0 + i * 97 * MINUTE,
                   {"region": ("eu", "us")[i % 3 % 2], "user": f"u{i % 7}"}, None)
             for i in range(80) for m in ENGINE_METERS]
    shapes = [Query(m.name, D0, D0 + 7 * DAY, window=window, group_by=group_by)
              for m in ENGINE_METERS for window, group_by in (
                  (None, ["customer_id"]), ("day", ["region"]), ("hour", []))]
    shapes.append(Query("m_sum", D0, D0 + 7 * DAY, window="day", timezone="Asia/Kathmandu"))

    async def check(eng: Any) -> None:
        for query in shapes:
            result = await eng.query(query)
            assert [(r.window_start_ms, r.group, r.value) for r in result.rows] == \
                model.query(query), query

    async with open_engine(store=store, shards=2, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        for meter in ENGINE_METERS:
            await eng.define_meter(meter)
        model.ingest(batch)
        await eng.ingest(batch)
        await eng.snapshot()
    assert store.blocks and all(raw.startswith(MAGIC) for raw in store.blocks.values())
    for key, raw in store.blocks.items():  # as a format-1 engine left them
        length = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 4], "big")
        store.blocks[key] = raw[len(MAGIC) + 4 + length:]
    late = [Event(m.name, "acme", 5, D0 + DAY + 3 * MINUTE, {"user": "late"}, None)
            for m in ENGINE_METERS]
    async with open_engine(store=store, shards=2, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        await check(eng)
        model.ingest(late)
        await eng.ingest(late)
        await check(eng)  # the late events in the delta, over format-1 blocks
        await eng.snapshot()
        await check(eng)
    day_one = [raw for key, raw in store.blocks.items()
               if int.from_bytes(key[-6:-2], "big") == (D0 + DAY) // DAY]
    assert day_one and all(raw.startswith(MAGIC) for raw in day_one)
    assert any(not raw.startswith(MAGIC) for raw in store.blocks.values())
    async with open_engine(store=store, shards=2, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        await check(eng)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), search_max=st.sampled_from([0, 32]),
       min_buckets=st.sampled_from([1, 4]))
def test_repeated_whole_range_unique_counts_follow_the_head(data: Any, search_max: int,
                                                            min_buckets: int) -> None:
    """Whole-range unique_count queries over a cached summary and the head, repeated as
    events arrive in between (head, and late ones into the deltas): the summary's
    memory of earlier lookups and the head's remembered slices must never answer
    otherwise than a head that holds every bucket."""
    shard_count = 2
    head_only = [ShardState() for _ in range(shard_count)]
    sealed = [ShardState() for _ in range(shard_count)]
    store = CacheStore()
    cache = BlockCache(store, 1 << 26)  # type: ignore[arg-type]
    for part, state in enumerate(sealed):
        state.blocks = cache.reader(part)
    route_a, route_b = Router(shard_count), Router(shard_count)
    users = st.sampled_from([f"u{k}" for k in range(12)])

    def batch(first_day: int, last_day: int) -> list[Event]:
        count = data.draw(st.integers(1, 20))
        return [Event("unique_count", data.draw(st.sampled_from(["acme", "globex", "initech"])),
                      1, data.draw(st.one_of(
                          st.integers(D0 + first_day * DAY, D0 + last_day * DAY - 1),
                          # a few minutes again and again: values join existing buckets
                          st.sampled_from([D0 + day * DAY + 5 * MINUTE + 7 for day in
                                           range(first_day, last_day)]))),
                      {"user": data.draw(users),
                       **data.draw(st.sampled_from([{}, {"region": "eu"}]))}, None)
                for _ in range(count)]

    lsn = 1
    first = batch(0, 3) + [Event("unique_count", "acme", 1, D0 + k * MINUTE, {"user": f"s{k % 7}"},
                                 None) for k in range(0, 3 * 1440, 97)]
    assert apply(head_only, route_a, first, lsn) == apply(sealed, route_b, first, lsn)
    for part, state in enumerate(sealed):
        for name, day, block, raw in state.seal((D0 + 2 * DAY) // MINUTE, lsn, shard_count, part):
            cache.add(name, day, part, block, raw)
        written = cache.unwritten()
        store.blocks.update(written)
        cache.written([key for key, _ in written])
    fixed = [Query("unique_count", D0, D0 + 4 * DAY, group_by=group_by, take=take)
             for group_by in ([], ["customer_id"], ["region"], ["customer_id", "region"])
             for take in (None, Take(limit=2))]
    counts = DistinctCounts(data.draw(st.sampled_from([0, 2_000, 1 << 20])))
    with (patch("engine.domain.blocks.SEARCH_MAX_VALUES", search_max),
          patch("engine.domain.shard.DISTINCT_CACHE_MIN_BUCKETS", min_buckets)):
        for _ in range(data.draw(st.integers(2, 6))):
            drawn = [msgspec.structs.replace(data.draw(queries()), meter_api_name="unique_count")
                     for _ in range(2)]
            for query in fixed + drawn:
                assert run_query(sealed, query, counts) == run_query(head_only, query), query
            lsn += 1
            more = batch(0, 4)
            assert apply(head_only, route_a, more, lsn) == apply(sealed, route_b, more, lsn)


class CountingStore(CacheStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read_block(self, key: bytes) -> bytes | None:
        self.reads += 1
        return super().read_block(key)


def test_summaries_of_every_shard_stay_cached_when_their_rollups_would_not_fit() -> None:
    """A whole-range query builds each shard's summary from its days' rollups. Those
    rollups leave the cache with the summary built: kept, they evicted the first
    shards' summaries before the query ran again, whose every run then read every
    day again (the unique_count top-10 over 64 growth days: 4.5 s a run, not ms)."""
    shard_count, days = 4, 3
    query = Query("unique_count", D0, D0 + (days + 1) * DAY, group_by=["customer_id"],
                  take=Take(limit=2))

    def sealed_states(budget: int) -> tuple[list[ShardState], BlockCache, CountingStore]:
        store = CountingStore()
        cache = BlockCache(store, budget)  # type: ignore[arg-type]
        states = [ShardState() for _ in range(shard_count)]
        for part, state in enumerate(states):
            state.blocks = cache.reader(part)
        # values disjoint between days: a summary is about as large as its rollups
        events = [Event("unique_count", f"c{customer}", 1, D0 + day * DAY + k * MINUTE,
                        {"user": f"user-{day}-{k}-{'x' * 40}"}, None)
                  for customer in range(8) for day in range(days) for k in range(60)]
        apply(states, Router(shard_count), events, 1)
        for part, state in enumerate(states):
            for name, day, block, raw in state.seal((D0 + days * DAY) // MINUTE, 1,
                                                    shard_count, part):
                cache.add(name, day, part, block, raw)
        store.blocks.update(cache.unwritten())
        cache.written(list(store.blocks))
        return states, cache, store

    states, cache, store = sealed_states(1 << 30)
    want = run_query(states, query)
    day_numbers = [D0 // DAY + day for day in range(days)]
    summaries = [cache.load_summary(METERS["unique_count"], day_numbers, part)
                 for part in range(shard_count)]
    rollups = [sum(rollup.nbytes for day in day_numbers
                   if (rollup := cache.load_rollup(METERS["unique_count"], day, part))
                   is not None)
               for part in range(shard_count)]
    assert all(summaries) and all(rollups)
    # Room for every summary and one shard's rollups, not for every summary and rollup.
    budget = sum(s.nbytes for s in summaries if s is not None) + max(rollups) + 1_000
    assert budget < sum(s.nbytes for s in summaries if s is not None) + sum(rollups)
    states, cache, store = sealed_states(budget)
    assert run_query(states, query) == want
    store.reads = 0
    assert run_query(states, query) == want
    assert store.reads == 0
