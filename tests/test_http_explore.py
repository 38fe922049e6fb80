"""What the explorer reads: ``take.offset`` and the exact ``other`` row of ``/api/query``,
and ``GET /api/meters/{name}/dimensions``, against the Decimal model over head, deltas
and sealed blocks, and over HTTP against the engine's own answers."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine, Event, Meter, Query, Take, open_engine
from engine.auth import parse_keys
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR, MINUTE
from tests.helpers.strategies import CUSTOMERS, METERS, values
from tests.http_support import NOW, http, open_http, url
from tests.model import Model, ModelEvent, group_order

START_MS = 1_760_000_000_000 // DAY * DAY  # a UTC midnight
NOW_MS = START_MS + 7 * DAY
KEYS = parse_keys({"keys": [
    {"key": "admin-key", "scopes": ["admin", "ingest", "query"]},
    {"key": "acme-key", "scopes": ["query"], "customer_id": "acme"},
]})


@st.composite
def events(draw: Any, meters: list[Meter]) -> Event:
    meter = draw(st.sampled_from(meters))
    dims = draw(st.dictionaries(st.sampled_from(["region", "plan", "tier"]),
                                st.sampled_from(["eu", "us", "x", "y"]), max_size=2))
    if meter.unique_dimension:
        dims["user"] = draw(st.sampled_from(["u1", "u2", "u3", "u4"]))
    return Event(meter_api_name=meter.name, customer_id=draw(st.sampled_from(CUSTOMERS[:5])),
                 meter_value=draw(values),
                 # a few hours, head and sealed, so that groups share windows
                 meter_time_in_millis=NOW_MS - draw(st.sampled_from([1, 2, 30, 50])) * HOUR
                 - draw(st.integers(0, 3)) * MINUTE,
                 dimensions=dims)


def group_of(meter: Meter, event: Event, group_by: list[str]) -> tuple[Any, ...]:
    fields = {k: v for k, v in event.dimensions.items() if k != meter.unique_dimension}
    fields["customer_id"] = event.customer_id
    return tuple(fields.get(key) for key in group_by)


def model_rows(model: Model, keep: Any, query: Query) -> list[tuple[int, dict[str, Any], Any]]:
    """The model's answer to ``query`` over only the events ``keep`` says yes to."""
    part = Model(meters=model.meters, events=[
        ModelEvent(item.event, item.order) for item in model.events if keep(item.event)])
    return part.query(query)


def expected_page(model: Model, query: Query, offset: int
                  ) -> tuple[list[Any], list[Any], int]:
    """(rows, other rows, group count) of ``query_page(query, offset, other=True)``."""
    meter = model.meters[query.meter_api_name]
    assert query.take is not None
    whole = Query(meter_api_name=query.meter_api_name, start_ms=query.start_ms,
                  end_ms=query.end_ms, group_by=query.group_by, filter=query.filter)
    totals = {tuple(row[1][k] for k in query.group_by): row[2] for row in model.query(whole)}
    sign = 1 if query.take.ascending else -1
    ranked = sorted(totals, key=lambda g: (sign * totals[g], group_order(g)))
    page = ranked[offset:offset + query.take.limit]
    rank = {group: index for index, group in enumerate(page)}
    untaken = Query(meter_api_name=query.meter_api_name, start_ms=query.start_ms,
                    end_ms=query.end_ms, window=query.window, group_by=query.group_by,
                    filter=query.filter)
    rows = [row for row in model.query(untaken)
            if tuple(row[1][k] for k in query.group_by) in rank]
    rows.sort(key=lambda r: (r[0], rank[tuple(r[1][k] for k in query.group_by)]))
    rest = Query(meter_api_name=query.meter_api_name, start_ms=query.start_ms,
                 end_ms=query.end_ms, window=query.window, filter=query.filter)
    other = model_rows(model, lambda e: group_of(meter, e, query.group_by) not in rank, rest)
    return rows, other, len(ranked)


def expected_dimensions(model: Model, meter_name: str, start_ms: int, end_ms: int,
                        top: int) -> list[tuple[str, int, list[tuple[str, Any]], Any]]:
    meter = model.meters[meter_name]
    in_range = [item.event for item in model.events
                if item.event.meter_api_name == meter_name
                and start_ms <= item.event.meter_time_in_millis < end_ms]
    keys = sorted({k for e in in_range for k in e.dimensions} - {meter.unique_dimension})
    found = []
    for key in keys:
        rows = model.query(Query(meter_api_name=meter_name, start_ms=start_ms, end_ms=end_ms,
                                 group_by=[key]))
        usage = {row[1][key]: row[2] for row in rows if row[1][key] is not None}
        ranked = sorted(usage, key=lambda v: (-usage[v], v))
        rest = set(ranked[top:])
        other = model_rows(model, lambda e, key=key, rest=rest: e.dimensions.get(key) in rest,
                           Query(meter_api_name=meter_name, start_ms=start_ms, end_ms=end_ms))
        found.append((key, len(ranked), [(v, usage[v]) for v in ranked[:top]],
                      other[0][2] if other else None))
    return found


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shards=st.integers(1, 3), data=st.data())
async def test_pages_other_rows_and_dimensions_match_the_model(shards: int, data: Any) -> None:
    # One or two meters per example, so that groups share windows often.
    chosen = data.draw(st.lists(st.sampled_from(METERS), min_size=1, max_size=2,
                                unique_by=lambda m: m.name))
    first = data.draw(st.lists(events(chosen), min_size=1, max_size=40))
    late = data.draw(st.lists(events(chosen), max_size=15))
    model = Model(meters={m.name: m for m in METERS})
    async with open_engine(store=MemoryStore(), shards=shards, clock_ms=lambda: NOW_MS,
                           hot_window_ms=DAY) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest(first)
        model.ingest(first)
        await eng.snapshot()  # every day but today sealed into blocks
        await eng.ingest(late)  # late events into sealed days: deltas
        model.ingest(late)
        assert eng.statistics().sealed_before_ms > START_MS
        for _ in range(4):
            meter = data.draw(st.sampled_from(chosen))
            start = NOW_MS - data.draw(st.integers(0, 4 * 24)) * HOUR
            end = start + data.draw(st.integers(0, 5 * 24)) * HOUR
            query = Query(
                meter_api_name=meter.name, start_ms=start, end_ms=end,
                window=data.draw(st.sampled_from([None, "day", "hour"])),
                group_by=data.draw(st.sampled_from([["customer_id"], ["region"],
                                                    ["customer_id", "plan"]])),
                filter=data.draw(st.sampled_from([{}, {"tier": ["x", "y"]}])),
                take=Take(limit=data.draw(st.integers(1, 3)),
                          ascending=data.draw(st.booleans())))
            offset = data.draw(st.integers(0, 4))
            page = await eng.query_page(query, offset=offset, other=True)
            rows, other, group_count = expected_page(model, query, offset)
            assert [(r.window_start_ms, r.group, r.value) for r in page.result.rows] == rows
            assert [(r.window_start_ms, r.group, r.value) for r in page.other or []] == other
            assert page.group_count == group_count
            top = data.draw(st.integers(1, 3))
            found = await eng.dimensions(meter.name, start, end, top=top)
            assert [(d.key, d.value_count, [(v.value, v.usage) for v in d.values], d.other)
                    for d in found] == expected_dimensions(model, meter.name, start, end, top)


async def test_every_aggregation_on_a_fixed_dense_history() -> None:
    """A seeded history dense enough that every page leaves several groups per window
    to the other row, for every aggregation (the property test's lists are small)."""
    import random

    chooser = random.Random(12)
    model = Model(meters={m.name: m for m in METERS})

    def event(meter: Meter) -> Event:
        dims = {"region": chooser.choice(["eu", "us", "ap"]), "plan": chooser.choice("ab")}
        if meter.unique_dimension:
            dims["user"] = chooser.choice(["u1", "u2", "u3", "u4", "u5"])
        return Event(meter_api_name=meter.name, customer_id=chooser.choice(CUSTOMERS[:5]),
                     meter_value=chooser.choice([1, 7, -3, 10**20, 2.5]),
                     meter_time_in_millis=NOW_MS - chooser.choice([1, 2, 30, 50]) * HOUR
                     - chooser.randrange(3) * MINUTE, dimensions=dims)

    async with open_engine(store=MemoryStore(), shards=3, clock_ms=lambda: NOW_MS,
                           hot_window_ms=DAY) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        for _ in range(2):
            batch = [event(meter) for meter in METERS for _ in range(60)]
            await eng.ingest(batch)
            model.ingest(batch)
            await eng.snapshot()
        assert eng.statistics().block_count > 0
        for meter in METERS:
            for group_by, window in ((["customer_id"], "day"), (["region"], None),
                                     (["customer_id", "plan"], "hour")):
                query = Query(meter_api_name=meter.name, start_ms=NOW_MS - 3 * DAY,
                              end_ms=NOW_MS, window=window, group_by=group_by,
                              take=Take(limit=2))
                page = await eng.query_page(query, offset=1, other=True)
                rows, other, group_count = expected_page(model, query, 1)
                assert [(r.window_start_ms, r.group, r.value) for r in page.result.rows] == rows
                assert [(r.window_start_ms, r.group, r.value) for r in page.other or []] == other
                assert len(other) >= (1 if window is None else 2) and group_count >= 3
            found = await eng.dimensions(meter.name, NOW_MS - 3 * DAY, NOW_MS, top=1)
            assert [(d.key, d.value_count, [(v.value, v.usage) for v in d.values], d.other)
                    for d in found] == expected_dimensions(model, meter.name, NOW_MS - 3 * DAY,
                                                           NOW_MS, 1)
            assert [d.key for d in found] == ["plan", "region"]


async def test_query_page_without_take_is_the_query_and_other_is_empty(engine: Engine) -> None:
    await engine.define_meter(Meter(name="calls"))
    await engine.ingest([Event(meter_api_name="calls", customer_id=c, meter_value=v,
                               meter_time_in_millis=NOW - v * MINUTE)
                         for c, v in (("acme", 1), ("beta", 2), ("acme", 3))])
    query = Query(meter_api_name="calls", start_ms=NOW - DAY, end_ms=NOW + MINUTE,
                  window="minute", group_by=["customer_id"])
    page = await engine.query_page(query, other=True)
    assert page.result == await engine.query(query)
    assert page.other == [] and page.group_count == 2
    taken = Query(meter_api_name="calls", start_ms=NOW - DAY, end_ms=NOW + MINUTE,
                  group_by=["customer_id"], take=Take(limit=1))
    assert (await engine.query_page(taken)).result == await engine.query(taken)


async def loaded(engine: Engine) -> None:
    await engine.define_meter(Meter(name="api_calls", aggregation="sum"))
    await engine.define_meter(Meter(name="users", aggregation="unique_count",
                                    unique_dimension="user"))
    await engine.define_meter(Meter(name="empty"))
    batch = []
    for index in range(12):
        region = ["eu", "us", "ap"][index % 3]
        customer = "acme" if index < 5 else "beta"
        batch.append(Event(meter_api_name="api_calls", customer_id=customer,
                           meter_value=index + 1, meter_time_in_millis=NOW - index * HOUR,
                           dimensions={"region": region, "plan": f"p{index % 2}"}))
        batch.append(Event(meter_api_name="users", customer_id=customer, meter_value=1,
                           meter_time_in_millis=NOW - index * HOUR,
                           dimensions={"region": region, "user": f"u{index % 5}"}))
    await engine.ingest(batch)


async def test_dimensions_route(engine: Engine) -> None:
    await loaded(engine)
    async with open_http(engine, keys=KEYS) as server:
        admin = {"X-API-KEY": "admin-key"}
        route = url(server, "/api/meters/api_calls/dimensions")
        answer = await http("GET", route + "?top=2", headers=admin)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        today = NOW // DAY * DAY
        assert (body["startMs"], body["endMs"], body["top"]) == (today - 29 * DAY,
                                                                  today + DAY, 2)
        expected = await engine.dimensions("api_calls", today - 29 * DAY, today + DAY, top=2)
        assert [d["key"] for d in body["dimensions"]] == ["plan", "region"]
        assert body["keyCount"] == 2
        first = (await http("GET", route + "?maxKeys=1", headers=admin)).json()
        assert first["keyCount"] == 2 and [d["key"] for d in first["dimensions"]] == ["plan"]
        assert await engine.dimension_keys("api_calls", today - 29 * DAY,
                                           today + DAY) == ["plan", "region"]
        assert body["dimensions"] == [
            {"key": d.key, "valueCount": d.value_count, "other": d.other,
             "values": [{"value": v.value, "usage": v.usage} for v in d.values]}
            for d in expected]
        # region: eu 1+4+7+10=22, us 2+5+8+11=26, ap 3+6+9+12=30; the rest is eu.
        region = body["dimensions"][1]
        assert region == {"key": "region", "valueCount": 3, "other": 22, "values": [
            {"value": "ap", "usage": 30}, {"value": "us", "usage": 26}]}
        # unique_count: distinct users per region, and the exact distinct count of the rest
        users = (await http("GET", url(server, "/api/meters/users/dimensions/?top=1"),
                            headers=admin)).json()
        assert [d["key"] for d in users["dimensions"]] == ["region"]  # never "user"
        rest = await engine.query(Query(meter_api_name="users", start_ms=today - 29 * DAY,
                                        end_ms=today + DAY, filter={"region": ["eu", "us"]}))
        assert users["dimensions"][0]["other"] == rest.rows[0].value == 5
        # a range in the past holds nothing; an empty meter has no keys
        past = await http("GET", route + "?startMs=0&endMs=60000", headers=admin)
        assert past.json()["dimensions"] == []
        empty = await http("GET", url(server, "/api/meters/empty/dimensions"), headers=admin)
        assert empty.json()["dimensions"] == []
        # a customer-bound key sees its own customer's values only
        own = (await http("GET", route, headers={"X-API-KEY": "acme-key"})).json()
        region = own["dimensions"][1]
        assert region["values"] == [{"value": "us", "usage": 7}, {"value": "eu", "usage": 5},
                                    {"value": "ap", "usage": 3}]
        unknown = await http("GET", url(server, "/api/meters/nope/dimensions"), headers=admin)
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_meter"
        for bad in ("?top=0", "?top=x", "?startMs=-1", "?startMs=120000&endMs=60000",
                    "?top=100000", "?maxKeys=0", "?maxKeys=501"):
            refused = await http("GET", route + bad, headers=admin)
            assert refused.status_code == 400, (bad, refused.text)
            assert refused.json()["code"] == "invalid_query"
        assert (await http("GET", route)).status_code == 401


async def test_api_query_take_offset_and_other(engine: Engine) -> None:
    await loaded(engine)
    async with open_http(engine) as server:
        body: dict[str, Any] = {
            "meterApiName": "users", "startMs": NOW - DAY, "endMs": NOW + MINUTE,
            "window": "day", "groupBy": ["region"], "take": {"limit": 1, "offset": 1},
            "other": True}
        answer = await http("POST", url(server, "/api/query"), json=body)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        query = Query(meter_api_name="users", start_ms=NOW - DAY, end_ms=NOW + MINUTE,
                      window="day", group_by=["region"], take=Take(limit=1))
        page = await engine.query_page(query, offset=1, other=True)
        assert got["groupCount"] == page.group_count == 3 and got["offset"] == 1
        assert [(r["windowStartMs"], r["group"], r["value"]) for r in got["rows"]] == [
            (r.window_start_ms, r.group, r.value) for r in page.result.rows]
        assert [(r["windowStartMs"], r["group"], r["value"]) for r in got["other"]] == [
            (r.window_start_ms, r.group, r.value) for r in page.other or []]
        # each region holds four of u0..u4, any two together all five: the other row
        # counts the distinct users of the rest, not a sum of their counts
        (row,) = got["rows"]
        rest = [g for g in ("ap", "eu", "us") if g != row["group"]["region"]]
        for other_row in got["other"]:
            same = await engine.query(Query(
                meter_api_name="users", start_ms=other_row["windowStartMs"],
                end_ms=min(other_row["windowStartMs"] + DAY, NOW + MINUTE),
                filter={"region": rest}))
            assert other_row["group"] == {} and other_row["value"] == same.rows[0].value == 5
        plain = (await http("POST", url(server, "/api/query"), json={
            "meterApiName": "api_calls", "startMs": 0, "endMs": NOW + 1})).json()
        assert "other" not in plain and plain["groupCount"] == 1
        for bad in ({**body, "take": {"limit": 1, "offset": -1}},
                    {**body, "take": {"limit": 0}},
                    {"meterApiName": "users", "startMs": 0, "endMs": 1,
                     "take": {"limit": 1, "offset": "x"}}):
            refused = await http("POST", url(server, "/api/query"), json=bad)
            assert refused.status_code == 400, (bad, refused.text)
