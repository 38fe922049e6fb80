"""Corrections against the model: cancel by id, cancel by filter, amend, re-send.

Random events with unique ids over every aggregation, then cancel / cancel_where /
amend steps, restarts (with a checkpoint on close, or none: the next start replays
the corrections from the log), checkpoints and re-sends of earlier events in
between. Every query (every window) must equal the Decimal model of the events that
remain; a re-sent event whose id was cancelled is accepted once more.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Event, InvalidQuery, InvalidRequest, Meter, Query, open_engine
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR, MINUTE
from tests.helpers.strategies import CUSTOMERS, METERS, ZONES, values
from tests.model import Model, ModelEvent, to_decimal

START_MS = 1_760_000_000_000 // DAY * DAY + 3 * DAY
IDS = [f"e-{i}" for i in range(12)]


class CorrectionModel(Model):
    """The model with corrections: cancelled events leave ``events``; a cancelled id
    may be accepted again."""

    received: dict[int, int]  # id(ModelEvent) -> engine clock when it was logged
    amended: set[int]  # id(ModelEvent) of the events an amend logged
    next_order: int

    received_now = 0  # the engine clock of the batch ``ingest_at`` is taking

    def ingest_at(self, batch: list[Event], received_ms: int) -> tuple[int, int]:
        self.received_now = received_ms
        return self.ingest(batch)

    def accept(self, event: Event) -> None:
        self.add(event, self.received_now)

    def cancel(self, matches: Any, forget_ids: bool = True) -> int:
        kept, cancelled = [], []
        for item in self.events:
            (cancelled if matches(item.event, self.received[id(item)]) else kept).append(item)
        self.events = kept
        if forget_ids:
            for item in cancelled:
                event = item.event
                if event.unique_id is not None:
                    self.seen.discard((event.meter_api_name, event.customer_id,
                                       event.unique_id))
        return len(cancelled)

    def add(self, event: Event, received_ms: int) -> ModelEvent:
        # Global log order: ties on timestamp go to the later one (latest).
        item = ModelEvent(event, self.next_order)
        self.next_order += 1
        self.events.append(item)
        self.received[id(item)] = received_ms
        return item


@st.composite
def recent_events(draw: Any, now_ms: int) -> Event:
    meter = draw(st.sampled_from(METERS))
    dims = draw(st.dictionaries(st.sampled_from(["region"]), st.sampled_from(["eu", "us"]),
                                max_size=1))
    if meter.unique_dimension:
        dims["user"] = draw(st.sampled_from(["u1", "u2", "u3"]))
    offset = draw(st.one_of(st.integers(-6 * HOUR, 0),
                            st.integers(-6 * 60, 0).map(lambda m: m * MINUTE)))
    return Event(meter_api_name=meter.name, customer_id=draw(st.sampled_from(CUSTOMERS[:3])),
                 meter_value=draw(values), meter_time_in_millis=now_ms + offset,
                 dimensions=dims,
                 unique_id=draw(st.one_of(st.none(), st.sampled_from(IDS), st.sampled_from(IDS))))


steps = st.lists(st.one_of(
    st.tuples(st.just("ingest"), st.integers(1, 12)),
    st.tuples(st.just("cancel"), st.integers(1, 3)),
    st.tuples(st.just("cancel_where"), st.integers(0, 3)),
    st.tuples(st.just("amend"), st.integers(0, 0)),
    st.tuples(st.just("resend"), st.integers(1, 4)),
    st.tuples(st.just("advance"), st.integers(1, 30)),  # minutes
    st.tuples(st.just("checkpoint"), st.just(0)),
    st.tuples(st.just("restart"), st.integers(0, 1)),
), min_size=3, max_size=14)


def queries(draw: Any, now_ms: int) -> Query:
    meter = draw(st.sampled_from(METERS))
    window = draw(st.sampled_from([None, "minute", "hour", "day"]))
    start = now_ms - draw(st.integers(0, 8 * 60)) * MINUTE
    end = start + draw(st.integers(0, 8 * 60)) * MINUTE
    return Query(meter_api_name=meter.name, start_ms=start, end_ms=end, window=window,
                 timezone=draw(st.sampled_from(ZONES)),
                 group_by=draw(st.sampled_from([[], ["customer_id"], ["region"]])),
                 filter=draw(st.sampled_from([{}, {"region": ["eu"]},
                                              {"customer_id": [CUSTOMERS[0]]}])))


async def check_queries(eng: Any, model: Model, data: Any, now_ms: int, count: int) -> None:
    for meter in METERS:  # every aggregation, whole range
        query = Query(meter_api_name=meter.name, start_ms=now_ms - DAY, end_ms=now_ms + HOUR,
                      group_by=["customer_id"])
        got = [(r.window_start_ms, r.group, r.value) for r in (await eng.query(query)).rows]
        assert got == model.query(query), query
    for _ in range(count):
        query = queries(data.draw, now_ms)
        try:
            result = await eng.query(query)
        except InvalidQuery as exc:
            assert "one-minute bucket" in str(exc)
            continue
        got = [(r.window_start_ms, r.group, r.value) for r in result.rows]
        assert got == model.query(query), query


def event_key(event: Event) -> tuple[Any, ...]:
    return (event.meter_api_name, event.customer_id, to_decimal(event.meter_value),
            event.meter_time_in_millis, sorted(event.dimensions.items()), event.unique_id or "")


def filter_matches(meter: Meter, customer: str | None, start: int, end: int,
                   received: tuple[int, int] | None, dims: dict[str, list[str]]) -> Any:
    def matches(event: Event, received_ms: int) -> bool:
        if event.meter_api_name != meter.name:
            return False
        if customer is not None and event.customer_id != customer:
            return False
        if not start <= event.meter_time_in_millis < end:
            return False
        if received is not None and not received[0] <= received_ms < received[1]:
            return False
        fields = {k: v for k, v in event.dimensions.items() if k != meter.unique_dimension}
        fields["customer_id"] = event.customer_id
        return all(fields.get(k) in allowed for k, allowed in dims.items())
    return matches



async def amend_step(eng: Any, model: CorrectionModel, meter: Meter, customer: str,
                     uid: str, fresh: Event, now_ms: int) -> None:
    """Amend ``customer``'s event ``uid`` of ``meter`` to ``fresh``'s value, time and
    dimensions (the unique dimension kept or dropped as the meter needs), in the
    engine and the model; an id with no live event is refused."""
    dims = dict(fresh.dimensions)
    if meter.unique_dimension:
        dims.setdefault("user", "u9")
    else:
        dims.pop("user", None)
    corrected = Event(meter_api_name=meter.name, customer_id=customer,
                      meter_value=fresh.meter_value,
                      meter_time_in_millis=fresh.meter_time_in_millis,
                      dimensions=dims, unique_id=uid)
    live = [item for item in model.events if
            (item.event.meter_api_name, item.event.customer_id,
             item.event.unique_id) == (meter.name, customer, uid)]
    if not live:
        with pytest.raises(InvalidRequest):
            await eng.amend(meter.name, customer, uid, corrected)
        return
    ack = await eng.amend(meter.name, customer, uid, corrected, by="t")
    assert ack.accepted == 1
    assert model.cancel(lambda e, _r, c=corrected: (
        e.meter_api_name, e.customer_id, e.unique_id) == (
        c.meter_api_name, c.customer_id, c.unique_id), forget_ids=False) == 1
    model.amended.add(id(model.add(corrected, now_ms)))

@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=steps, shards=st.integers(1, 3), data=st.data())
async def test_corrections_match_model(plan: Any, shards: int, data: Any) -> None:
    await run_corrections_against_model(plan, shards, data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=steps, shards=st.integers(1, 3), data=st.data())
async def test_corrections_match_model_long(plan: Any, shards: int, data: Any) -> None:
    await run_corrections_against_model(plan, shards, data)


async def run_corrections_against_model(plan: Any, shards: int, data: Any) -> None:
    store = MemoryStore()
    now = [START_MS]
    model = CorrectionModel(meters={m.name: m for m in METERS})
    model.received, model.amended, model.next_order = {}, set(), 0
    sent: list[Event] = []

    def opened(snapshot_on_close: bool = True) -> Any:
        return open_engine(store=store, shards=shards, clock_ms=lambda: now[0],
                           snapshot_on_close=snapshot_on_close)

    eng_cm = opened()
    eng = await eng_cm.__aenter__()
    try:
        for meter in METERS:
            await eng.define_meter(meter)
        for action, amount in plan:
            if action in ("ingest", "resend"):
                if action == "ingest" or not sent:
                    batch = [data.draw(recent_events(now[0])) for _ in range(amount)]
                else:
                    batch = [data.draw(st.sampled_from(sent)) for _ in range(amount)]
                sent.extend(batch)
                ack = await eng.ingest(batch)
                assert (ack.accepted, ack.duplicates) == model.ingest_at(batch, now[0])
            elif action == "cancel":
                meter = data.draw(st.sampled_from(METERS))
                customer = data.draw(st.sampled_from(CUSTOMERS[:3]))
                ids = data.draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=amount))
                expected = model.cancel(
                    lambda e, _r, m=meter, c=customer, i=set(ids): e.meter_api_name == m.name
                    and e.customer_id == c and e.unique_id in i)
                assert await eng.cancel(meter.name, customer, unique_ids=ids, by="t") == expected
            elif action == "cancel_where":
                meter = data.draw(st.sampled_from(METERS))
                customer = data.draw(st.sampled_from([None, *CUSTOMERS[:3]]))
                start = now[0] - data.draw(st.integers(0, 7 * 60)) * MINUTE
                end = start + data.draw(st.integers(0, 7 * 60)) * MINUTE
                dims = [{}, {"region": ["eu"]}, {"region": ["us", "eu"]},
                        {"customer_id": [CUSTOMERS[1]]}][amount]
                received = data.draw(st.one_of(st.none(), st.tuples(
                    st.just(START_MS), st.integers(START_MS, now[0] + 1))))
                expected = model.cancel(filter_matches(meter, customer, start, end, received,
                                                       dims))
                got = await eng.cancel_where(
                    meter.name, customer_id=customer, start_ms=start, end_ms=end,
                    dimensions=dims, received_start_ms=received and received[0],
                    received_end_ms=received and received[1], by="t")
                assert got == expected
            elif action == "amend":
                meter = data.draw(st.sampled_from(METERS))
                customer = data.draw(st.sampled_from(CUSTOMERS[:3]))
                uid = data.draw(st.sampled_from(IDS))
                await amend_step(eng, model, meter, customer, uid,
                                 data.draw(recent_events(now[0])), now[0])
            elif action == "advance":
                now[0] += amount * MINUTE
            elif action == "checkpoint":
                await eng.snapshot()
            else:
                # The next close checkpoints, or (amount 1) does not: the start after it
                # replays the corrections from the log.
                await eng_cm.__aexit__(None, None, None)
                eng_cm = opened(snapshot_on_close=not amount)
                eng = await eng_cm.__aenter__()
            await check_queries(eng, model, data, now[0], 2)
        # Cancelled events are not raw events.
        page = await eng.raw_events(START_MS - DAY, now[0] + HOUR, limit=100_000)
        raw_kept = sorted(map(event_key, page.events))
        model_batch = sorted(event_key(item.event) for item in model.events
                             if id(item) not in model.amended)  # (not a raw event)
        assert raw_kept == model_batch
    finally:
        await eng_cm.__aexit__(None, None, None)
