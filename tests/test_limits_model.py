"""Property test: alerts fired for random event streams equal a naive model's.

The model keeps the list of accepted events; after each batch it recomputes,
from scratch, every (limit, customer, period) that the batch touched, and
fires each threshold reached that had not fired in that period.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Limit, open_engine
from engine.domain.limits import period_bounds
from engine.storage import MemoryStore
from tests.helpers.events import DAY
from tests.helpers.strategies import ANCHORS_MS, CUSTOMERS, METERS, ZONES, events
from tests.model import Model, ModelEvent, aggregate

limits_strategy = st.builds(
    Limit,
    id=st.sampled_from(["l1", "l2", "l3"]),
    meter_api_name=st.sampled_from([m.name for m in METERS]),
    thresholds=st.lists(
        st.one_of(st.integers(-5, 3 * 10**6), st.decimals(0, 10**5, places=2)),
        min_size=1, max_size=3,
    ),
    customer_id=st.one_of(st.none(), st.sampled_from(CUSTOMERS[:3])),
    period=st.sampled_from(["hour", "day", "week", "month", "total"]),
    timezone=st.sampled_from(ZONES),
    filter=st.one_of(st.just({}), st.just({"region": ["eu"]})),
)


class LimitModel:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.limits: dict[str, Limit] = {}
        self.fired: set[tuple[str, str, int, Any]] = set()

    def matching(self, limit: Limit, item: ModelEvent) -> bool:
        event = item.event
        if event.meter_api_name != limit.meter_api_name:
            return False
        if limit.customer_id is not None and event.customer_id != limit.customer_id:
            return False
        return all(event.dimensions.get(k) in allowed for k, allowed in limit.filter.items())

    def evaluate(self, limit: Limit, customer: str, start: int, end: int) -> list[tuple]:
        meter = self.model.meters[limit.meter_api_name]
        items = [i for i in self.model.events if self.matching(limit, i)
                 and i.event.customer_id == customer
                 and start <= i.event.meter_time_in_millis < end]
        if not items:
            return []
        value = aggregate(meter, items)
        out = []
        thresholds = sorted({Decimal(repr(t)) if isinstance(t, float) else Decimal(t)
                             for t in limit.thresholds})
        for threshold in thresholds:
            key = (limit.id, customer, start, threshold)
            if value >= threshold and key not in self.fired:
                self.fired.add(key)
                out.append((limit.id, customer, threshold, value, start))
        return out

    def add(self, limit: Limit, now_ms: int) -> list[tuple]:
        self.limits.pop(limit.id, None)
        self.limits[limit.id] = limit
        self.fired = {k for k in self.fired if k[0] != limit.id}
        start, end = period_bounds(now_ms, limit)
        customers = {i.event.customer_id for i in self.model.events
                     if i.event.meter_api_name == limit.meter_api_name}
        out = []
        for customer in sorted(customers):
            if limit.customer_id in (None, customer):
                out += self.evaluate(limit, customer, start, end)
        return out

    def after_batch(self, accepted: list[ModelEvent]) -> list[tuple]:
        out = []
        for limit in self.limits.values():
            touched = {}
            for item in accepted:
                if self.matching(limit, item):
                    start, end = period_bounds(item.event.meter_time_in_millis, limit)
                    touched[(item.event.customer_id, start)] = end
            for (customer, start), end in touched.items():
                out += self.evaluate(limit, customer, start, end)
        return out


def as_keys(alerts: list[Any]) -> Counter:
    return Counter((a.limit_id, a.customer_id, Decimal(a.threshold), Decimal(a.value),
                    a.period_start_ms) for a in alerts)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(anchor=st.sampled_from(ANCHORS_MS), data=st.data(), shards=st.integers(1, 4))
async def test_alerts_match_model(anchor: int, data: Any, shards: int) -> None:
    now = anchor + 3 * DAY
    model = Model(meters={m.name: m for m in METERS})
    limit_model = LimitModel(model)
    steps = data.draw(st.lists(st.one_of(
        st.tuples(st.just("batch"), st.lists(events(anchor), min_size=1, max_size=20)),
        st.tuples(st.just("limit"), limits_strategy),
    ), min_size=1, max_size=8))
    seq = 0
    async with open_engine(store=MemoryStore(), shards=shards, clock_ms=lambda: now) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        async with eng.subscribe(from_seq=0) as subscription:
            for kind, payload in steps:
                if kind == "limit":
                    await eng.add_limit(payload)
                    expected = limit_model.add(payload, now)
                    got = []
                    while subscription.next_seq < eng.next_alert_seq():
                        alert = await subscription.__anext__()
                        if alert.seq >= seq:  # earlier ones arrived in acks already
                            got.append(alert)
                else:
                    before = len(model.events)
                    model.ingest(payload)
                    expected = limit_model.after_batch(model.events[before:])
                    ack = await eng.ingest(payload, report_alerts=True)
                    got = ack.alerts
                assert [a.seq for a in got] == list(range(seq, seq + len(got)))
                seq += len(got)
                assert as_keys(got) == Counter(
                    (lid, c, Decimal(t), Decimal(v), s) for lid, c, t, v, s in expected
                ), (kind, payload)
