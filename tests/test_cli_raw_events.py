"""``Engine.raw_events``, the reader behind ``meter export --events``: the accepted events
of a range read back from the write-ahead log, page by page, against a model.

The model: walk the batches in the order they were ingested; an event with a unique
id is accepted when no earlier event (in that batch or an earlier one) had the same
(meter, customer, unique id); the export is the accepted events of the range, meter
and customer asked for, in that order.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Event, InvalidRequest, Meter, UnknownMeter, open_engine
from engine.schema import RawEventPage
from engine.storage import MemoryStore
from tests.helpers.alerts import memory_engine
from tests.helpers.events import DAY, HOUR, MINUTE, NOW

METERS = ["calls", "bytes"]
CUSTOMERS = ["acme", "bob"]


async def every_event(eng: Any, start_ms: int, end_ms: int, page_events: int,
                      **where: Any) -> tuple[list[Event], list[RawEventPage]]:
    events: list[Event] = []
    pages: list[RawEventPage] = []
    from_lsn = from_index = 0
    while True:
        page = await eng.raw_events(start_ms, end_ms, from_lsn=from_lsn, from_index=from_index,
                                    limit=page_events, **where)
        assert len(page.events) <= page_events
        pages.append(page)
        events.extend(page.events)
        if page.done:
            return events, pages
        from_lsn, from_index = page.next_lsn, page.next_index


def model_export(batches: list[list[Event]], start_ms: int, end_ms: int,
                 meter: str | None, customer: str | None) -> list[Event]:
    seen: set[tuple[str, str, str]] = set()
    accepted = []
    for batch in batches:
        for event in batch:
            if event.unique_id is not None:
                key = (event.meter_api_name, event.customer_id, event.unique_id)
                if key in seen:
                    continue
                seen.add(key)
            accepted.append(event)
    return [e for e in accepted
            if start_ms <= e.meter_time_in_millis < end_ms
            and meter in (None, e.meter_api_name) and customer in (None, e.customer_id)]


events_strategy = st.builds(
    Event,
    meter_api_name=st.sampled_from(METERS),
    customer_id=st.sampled_from(CUSTOMERS),
    meter_value=st.integers(0, 9),
    meter_time_in_millis=st.integers(0, 9).map(lambda k: NOW - k * MINUTE),
    unique_id=st.none() | st.sampled_from(["u1", "u2", "u3"]),
)


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(events_strategy, max_size=8), min_size=1, max_size=5),
       window=st.tuples(st.integers(0, 10), st.integers(0, 10)),
       meter=st.none() | st.sampled_from(METERS), customer=st.none() | st.sampled_from(CUSTOMERS),
       page_events=st.integers(1, 6))
async def test_pages_match_the_model(batches: list[list[Event]], window: tuple[int, int],
                                     meter: str | None, customer: str | None,
                                     page_events: int) -> None:
    start_ms = NOW - max(window) * MINUTE
    end_ms = NOW - min(window) * MINUTE + 1
    async with memory_engine() as eng:
        for name in METERS:
            await eng.define_meter(Meter(name=name, aggregation="sum"))
        for batch in batches:
            await eng.ingest(batch)
        found, pages = await every_event(eng, start_ms, end_ms, page_events,
                                         meter_api_name=meter, customer_id=customer)
    assert found == model_export(batches, start_ms, end_ms, meter, customer)
    assert all(not page.done for page in pages[:-1]) and pages[-1].done


async def test_a_cursor_resumes_inside_a_batch_and_keeps_its_retries_out() -> None:
    async with memory_engine() as eng:
        await eng.define_meter(Meter(name="calls", aggregation="sum"))
        batch = [Event(meter_api_name="calls", customer_id="acme", meter_value=i,
                       meter_time_in_millis=NOW, unique_id=f"e-{i % 3}") for i in range(6)]
        ack = await eng.ingest(batch)
        assert (ack.accepted, ack.duplicates) == (3, 3)
        first = await eng.raw_events(NOW, NOW + 1, limit=2)
        assert [e.meter_value for e in first.events] == [0, 1]
        assert (first.next_lsn, first.next_index, first.done) == (ack.lsn, 2, False)
        rest = await eng.raw_events(NOW, NOW + 1, from_lsn=first.next_lsn,
                                    from_index=first.next_index, limit=10)
        # e-0 and e-1 came earlier in the batch, before the cursor: their retries stay out.
        assert [e.meter_value for e in rest.events] == [2]
        assert rest.done
        with pytest.raises(UnknownMeter):
            await eng.raw_events(NOW, NOW + 1, meter_api_name="nope")
        for bad in ({"limit": 0}, {"limit": 100_001}, {"from_lsn": -1}):
            with pytest.raises(InvalidRequest):
                await eng.raw_events(NOW, NOW + 1, **bad)
        with pytest.raises(InvalidRequest):
            await eng.raw_events(NOW + 1, NOW)


async def test_a_range_the_retention_trimmed_is_refused_whole(tmp_path: Any) -> None:
    clock = [NOW]
    store = MemoryStore()
    async with open_engine(store=store, shards=2, clock_ms=lambda: clock[0],
                           raw_retention_ms=DAY) as eng:
        await eng.define_meter(Meter(name="calls", aggregation="sum"))

        async def ingest_now(unique_id: str) -> None:
            await eng.ingest([Event(meter_api_name="calls", customer_id="acme", meter_value=1,
                                    meter_time_in_millis=clock[0], unique_id=unique_id)])
            await eng.snapshot()

        await ingest_now("old")
        assert (await eng.raw_events(0, NOW + DAY)).events[0].unique_id == "old"
        clock[0] = NOW + 2 * HOUR
        await ingest_now("kept")
        clock[0] = NOW + DAY + HOUR
        await ingest_now("new")
        assert store.first_lsn() > 1  # the first batch left the log
        kept_from = NOW + 2 * HOUR + eng.ingest_rules.future_ms
        with pytest.raises(InvalidRequest, match=f"{kept_from} ms"):
            await eng.raw_events(NOW, NOW + 2 * DAY)
        page = await eng.raw_events(kept_from, NOW + 2 * DAY)
        assert [e.unique_id for e in page.events] == ["new"] and page.done
        page = await eng.raw_events(NOW + 2 * HOUR, NOW + 2 * DAY, from_lsn=store.first_lsn())
        assert [e.unique_id for e in page.events] == ["kept", "new"]
        with pytest.raises(InvalidRequest, match="trimmed while"):
            await eng.raw_events(NOW, NOW + 2 * DAY, from_lsn=1)
