"""Corrections reaching sealed history, against the model.

The engine runs with the smallest hot window (one day) while the simulated clock
moves by hours, so most events lie in sealed days: in blocks, in deltas of late
events not yet compacted, or in a block a correction rewrote and no checkpoint has
written yet. Cancel by id, cancel by filter (event time and received time, over
several days) and amend steps hit those days for every aggregation, between
checkpoints (which seal and compact), restarts with a checkpoint on close or without
one (the next start replays the corrections over the stored blocks), late events
and re-sends. Every query (minute, hour, day, week and month windows, non-UTC zones,
whole ranges read from rollups and summaries, with and without a block cache) must
equal the Decimal model of the events that remain; the refusal of a correction
reaching past the raw-event retention is checked at the end.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Event, Meter, Query, open_engine
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR, MINUTE
from tests.helpers.strategies import CUSTOMERS, METERS, ZONES, values
from tests.test_corrections_model import (
    CorrectionModel,
    amend_step,
    event_key,
    filter_matches,
)
from tests.test_history_model import check_queries as check_random_queries

START_MS = 1_760_000_000_000 // DAY * DAY  # a UTC midnight in October 2025
IDS = [f"s-{i}" for i in range(10)]


@st.composite
def old_events(draw: Any, now_ms: int) -> Event:
    """An event up to five days old (mostly into sealed days), on a minute or not."""
    meter = draw(st.sampled_from(METERS))
    dims = draw(st.dictionaries(st.sampled_from(["region"]), st.sampled_from(["eu", "us"]),
                                max_size=1))
    if meter.unique_dimension:
        dims["user"] = draw(st.sampled_from(["u1", "u2", "u3"]))
    offset = draw(st.one_of(st.integers(-5 * DAY, 0),
                            st.integers(-5 * 24, 0).map(lambda h: h * HOUR)))
    return Event(meter_api_name=meter.name, customer_id=draw(st.sampled_from(CUSTOMERS[:3])),
                 meter_value=draw(values), meter_time_in_millis=now_ms + offset,
                 dimensions=dims,
                 unique_id=draw(st.one_of(st.none(), st.sampled_from(IDS))))


steps = st.lists(st.one_of(
    st.tuples(st.just("ingest"), st.integers(1, 12)),
    st.tuples(st.just("cancel"), st.integers(1, 3)),
    st.tuples(st.just("cancel_where"), st.integers(0, 3)),
    st.tuples(st.just("amend"), st.integers(0, 0)),
    st.tuples(st.just("resend"), st.integers(1, 4)),
    st.tuples(st.just("advance"), st.integers(1, 30)),  # hours
    st.tuples(st.just("checkpoint"), st.just(0)),
    st.tuples(st.just("restart"), st.integers(0, 1)),
), min_size=4, max_size=14)


def queries(draw: Any, now_ms: int) -> Query:
    meter = draw(st.sampled_from(METERS))
    window = draw(st.sampled_from([None, "minute", "hour", "day", "week", "month"]))
    span = {"minute": 8 * HOUR, "hour": 4 * DAY}.get(window, 9 * DAY)
    start = now_ms - draw(st.integers(0, 7 * 24)) * HOUR
    end = start + draw(st.integers(0, span // MINUTE)) * MINUTE
    return Query(meter_api_name=meter.name, start_ms=start, end_ms=end, window=window,
                 timezone=draw(st.sampled_from(ZONES)),
                 group_by=draw(st.sampled_from([[], ["customer_id"], ["region"]])),
                 filter=draw(st.sampled_from([{}, {"region": ["eu"]},
                                              {"customer_id": [CUSTOMERS[0]]}])))


async def check_queries(eng: Any, model: CorrectionModel, data: Any, now_ms: int,
                        count: int) -> None:
    for meter in METERS:  # every aggregation: whole UTC days (rollups, summaries), by day
        for window in (None, "day"):
            query = Query(meter_api_name=meter.name, start_ms=now_ms // DAY * DAY - 7 * DAY,
                          end_ms=now_ms // DAY * DAY + DAY, window=window,
                          group_by=["customer_id"])
            got = [(r.window_start_ms, r.group, r.value) for r in (await eng.query(query)).rows]
            assert got == model.query(query), query
    await check_random_queries(eng, model, data, now_ms, count, queries)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=steps, shards=st.integers(1, 3), data=st.data())
async def test_sealed_corrections_match_model(plan: Any, shards: int, data: Any) -> None:
    await run_sealed_corrections_against_model(plan, shards, data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=steps, shards=st.integers(1, 3), data=st.data())
async def test_sealed_corrections_match_model_long(plan: Any, shards: int, data: Any) -> None:
    await run_sealed_corrections_against_model(plan, shards, data)


def aim(data: Any, model: CorrectionModel) -> tuple[Meter, str, str | None]:
    """What a correction step targets: mostly a live event's meter, customer and unique
    id (so most steps change something), often one of the latest (late events still in
    a delta, a block a correction rewrote and no checkpoint wrote yet), else any."""
    live = [item.event for item in model.events]
    if live and data.draw(st.integers(0, 3)):
        event = data.draw(st.sampled_from(live[-8:] if data.draw(st.booleans()) else live))
        return model.meters[event.meter_api_name], event.customer_id, event.unique_id
    return (data.draw(st.sampled_from(METERS)), data.draw(st.sampled_from(CUSTOMERS[:3])),
            data.draw(st.sampled_from(IDS)))


async def run_sealed_corrections_against_model(plan: Any, shards: int, data: Any) -> None:
    store = MemoryStore()
    now = [START_MS + 7 * DAY]
    model = CorrectionModel(meters={m.name: m for m in METERS})
    model.received, model.amended, model.next_order = {}, set(), 0
    sent: list[Event] = []
    cache_bytes = data.draw(st.sampled_from([0, 1 << 20]))

    def opened(snapshot_on_close: bool = True) -> Any:
        return open_engine(store=store, shards=shards, clock_ms=lambda: now[0],
                           hot_window_ms=DAY, block_cache_bytes=cache_bytes,
                           snapshot_on_close=snapshot_on_close)

    eng_cm = opened()
    eng = await eng_cm.__aenter__()
    try:
        for meter in METERS:
            await eng.define_meter(meter)
        # Something sealed from the start: a day of events, then a checkpoint.
        first = [data.draw(old_events(now[0])) for _ in range(10)]
        sent.extend(first)
        ack = await eng.ingest(first)
        assert (ack.accepted, ack.duplicates) == model.ingest_at(first, now[0])
        await eng.snapshot()
        for action, amount in plan:
            if action in ("ingest", "resend"):
                if action == "ingest" or not sent:
                    batch = [data.draw(old_events(now[0])) for _ in range(amount)]
                else:
                    batch = [data.draw(st.sampled_from(sent)) for _ in range(amount)]
                sent.extend(batch)
                ack = await eng.ingest(batch)
                assert (ack.accepted, ack.duplicates) == model.ingest_at(batch, now[0])
            elif action == "cancel":
                meter, customer, uid = aim(data, model)
                ids = data.draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=amount))
                ids.append(uid or IDS[0])
                expected = model.cancel(
                    lambda e, _r, m=meter, c=customer, i=set(ids): e.meter_api_name == m.name
                    and e.customer_id == c and e.unique_id in i)
                assert await eng.cancel(meter.name, customer, unique_ids=ids, by="t") == expected
            elif action == "cancel_where":
                meter, customer, _ = aim(data, model)
                customer = data.draw(st.sampled_from([None, customer]))
                start = now[0] - data.draw(st.integers(0, 6 * 24 * 60)) * MINUTE
                end = start + data.draw(st.integers(0, 3 * 24 * 60)) * MINUTE
                dims = [{}, {"region": ["eu"]}, {"region": ["us", "eu"]},
                        {"customer_id": [CUSTOMERS[1]]}][amount]
                received = data.draw(st.one_of(st.none(), st.tuples(
                    st.integers(START_MS, now[0]), st.just(now[0] + 1))))
                expected = model.cancel(filter_matches(meter, customer, start, end, received,
                                                       dims))
                got = await eng.cancel_where(
                    meter.name, customer_id=customer, start_ms=start, end_ms=end,
                    dimensions=dims, received_start_ms=received and received[0],
                    received_end_ms=received and received[1], by="t")
                assert got == expected
            elif action == "amend":
                meter, customer, uid = aim(data, model)
                uid = uid or data.draw(st.sampled_from(IDS))
                await amend_step(eng, model, meter, customer, uid,
                                 data.draw(old_events(now[0])), now[0])
            elif action == "advance":
                now[0] += amount * HOUR
            elif action == "checkpoint":
                await eng.snapshot()
            else:
                # The next close checkpoints, or (amount 1) does not: the start after it
                # replays the corrections from the log over the blocks the store holds.
                await eng_cm.__aexit__(None, None, None)
                eng_cm = opened(snapshot_on_close=not amount)
                eng = await eng_cm.__aenter__()
            await check_queries(eng, model, data, now[0], 2)
        assert eng.statistics().sealed_before_ms > START_MS
        page = await eng.raw_events(START_MS - DAY, now[0] + HOUR, limit=100_000)
        assert sorted(map(event_key, page.events)) == sorted(
            event_key(item.event) for item in model.events if id(item) not in model.amended)
    finally:
        await eng_cm.__aexit__(None, None, None)


async def test_logical_export_after_sealed_corrections_does_not_depend_on_sealing() -> None:
    """The same ingests and corrections, sealed daily (corrections rewriting blocks,
    some replayed over the stored blocks after a restart without a checkpoint) or never
    sealed, give the same canonical buckets."""
    exports = []
    for hot_window in (DAY, None):
        store = MemoryStore()
        now = [START_MS + DAY]

        def opened(hot: int | None = hot_window, s: MemoryStore = store,
                   clock: list[int] = now) -> Any:
            return open_engine(store=s, shards=2, clock_ms=lambda: clock[0],
                               hot_window_ms=hot, snapshot_on_close=False)

        async with opened() as eng:
            for meter in METERS:
                await eng.define_meter(meter)
            for day in range(4):
                now[0] = START_MS + (day + 1) * DAY
                await eng.ingest([
                    Event(meter_api_name=m.name, customer_id=CUSTOMERS[i % 3],
                          meter_value=i + day, meter_time_in_millis=START_MS + day * DAY
                          + i * 37 * MINUTE, dimensions={"region": "eu", "user": f"u{i % 4}"},
                          unique_id=f"{day}-{i}")
                    for i in range(20) for m in METERS])
                await eng.snapshot()
            late = [Event(meter_api_name=m.name, customer_id=CUSTOMERS[0], meter_value=5,
                          meter_time_in_millis=START_MS + 37 * MINUTE + 1,
                          dimensions={"user": "u9"}, unique_id="late") for m in METERS]
            await eng.ingest(late)  # into day 0's delta
            for meter in METERS:
                await eng.cancel(meter.name, CUSTOMERS[1], unique_ids=["0-1", "2-4"])
                await eng.cancel_where(meter.name, customer_id=None, start_ms=START_MS,
                                       end_ms=START_MS + 2 * HOUR,
                                       received_start_ms=START_MS + DAY,
                                       received_end_ms=START_MS + 2 * DAY)
        async with opened() as eng:  # the corrections above replayed over stored blocks
            for meter in METERS:
                await eng.amend(meter.name, CUSTOMERS[0], "late", Event(
                    meter_api_name=meter.name, customer_id=CUSTOMERS[0], meter_value=8,
                    meter_time_in_millis=START_MS + DAY + 5 * MINUTE,
                    dimensions={"user": "u8"}))
            await eng.snapshot()
        async with opened() as eng:
            if hot_window is not None:
                assert eng.statistics().sealed_before_ms >= START_MS + 3 * DAY
            exports.append(eng.export_logical())
    assert exports[0] == exports[1]
