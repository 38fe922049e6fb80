"""Property test: cost limits' alerts for random streams equal a naive model's, across restarts.

The cost limits' part of the limit model test (tests/test_limits_model.py holds the
usage limits'). The model keeps every accepted event; after each batch it rates, from
scratch, every (customer, billing month) the batch touched (the naive aggregation of
the month's events per charge, then the plan's lines) and fires each threshold the
amount reaches that had not fired in that period; a threshold the amount falls below
again re-arms (negative sums and volume tiers make costs fall). The engine restarts
between steps, from the write-ahead log or from a snapshot, with another shard count:
alerts continue with the next seq and are never repeated.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Charge, Event, Limit, Meter, Plan, Tier, open_engine
from engine.pricing.rating import as_quantity, billing_period, plan_lines
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR
from tests.helpers.strategies import ANCHORS_MS
from tests.model import Model, ModelEvent, aggregate
from tests.test_limits_model import as_keys

METERS = [Meter(name="calls", aggregation="sum"), Meter(name="seats", aggregation="count"),
          Meter(name="peak", aggregation="max")]
CUSTOMERS = ["acme", "globex", "initech"]
PLAN = Plan(id="pro", currency="USD", fixed_fee="5", timezone="Europe/Berlin", charges=[
    Charge(meter_api_name="calls", unit_price="0.5", dimensions={"region": ["eu"]},
           id="calls-eu"),
    Charge(meter_api_name="calls", unit_price="0.25", dimensions={"region": ["us"]},
           id="calls-us", max_amount="40"),
    Charge(meter_api_name="seats", model="volume", tiers=[
        Tier(up_to=3, unit_price="10"), Tier(up_to=6, unit_price="4"),
        Tier(unit_price="1", flat_fee="2")]),
    Charge(meter_api_name="peak", model="graduated", tiers=[
        Tier(up_to=10, unit_price="0"), Tier(unit_price="1.5", flat_fee="3")]),
])


@st.composite
def cost_events(draw: Any, anchor: int) -> Event:
    meter = draw(st.sampled_from(METERS))
    dims = draw(st.dictionaries(st.just("region"), st.sampled_from(["eu", "us", "x"]),
                                max_size=1))
    value = draw(st.integers(-30, 60) if meter.name == "calls" else st.integers(0, 40))
    return Event(meter.name, draw(st.sampled_from(CUSTOMERS)), value,
                 anchor + draw(st.integers(-2 * DAY, HOUR)), dims)


cost_limits = st.builds(
    Limit, id=st.sampled_from(["c1", "c2", "c3"]),
    meter_api_name=st.sampled_from([None, "calls", "seats"]),
    thresholds=st.lists(st.integers(6, 90).map(Decimal), min_size=1, max_size=3),
    customer_id=st.sampled_from([None, *CUSTOMERS]),
    period=st.just("month"), timezone=st.just(PLAN.timezone), measure=st.just("cost"))


class CostModel:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.limits: dict[str, Limit] = {}
        self.fired: set[tuple[str, str, int, Decimal]] = set()

    def quantity(self, charge: Charge, customer: str, start: int, end: int) -> Decimal:
        items = [i for i in self.model.events
                 if i.event.meter_api_name == charge.meter_api_name
                 and i.event.customer_id == customer
                 and start <= i.event.meter_time_in_millis < end
                 and all(i.event.dimensions.get(k) in v for k, v in charge.dimensions.items())]
        if not items:
            return Decimal(0)
        return as_quantity(aggregate(self.model.meters[charge.meter_api_name], items))

    def evaluate(self, limit: Limit, customer: str, start: int) -> list[tuple]:
        end = billing_period(start, PLAN.timezone)[1]
        lines = plan_lines(PLAN, {c.charge_id: self.quantity(c, customer, start, end)
                                  for c in PLAN.charges})
        amount = sum((line.amount for line in lines if limit.meter_api_name is None
                      or line.meter_api_name == limit.meter_api_name), Decimal(0))
        out = []
        for threshold in sorted(set(limit.thresholds)):
            key = (limit.id, customer, start, Decimal(threshold))
            if amount < threshold:
                self.fired.discard(key)  # re-armed
            elif key not in self.fired:
                self.fired.add(key)
                out.append((limit.id, customer, Decimal(threshold), amount, start))
        return out

    def applies(self, limit: Limit, customer: str) -> bool:
        return limit.customer_id in (None, customer)

    def add(self, limit: Limit, now_ms: int) -> list[tuple]:
        self.limits.pop(limit.id, None)
        self.limits[limit.id] = limit
        self.fired = {k for k in self.fired if k[0] != limit.id}
        start, end = billing_period(now_ms, PLAN.timezone)
        if limit.customer_id is not None:
            customers = [limit.customer_id]
        else:  # every customer with priced usage this period
            customers = sorted({i.event.customer_id for i in self.model.events
                                if start <= i.event.meter_time_in_millis < end
                                and self.priced(i)})
        out = []
        for customer in customers:
            out += self.evaluate(limit, customer, start)
        return out

    def priced(self, item: ModelEvent) -> bool:
        return any(item.event.meter_api_name == c.meter_api_name and all(
            item.event.dimensions.get(k) in v for k, v in c.dimensions.items())
            for c in PLAN.charges)

    def after_batch(self, accepted: list[ModelEvent]) -> list[tuple]:
        touched = sorted({(i.event.customer_id,
                           billing_period(i.event.meter_time_in_millis, PLAN.timezone)[0])
                          for i in accepted if self.priced(i)})
        out = []
        for customer, start in touched:
            for limit in self.limits.values():
                if self.applies(limit, customer):
                    out += self.evaluate(limit, customer, start)
        return out


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(anchor=st.sampled_from(ANCHORS_MS), data=st.data())
async def test_cost_alerts_match_model_across_restarts(anchor: int, data: Any) -> None:
    now = anchor + HOUR
    model = Model(meters={m.name: m for m in METERS})
    cost_model = CostModel(model)
    batches = st.tuples(st.just("batch"), st.lists(cost_events(anchor), min_size=1,
                                                   max_size=12))
    steps = data.draw(st.lists(st.one_of(
        batches, batches,
        st.tuples(st.just("limit"), cost_limits),
        st.tuples(st.just("restart"), st.tuples(st.integers(1, 3), st.booleans())),
    ), min_size=1, max_size=8))
    steps.insert(0, ("limit", data.draw(cost_limits)))  # batches after a limit, mostly
    store = MemoryStore()
    shards, snapshot_on_close = 2, True
    seq = 0
    first = True
    pending = list(steps)
    while True:
        store.closed = False
        async with open_engine(store=store, shards=shards, clock_ms=lambda: now,
                               snapshot_on_close=snapshot_on_close) as eng:
            if first:
                for meter in METERS:
                    await eng.define_meter(meter)
                await eng.define_plan(PLAN)
                for customer in CUSTOMERS:
                    await eng.assign_plan(customer, "pro", effective_from_ms=anchor - 40 * DAY)
                first = False
            assert eng.next_alert_seq() == seq  # none repeated, none lost
            async with eng.subscribe(from_seq=seq) as subscription:
                while pending:
                    kind, payload = pending.pop(0)
                    if kind == "restart":
                        shards, snapshot_on_close = payload
                        break
                    if kind == "limit":
                        await eng.add_limit(payload)
                        expected = cost_model.add(payload, now)
                        got = []
                        while subscription.next_seq < eng.next_alert_seq():
                            got.append(await subscription.__anext__())
                    else:
                        before = len(model.events)
                        model.ingest(payload)
                        expected = cost_model.after_batch(model.events[before:])
                        got = (await eng.ingest(payload, report_alerts=True)).alerts
                        while subscription.next_seq < eng.next_alert_seq():
                            await subscription.__anext__()
                    assert [a.seq for a in got] == list(range(seq, seq + len(got)))
                    assert all(a.measure == "cost" and a.currency == "USD" for a in got)
                    seq += len(got)
                    assert as_keys(got) == Counter(
                        (lid, c, t, v, s) for lid, c, t, v, s in expected), (kind, payload)
                else:
                    return
