"""History without growth, against the model: sealing, late events, compaction, restarts.

The engine runs over many simulated days with the smallest hot window (one day),
so most of what it holds is sealed into blocks while it runs. Between ingests the
clock moves, checkpoints seal and compact, and the engine restarts on the same
store; every query (every window, across the head/sealed boundary, minute windows
included) must equal the Decimal model, and the canonical logical export must not
depend on when sealing happened.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Event, InvalidQuery, Query, open_engine
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR, MINUTE
from tests.helpers.strategies import CUSTOMERS, METERS, ZONES, values
from tests.model import Model

START_MS = 1_760_000_000_000 // DAY * DAY  # a UTC midnight in October 2025


@st.composite
def late_events(draw: Any, now_ms: int) -> Event:
    """An event up to six days old (so mostly into sealed days), or just ahead."""
    meter = draw(st.sampled_from(METERS))
    dims = draw(st.dictionaries(st.sampled_from(["region"]), st.sampled_from(["eu", "us"]),
                                max_size=1))
    if meter.unique_dimension:
        dims["user"] = draw(st.sampled_from(["u1", "u2", "u3"]))
    offset = draw(st.one_of(st.integers(-6 * DAY, 0),
                            st.integers(-6 * 24, 0).map(lambda h: h * HOUR)))
    return Event(meter_api_name=meter.name, customer_id=draw(st.sampled_from(CUSTOMERS[:3])),
                 meter_value=draw(values), meter_time_in_millis=max(0, now_ms + offset),
                 dimensions=dims,
                 unique_id=draw(st.one_of(st.none(), st.sampled_from(
                     [f"id-{i}" for i in range(10)]))))


steps = st.lists(st.one_of(
    st.tuples(st.just("ingest"), st.integers(1, 12)),
    st.tuples(st.just("advance"), st.integers(1, 40)),  # hours
    st.tuples(st.just("checkpoint"), st.just(0)),
    st.tuples(st.just("restart"), st.just(0)),
), min_size=3, max_size=14)


def queries(draw: Any, now_ms: int) -> Query:
    meter = draw(st.sampled_from(METERS))
    window = draw(st.sampled_from([None, "minute", "hour", "day", "week", "month"]))
    span = {"minute": 8 * HOUR, "hour": 4 * DAY}.get(window, 12 * DAY)
    start = now_ms - draw(st.integers(0, 10 * 24)) * HOUR
    end = start + draw(st.integers(0, span // MINUTE)) * MINUTE
    return Query(meter_api_name=meter.name, start_ms=start, end_ms=end, window=window,
                 timezone=draw(st.sampled_from(ZONES)),
                 group_by=draw(st.sampled_from([[], ["customer_id"], ["region"],
                                                ["customer_id", "region"]])),
                 filter=draw(st.sampled_from([{}, {"region": ["eu"]},
                                              {"customer_id": [CUSTOMERS[0]]}])))


async def check_queries(eng: Any, model: Model, data: Any, now_ms: int, count: int,
                        drawn: Any = None) -> None:
    """``count`` queries drawn by ``drawn`` (default ``queries``), each answered as the
    model does (or refused for a zone's sub-minute offset)."""
    for _ in range(count):
        query = (drawn or queries)(data.draw, now_ms)
        try:
            result = await eng.query(query)
        except InvalidQuery as exc:
            assert "one-minute bucket" in str(exc)
            continue
        got = [(r.window_start_ms, r.group, r.value) for r in result.rows]
        assert got == model.query(query), query


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=steps, shards=st.integers(1, 3), data=st.data())
async def test_sealed_history_matches_model(plan: Any, shards: int, data: Any) -> None:
    await run_history_against_model(plan, shards, data)


@pytest.mark.slow
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=steps, shards=st.integers(1, 3), data=st.data())
async def test_sealed_history_matches_model_long(plan: Any, shards: int, data: Any) -> None:
    await run_history_against_model(plan, shards, data)


async def run_history_against_model(plan: Any, shards: int, data: Any) -> None:
    store = MemoryStore()
    now = [START_MS + 7 * DAY]
    model = Model(meters={m.name: m for m in METERS})

    def opened() -> Any:
        return open_engine(store=store, shards=shards, clock_ms=lambda: now[0],
                           hot_window_ms=DAY, block_cache_bytes=data.draw(
                               st.sampled_from([0, 1 << 20])))

    eng_cm = opened()
    eng = await eng_cm.__aenter__()
    try:
        for meter in METERS:
            await eng.define_meter(meter)
        for action, amount in plan:
            if action == "ingest":
                batch = [data.draw(late_events(now[0])) for _ in range(amount)]
                ack = await eng.ingest(batch)
                assert (ack.accepted, ack.duplicates) == model.ingest(batch)
            elif action == "advance":
                now[0] += amount * HOUR
            elif action == "checkpoint":
                await eng.snapshot()
            else:
                await eng_cm.__aexit__(None, None, None)
                eng_cm = opened()
                eng = await eng_cm.__aenter__()
            await check_queries(eng, model, data, now[0], 2)
        assert eng.statistics().sealed_before_ms > START_MS or not model.events
    finally:
        await eng_cm.__aexit__(None, None, None)


async def test_logical_export_does_not_depend_on_sealing() -> None:
    """The same log, sealed daily or never, gives the same canonical buckets."""
    batches = []
    for day in range(6):
        batch = [Event(meter_api_name=m.name, customer_id=CUSTOMERS[i % 3],
                       meter_value=i + day, meter_time_in_millis=START_MS + day * DAY
                       + i * 37 * MINUTE, dimensions={"region": "eu", "user": f"u{i % 4}"},
                       unique_id=f"{day}-{i}")
                 for i in range(30) for m in METERS]
        # late events into earlier days, and a retry of an earlier day's event
        batch += [Event(meter_api_name=m.name, customer_id=CUSTOMERS[0], meter_value=7,
                        meter_time_in_millis=START_MS + max(0, day - 3) * DAY + 5 * MINUTE,
                        dimensions={"user": "u9"}, unique_id=f"late-{day}")
                  for m in METERS]
        batch.append(Event(meter_api_name=METERS[0].name, customer_id=CUSTOMERS[0],
                           meter_value=1, meter_time_in_millis=START_MS + day * DAY,
                           dimensions={"region": "eu", "user": "u0"}, unique_id="0-0"))
        batches.append(batch)
    exports = []
    now = [START_MS]
    for hot_window in (DAY, None):
        now[0] = START_MS + DAY
        store = MemoryStore()
        async with open_engine(store=store, shards=2, clock_ms=lambda: now[0],
                               hot_window_ms=hot_window) as eng:
            for meter in METERS:
                await eng.define_meter(meter)
            for day, batch in enumerate(batches):
                now[0] = START_MS + (day + 1) * DAY
                await eng.ingest(batch)
                await eng.snapshot()
        async with open_engine(store=store, shards=2, clock_ms=lambda: now[0],
                               hot_window_ms=hot_window) as eng:
            if hot_window is not None:
                assert eng.statistics().block_count > 0
            exports.append(eng.export_logical())
    assert exports[0] == exports[1]


async def test_compaction_is_bounded_per_checkpoint_and_finishes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Late events into ten sealed days: a checkpoint compacts at most
    MAX_COMPACTIONS_PER_CHECKPOINT deltas per shard, the oldest day always among them;
    the rest stay in the delta, answers stay exact throughout, and later checkpoints
    finish the job (idle compaction off: only the requested checkpoints merge here)."""
    from engine.domain import shard as shard_module
    from engine.runtime import writer as writer_module

    monkeypatch.setattr(writer_module, "COMPACT_IDLE_S", math.inf)

    now = [START_MS + 12 * DAY]
    meter = METERS[0]
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        await eng.define_meter(meter)
        day_starts = [START_MS + day * DAY for day in range(10)]
        await eng.ingest([Event(meter_api_name=meter.name, customer_id="acme",
                                meter_value=1, meter_time_in_millis=start)
                          for start in day_starts])
        await eng.snapshot()  # the ten days: sealed into blocks
        late = [Event(meter_api_name=meter.name, customer_id="acme", meter_value=10,
                      meter_time_in_millis=start + HOUR) for start in day_starts]
        await eng.ingest(late)
        state = eng._actors[0].state
        query = Query(meter_api_name=meter.name, start_ms=START_MS, end_ms=START_MS + 10 * DAY,
                      window="day")
        expected = [(start, {}, 11) for start in day_starts]
        delta_days = [[start // DAY for start in day_starts]]
        for _ in range(3):
            result = await eng.query(query)
            assert [(r.window_start_ms, r.group, r.value) for r in result.rows] == expected
            await eng.snapshot()
            delta = state.deltas.get(meter.name)
            delta_days.append(sorted({m // 1440 for s in (delta.series.values() if delta else ())
                                      for m in s.minutes}))
        step = shard_module.MAX_COMPACTIONS_PER_CHECKPOINT
        for before, after in itertools.pairwise(delta_days):
            assert set(after) <= set(before) and len(before) - len(after) <= step
            assert before[0] not in after  # the oldest day is always merged
        assert delta_days[-1] == []
        result = await eng.query(query)
        assert [(r.window_start_ms, r.group, r.value) for r in result.rows] == expected


def backfill_batches(days: int, customers: int) -> list[list[Event]]:
    """A month of history sent after the fact: every event is late (sealed time)."""
    meter = METERS[0]
    return [[Event(meter_api_name=meter.name, customer_id=f"c{c}", meter_value=day + c + 1,
                   meter_time_in_millis=START_MS + day * DAY + c * 7 * MINUTE,
                   dimensions={"region": f"r{c % 3}"}, unique_id=f"{day}-{c}")
             for c in range(customers)] for day in range(days)]


async def test_a_backfill_is_merged_while_it_arrives_and_when_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """History sent as late events (a move from another metering system): a shard
    whose deltas pass COMPACT_DELTA_BUCKETS merges some while the backfill goes on;
    once no request comes for COMPACT_IDLE_S, the rest is merged and written by a
    checkpoint, so a restart finds no delta; answers stay exact throughout."""
    from engine.runtime import writer as writer_module

    monkeypatch.setattr(writer_module, "COMPACT_DELTA_BUCKETS", 40)
    monkeypatch.setattr(writer_module, "COMPACT_IDLE_S", math.inf)
    store = MemoryStore()
    now = [START_MS + 31 * DAY]
    batches = backfill_batches(30, 10)
    meter = METERS[0]
    query = Query(meter_api_name=meter.name, start_ms=START_MS, end_ms=START_MS + 30 * DAY,
                  window="day", group_by=["region"])
    model = Model(meters={m.name: m for m in METERS})
    for batch in batches:
        model.ingest(batch)
    expected = model.query(query)

    def rows(result: Any) -> list[tuple[int, dict[str, Any], Any]]:
        return [(r.window_start_ms, r.group, r.value) for r in result.rows]

    async with open_engine(store=store, shards=1, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        await eng.define_meter(meter)
        for batch in batches:
            await eng.ingest(batch)
        state = eng._actors[0].state
        total = sum(len(batch) for batch in batches)
        # Merged during the backfill (no checkpoint was asked for; automatic ones do not
        # merge deltas): fewer buckets wait.
        assert state.delta_buckets < total and eng.statistics().block_count > 0
        snapshots = eng.statistics().snapshots
        assert rows(await eng.query(query)) == expected
        monkeypatch.setattr(writer_module, "COMPACT_IDLE_S", 0.05)
        # A request (of another meter), so that the writer looks at the idle time again.
        await eng.define_meter(METERS[1])
        await eng.ingest([Event(meter_api_name=METERS[1].name, customer_id="c0",
                                meter_value=1, meter_time_in_millis=now[0])])
        with trio.fail_after(30):
            while state.delta_buckets or eng.statistics().blocks_unwritten:
                await trio.sleep(0.02)
        assert not state.deltas
        assert eng.statistics().snapshots > snapshots  # the idle checkpoint wrote the blocks
        assert rows(await eng.query(query)) == expected
    async with open_engine(store=store, shards=1, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        assert eng._actors[0].state.delta_buckets == 0
        assert rows(await eng.query(query)) == expected


async def test_grouped_rollups_stay_exact_as_blocks_change_and_shapes_come_and_go() -> None:
    """A shape asked of sealed days keeps its grouped partials on the day's rollup;
    a late event compacted into the day makes a new rollup (the old grouping is not
    read again), more shapes than a rollup keeps push the oldest out, the head's and
    the delta's groups merge with the kept ones, and every answer equals the model."""
    from engine.domain import shard as shard_module

    now = [START_MS + 5 * DAY]
    sums = [m for m in METERS if m.aggregation in ("sum", "max", "avg")]
    model = Model(meters={m.name: m for m in METERS})
    batch = [Event(meter_api_name=m.name, customer_id=f"c{c}", meter_value=c + d + 1,
                   meter_time_in_millis=START_MS + d * DAY + c * HOUR,
                   dimensions={"region": ("eu", "us")[c % 2], "tier": f"t{c % 3}"})
             for m in sums for d in range(5) for c in range(6)]
    shapes = [["region"], ["customer_id"], ["tier"], ["region", "tier"], [],
              ["customer_id", "region"]]

    async def check(eng: Any) -> None:
        asked = [(START_MS, "day", {}), (START_MS + DAY, "day", {}),
                 (START_MS, "week", {}), (START_MS, None, {}),
                 (START_MS, "day", {"region": ["eu"]}), (START_MS, "day", {"tier": ["t1"]})]
        for meter in sums:
            for group_by, (start, window, where) in itertools.product(shapes, asked):
                query = Query(meter_api_name=meter.name, start_ms=start,
                              end_ms=START_MS + 6 * DAY, window=window, group_by=group_by,
                              filter=where)
                rows = [(r.window_start_ms, r.group, r.value)
                        for r in (await eng.query(query)).rows]
                assert rows == model.query(query), (meter.name, group_by)

    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: now[0],
                           hot_window_ms=DAY) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest(batch)
        model.ingest(batch)
        await eng.snapshot()  # days 0-3 sealed
        await check(eng)
        # (the groupings were kept: the checks above read them)
        assert any(getattr(decoded, "grouped", None)
                   for decoded, _ in eng._blocks._decoded.values())
        late = [Event(meter_api_name=m.name, customer_id="c1", meter_value=100,
                      meter_time_in_millis=START_MS + DAY + 5 * MINUTE,
                      dimensions={"region": "eu", "tier": "t9"}) for m in sums]
        await eng.ingest(late)
        model.ingest(late)
        await check(eng)  # the delta over the kept groupings
        await eng.snapshot()  # compacted: new rollups
        await check(eng)
        assert shard_module.GROUPED_SHAPES < len(shapes)
