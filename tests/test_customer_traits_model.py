"""Property tests: queries grouped and filtered by customer traits agree with a Decimal model.

Random customers (some with records and random traits, some known only by usage,
some deleted), random events of every aggregation, and random queries, pages and
dimension listings grouped and filtered by traits, dimensions and customer ids; then
random trait changes (updates, deletions, reinstatements) and the same again: traits
are resolved at query time, so the latest traits apply to all usage.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Customer, InvalidQuery, Meter, Query, Take, open_engine
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR
from tests.helpers.strategies import ANCHORS_MS, CUSTOMERS, METERS, ZONES, events
from tests.model import Model, ModelEvent, aggregate, group_order

TRAITS = {"plan": ["free", "pro", "ent"], "tier": ["a", "b"]}
KEYS = ["customer_id", "region", "plan", "customer.plan", "customer.tier"]
FILTER_VALUES = ["eu", "us", "x", "free", "pro", "ent", "a", "b", *CUSTOMERS[:3]]

Group = tuple[Any, ...]


class TraitModel(Model):
    """The naive model with a registry: the traits of each visible customer."""

    def __init__(self) -> None:
        super().__init__(meters={m.name: m for m in METERS})
        self.traits: dict[str, dict[str, str]] = {}  # visible customers with a record

    def fields(self, item: ModelEvent, meter: Meter) -> dict[str, str]:
        event = item.event
        dims = {k: v for k, v in event.dimensions.items() if k != meter.unique_dimension}
        traits = self.traits.get(event.customer_id, {})
        return {**dims, **{f"customer.{k}": v for k, v in traits.items()},
                "customer_id": event.customer_id}

    def groups(self, query: Query) -> dict[tuple[int, Group], list[ModelEvent]]:
        from engine.domain.windows import resolve_timezone, window_floor

        meter = self.meters[query.meter_api_name]
        tz = resolve_timezone(query.timezone)
        out: dict[tuple[int, Group], list[ModelEvent]] = {}
        for item in self.events:
            event = item.event
            if event.meter_api_name != meter.name:
                continue
            if not query.start_ms <= event.meter_time_in_millis < query.end_ms:
                continue
            fields = self.fields(item, meter)
            if any(fields.get(k) not in allowed for k, allowed in query.filter.items()):
                continue
            label = (query.start_ms if query.window is None
                     else window_floor(event.meter_time_in_millis, query.window, tz))
            group = tuple(fields.get(k) for k in query.group_by)
            out.setdefault((label, group), []).append(item)
        return out

    def ranked(self, query: Query, groups: dict[tuple[int, Group], list[ModelEvent]],
               ascending: bool) -> list[Group]:
        meter = self.meters[query.meter_api_name]
        totals: dict[Group, list[ModelEvent]] = {}
        for (_, group), items in groups.items():
            totals.setdefault(group, []).extend(items)
        sign = 1 if ascending else -1
        return sorted(totals, key=lambda g: (sign * aggregate(meter, totals[g]),
                                             group_order(g)))

    def query(self, query: Query) -> list[tuple[int, dict[str, Any], Any]]:
        meter = self.meters[query.meter_api_name]
        groups = self.groups(query)
        order = sorted(groups, key=lambda k: (k[0], group_order(k[1])))
        if query.take is not None:
            ranked = self.ranked(query, groups, query.take.ascending)
            rank = {g: i for i, g in enumerate(ranked[:query.take.limit])}
            order = sorted((k for k in groups if k[1] in rank), key=lambda k: (k[0], rank[k[1]]))
        return [(label, dict(zip(query.group_by, group, strict=True)),
                 aggregate(meter, groups[(label, group)])) for label, group in order]

    def page(self, query: Query, offset: int) -> tuple[list[Any], list[Any], int]:
        assert query.take is not None
        meter = self.meters[query.meter_api_name]
        groups = self.groups(query)
        ranked = self.ranked(query, groups, query.take.ascending)
        rank = {g: i for i, g in enumerate(ranked[offset:offset + query.take.limit])}
        rows = sorted((k for k in groups if k[1] in rank), key=lambda k: (k[0], rank[k[1]]))
        rest: dict[int, list[ModelEvent]] = {}
        for (label, group), items in groups.items():
            if group not in rank:
                rest.setdefault(label, []).extend(items)
        return ([(label, dict(zip(query.group_by, group, strict=True)),
                  aggregate(meter, groups[(label, group)])) for label, group in rows],
                [(label, aggregate(meter, rest[label])) for label in sorted(rest)],
                len(ranked))


@st.composite
def trait_sets(draw: Any) -> dict[str, str]:
    return draw(st.fixed_dictionaries({}, optional={
        key: st.sampled_from(values) for key, values in TRAITS.items()}))


@st.composite
def trait_queries(draw: Any, anchor_ms: int) -> Query:
    meter = draw(st.sampled_from(METERS))
    window = draw(st.sampled_from([None, "hour", "day"]))
    start = anchor_ms + draw(st.integers(-3 * DAY // HOUR, 2 * DAY // HOUR)) * HOUR
    end = start + draw(st.integers(0, 5 * DAY // HOUR)) * HOUR
    group_by = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=3))
    filters = draw(st.dictionaries(
        st.sampled_from(KEYS),
        st.lists(st.sampled_from(FILTER_VALUES), min_size=1, max_size=3, unique=True),
        max_size=2))
    take = draw(st.one_of(st.none(), st.builds(Take, limit=st.integers(1, 4),
                                                 ascending=st.booleans())))
    zone = draw(st.sampled_from(["UTC", *ZONES[1:3]]))
    return Query(meter_api_name=meter.name, start_ms=start, end_ms=end, window=window,
                 timezone=zone, group_by=group_by, filter=filters, take=take)


async def set_traits(eng: Any, model: TraitModel, customer_id: str,
                     traits: dict[str, str]) -> None:
    if customer_id in model.traits:
        await eng.update_customer(Customer(id=customer_id, traits=traits))
    else:  # new, known by usage only, or deleted: added (reinstated)
        await eng.add_customer(Customer(id=customer_id, traits=traits))
    model.traits[customer_id] = traits


async def delete(eng: Any, model: TraitModel, customer_id: str) -> None:
    await eng.delete_customer(customer_id)
    model.traits.pop(customer_id, None)  # hidden: its usage has no traits


async def check_queries(eng: Any, model: TraitModel, anchor: int, data: Any) -> None:
    meter = data.draw(st.sampled_from(METERS))
    every_trait = Query(meter_api_name=meter.name, start_ms=anchor - 3 * DAY,
                        end_ms=anchor + 3 * DAY, group_by=["customer.plan", "customer.tier"])
    for index in range(5):
        query = every_trait if index == 0 else data.draw(trait_queries(anchor))
        try:
            result = await eng.query(query)
        except InvalidQuery as exc:  # a window edge inside a minute (a zone's offset)
            assert "one-minute bucket" in str(exc)
            continue
        got = [(r.window_start_ms, r.group, r.value) for r in result.rows]
        assert got == model.query(query), query
        assert all(type(r.value) in (int, Decimal) for r in result.rows)
    query = data.draw(trait_queries(anchor))
    take = query.take or Take(limit=data.draw(st.integers(1, 3)))
    query = Query(meter_api_name=query.meter_api_name, start_ms=query.start_ms,
                  end_ms=query.end_ms, window=query.window, group_by=query.group_by,
                  filter=query.filter, take=take)
    offset = data.draw(st.integers(0, 3))
    page = await eng.query_page(query, offset=offset, other=True)
    rows, other, group_count = model.page(query, offset)
    assert [(r.window_start_ms, r.group, r.value) for r in page.result.rows] == rows, query
    assert page.other is not None
    assert [(r.window_start_ms, r.value) for r in page.other] == other, query
    assert page.group_count == group_count
    # The explorer's dimension listing takes trait keys too: usage per plan, best first.
    meter = data.draw(st.sampled_from(METERS))
    top = data.draw(st.integers(1, 3))
    (listed,) = await eng.dimensions(meter.name, anchor - 3 * DAY, anchor + 3 * DAY,
                                     top=top, keys=["customer.plan"])
    by_plan = Query(meter_api_name=meter.name, start_ms=anchor - 3 * DAY,
                    end_ms=anchor + 3 * DAY, group_by=["customer.plan"])
    groups = {key: items for key, items in model.groups(by_plan).items() if key[1][0] is not None}
    ranked = model.ranked(by_plan, groups, ascending=False)
    assert [(v.value, v.usage) for v in listed.values] == [
        (group[0], aggregate(meter, groups[(by_plan.start_ms, group)])) for group in ranked[:top]]
    assert listed.value_count == len(ranked)
    rest = [item for group in ranked[top:] for item in groups[(by_plan.start_ms, group)]]
    assert listed.other == (aggregate(meter, rest) if rest else None)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(anchor=st.sampled_from(ANCHORS_MS), shards=st.integers(1, 4), data=st.data())
async def test_trait_queries_match_model(anchor: int, shards: int, data: Any) -> None:
    model = TraitModel()
    async with open_engine(store=MemoryStore(), shards=shards,
                           clock_ms=lambda: anchor + 3 * DAY) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        for customer_id in data.draw(st.lists(st.sampled_from(CUSTOMERS), unique=True)):
            await set_traits(eng, model, customer_id, data.draw(trait_sets()))
        batches = data.draw(st.lists(st.lists(events(anchor), min_size=1, max_size=25),
                                     min_size=1, max_size=4))
        for batch in batches:
            ack = await eng.ingest(batch)
            assert (ack.accepted, ack.duplicates) == model.ingest(batch)
        await check_queries(eng, model, anchor, data)
        # Traits change: queries apply the latest, to all usage (past and new).
        for _ in range(data.draw(st.integers(1, 4))):
            known = sorted(model.traits)
            customer_id = data.draw(st.sampled_from(known if known and data.draw(st.booleans())
                                                    else CUSTOMERS))
            if data.draw(st.booleans()):
                await set_traits(eng, model, customer_id, data.draw(trait_sets()))
            else:
                await delete(eng, model, customer_id)
        extra = data.draw(st.lists(events(anchor), max_size=10))
        if extra:
            ack = await eng.ingest(extra)
            assert (ack.accepted, ack.duplicates) == model.ingest(extra)
        await check_queries(eng, model, anchor, data)

