"""Corrections over HTTP (``/api/corrections*``) against live servers: cancel by ids and by
filter, and amend, checked against a Decimal model of the live events (Hypothesis), the audit
list, the ``correct`` scope and customer-bound keys, and the refusals' statuses and
messages (the embedded call's)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import hypothesis
import trio
from hypothesis import strategies as st

from engine import Customer, Engine, Event, Meter, open_engine
from engine.auth import parse_keys
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR, MINUTE
from tests.http_support import NOW, http, open_http, url

KEYS = parse_keys({"keys": [
    {"key": "ops-key", "scopes": ["correct", "query"], "name": "ops"},
    {"key": "reader-key", "scopes": ["query"], "name": "reader"},
    {"key": "acme-key", "scopes": ["correct", "query"], "customer_id": "acme",
     "name": "acme's own"},
]})
METERS = [Meter(name="calls", aggregation="sum"), Meter(name="peak", aggregation="max"),
          Meter(name="hits", aggregation="count")]
CUSTOMERS = ("acme", "beta", "gamma")
REGIONS = ("eu", "us", "ap")
RANGE = {"startMs": NOW - 10 * DAY, "endMs": NOW + DAY}


async def post(server: Any, path: str, body: Any, key: str | None = "ops-key") -> Any:
    headers = {} if key is None else {"X-API-KEY": key}
    return await http("POST", url(server, path), json=body, headers=headers)


async def totals(server: Any, meter: str) -> dict[str, Decimal]:
    """The meter's value per customer over the whole range, read over HTTP."""
    response = await post(server, "/api/query", {"meterApiName": meter, **RANGE,
                                                 "groupBy": ["customer_id"]})
    assert response.status_code == 200, response.text
    rows = response.json(parse_float=Decimal)["rows"]
    return {row["group"]["customer_id"]: Decimal(row["value"]) for row in rows}


def model_totals(live: list[tuple[Event, int]], meter: Meter) -> dict[str, Decimal]:
    by_customer: dict[str, list[Decimal]] = {}
    for event, _ in live:
        if event.meter_api_name == meter.name:
            by_customer.setdefault(event.customer_id, []).append(Decimal(event.meter_value))
    combine: Callable[[list[Decimal]], Decimal] = {
        "sum": lambda values: sum(values, Decimal(0)), "max": max,
        "count": lambda values: Decimal(len(values))}[meter.aggregation]
    return {customer: combine(values) for customer, values in by_customer.items()}


def matches(event: Event, received_ms: int, where: dict[str, Any]) -> bool:
    """The model of a cancel-where body: every condition a plain comparison."""
    if event.meter_api_name != where["meterApiName"]:
        return False
    if where["customerId"] is not None and event.customer_id != where["customerId"]:
        return False
    if not where["startMs"] <= event.meter_time_in_millis < where["endMs"]:
        return False
    if "receivedStartMs" in where and received_ms < where["receivedStartMs"]:
        return False
    if "receivedEndMs" in where and received_ms >= where["receivedEndMs"]:
        return False
    for key, allowed in where.get("dimensions", {}).items():
        value = event.customer_id if key == "customer_id" else event.dimensions.get(key)
        if value not in allowed:
            return False
    return True


# ----------------------------------------------------------------- the model test

ROUNDS = 3  # ingest rounds, each received one hour after the one before
# Event times span the 36 hours before NOW: all in the head (sealed days are refused by the
# engine today, tests/test_corrections.py).
SPAN_MINUTES = 36 * 60
event_strategy = st.builds(
    lambda meter, customer, value, minutes, region, round_: (meter, customer, value, minutes,
                                                             region, round_),
    st.sampled_from([m.name for m in METERS]), st.sampled_from(CUSTOMERS),
    st.integers(1, 1000), st.integers(0, SPAN_MINUTES), st.sampled_from(REGIONS),
    st.integers(0, ROUNDS - 1))
def ordered(where: dict[str, Any], low: str, high: str) -> dict[str, Any]:
    """``where`` with its ``low`` bound at most its ``high`` one (a reversed range is a 400,
    tested on its own)."""
    if low in where and high in where and where[low] > where[high]:
        return {**where, low: where[high], high: where[low]}
    return where


# Bounds near the span's ends are likelier, so ranges are often wide (and hold events).
bound_strategy = st.one_of(st.integers(0, SPAN_MINUTES + 1), st.integers(0, 60),
                           st.integers(SPAN_MINUTES - 60, SPAN_MINUTES + 1)).map(
    lambda minutes: NOW - minutes * MINUTE)
where_strategy = st.fixed_dictionaries(
    {"meterApiName": st.sampled_from([m.name for m in METERS]),
     "customerId": st.none() | st.sampled_from(CUSTOMERS),
     "startMs": bound_strategy, "endMs": bound_strategy,
     "dimensions": st.fixed_dictionaries({}, optional={
         "region": st.lists(st.sampled_from(REGIONS), min_size=1, max_size=2, unique=True),
         "customer_id": st.lists(st.sampled_from(CUSTOMERS), min_size=1, max_size=2,
                                 unique=True)})},
    optional={"receivedStartMs": st.integers(0, ROUNDS).map(lambda r: NOW + r * HOUR),
              "receivedEndMs": st.integers(0, ROUNDS).map(lambda r: NOW + r * HOUR)},
).map(lambda where: ordered(ordered(where, "startMs", "endMs"), "receivedStartMs",
                                 "receivedEndMs"))


# Each example starts an engine and a server: few examples, and no shrinking (which would
# take minutes; the failing example is printed as generated).
@hypothesis.settings(max_examples=10, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow],
                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
@hypothesis.given(
    raw_events=st.lists(event_strategy, min_size=30, max_size=120),
    steps=st.lists(st.one_of(
        where_strategy, where_strategy,  # twice as likely as each other step
        st.tuples(st.integers(0, 59), st.sets(st.integers(0, 59))),  # cancel by these ids
        # amend e-N: its new value and event time (minutes before NOW)
        st.tuples(st.just("amend"), st.integers(0, 59), st.integers(1, 1000),
                  st.integers(0, SPAN_MINUTES))),
        min_size=1, max_size=5))
def test_cancels_over_http_leave_the_models_live_events(
        raw_events: list[tuple[Any, ...]], steps: list[Any]) -> None:
    trio.run(_cancels_against_the_model, raw_events, steps)


async def _cancels_against_the_model(raw_events: list[tuple[Any, ...]],
                                     steps: list[Any]) -> None:
    clock = [NOW]
    live: list[tuple[Event, int]] = []
    cancelled_counts: list[int] = []
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: clock[0]) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        for round_ in range(ROUNDS):
            clock[0] = NOW + round_ * HOUR
            batch = [Event(meter_api_name=meter, customer_id=customer, meter_value=value,
                           meter_time_in_millis=NOW - minutes * MINUTE,
                           dimensions={"region": region}, unique_id=f"e-{index}")
                     for index, (meter, customer, value, minutes, region, r)
                     in enumerate(raw_events) if r == round_]
            if batch:
                await eng.ingest(batch)
                live.extend((event, clock[0]) for event in batch)
        clock[0] = NOW + ROUNDS * HOUR
        async with open_http(eng, keys=KEYS, clock_ms=lambda: clock[0]) as server:
            for step in steps:
                if isinstance(step, dict):
                    response = await post(server, "/api/corrections/cancel-where", step)
                    gone = [pair for pair in live if matches(*pair, step)]
                    meter = step["meterApiName"]
                    if gone and step["dimensions"]:
                        unfiltered = {**step, "dimensions": {}}
                        hypothesis.event("a filter left some events of the range" if any(
                            matches(*pair, unfiltered) and pair not in gone for pair in live)
                            else "a filter took all of the range")
                elif step[0] == "amend":
                    _, number, value, minutes = step
                    number %= len(raw_events)  # an event ingested, maybe cancelled since
                    found = [(event, received) for event, received in live
                             if event.unique_id == f"e-{number}"]
                    original = found[0][0] if found else Event(
                        meter_api_name="calls", customer_id="acme", meter_value=1,
                        meter_time_in_millis=NOW, unique_id=f"e-{number}")
                    meter = original.meter_api_name
                    response = await post(server, "/api/corrections/amend", {
                        "meterApiName": meter, "customerId": original.customer_id,
                        "uniqueId": original.unique_id, "event": {
                            "meterValue": value, "meterTimeInMillis": NOW - minutes * MINUTE,
                            "dimensions": {"region": "ap"}}})
                    if not found:  # never ingested, or cancelled before
                        assert response.status_code == 400, response.text
                        assert "no live event" in response.json()["error"]
                        cancelled_counts.append(0)
                        continue
                    assert response.status_code == 200, (step, response.text)
                    assert response.json()["accepted"] == 1
                    amended = Event(meter_api_name=meter, customer_id=original.customer_id,
                                    meter_value=value, meter_time_in_millis=NOW - minutes * MINUTE,
                                    dimensions={"region": "ap"}, unique_id=original.unique_id)
                    # The corrected event is received when the amend is made.
                    live = [pair for pair in live if pair not in found] + [(amended, clock[0])]
                    cancelled_counts.append(1)
                    hypothesis.event("an amend applied")
                    for each in METERS:
                        assert await totals(server, each.name) == model_totals(live, each), (
                            step, each.name)
                    continue
                else:
                    first, numbers = step
                    # The meter and customer of an event ingested; ids mostly ingested (of
                    # this customer and meter or others), some never.
                    first %= len(raw_events)
                    meter, customer = raw_events[first][:2]
                    ids = sorted({f"e-{first}"} | {f"e-{n % (len(raw_events) + 3)}"
                                                   for n in numbers})
                    response = await post(server, "/api/corrections/cancel", {
                        "meterApiName": meter, "customerId": customer, "uniqueIds": ids})
                    gone = [(event, received) for event, received in live
                            if event.meter_api_name == meter and event.customer_id == customer
                            and event.unique_id in ids]
                assert response.status_code == 200, (step, response.text)
                assert response.json() == {"cancelled": len(gone)}, step
                hypothesis.event("a cancel took events" if gone else "a cancel took none")
                live = [pair for pair in live if pair not in gone]
                cancelled_counts.append(len(gone))
                for each in METERS:
                    assert await totals(server, each.name) == model_totals(live, each), (
                        step, each.name)
            listed = (await http("GET", url(server, "/api/corrections"),
                                 headers={"X-API-KEY": "reader-key"})).json()["corrections"]
    # A cancel that matched nothing logs no correction; each other one is listed.
    assert [c["cancelled"] for c in listed] == [n for n in cancelled_counts if n]
    assert all(c["by"] == "ops" for c in listed)


# -------------------------------------------------------------- amend and the list


async def test_amend_and_the_audit_list(engine: Engine) -> None:
    for meter in METERS:
        await engine.define_meter(meter)
    await engine.ingest([
        Event(meter_api_name="peak", customer_id=customer, meter_value=value,
              meter_time_in_millis=NOW - value * MINUTE, dimensions={"region": "eu"},
              unique_id=f"{customer}-{value}")
        for customer in ("acme", "beta") for value in (5, 40)])
    async with open_http(engine, keys=KEYS) as server:
        response = await post(server, "/api/corrections/amend", {
            "meterApiName": "peak", "customerId": "acme", "uniqueId": "acme-40",
            "event": {"meterValue": "2.5", "meterTimeInMillis": NOW - 40 * MINUTE,
                      "dimensions": {"region": "us"}}}, key="acme-key")
        assert response.status_code == 200, response.text
        answer = response.json()
        assert (answer["accepted"], answer["duplicates"]) == (1, 0) and answer["lsn"] > 0
        assert await totals(server, "peak") == {"acme": 5, "beta": 40}
        response = await post(server, "/api/corrections/cancel", {
            "meterApiName": "peak", "customerId": "acme", "uniqueIds": ["acme-5", "nope"]})
        assert response.json() == {"cancelled": 1}
        assert await totals(server, "peak") == {"acme": Decimal("2.5"), "beta": 40}
        response = await post(server, "/api/corrections/cancel-where", {
            "meterApiName": "peak", "customerId": None, "startMs": NOW - 41 * MINUTE,
            "endMs": NOW - 39 * MINUTE, "dimensions": {"region": ["eu"]}})
        assert response.json() == {"cancelled": 1}  # beta's; acme's is in "us" now
        assert await totals(server, "peak") == {"acme": Decimal("2.5"), "beta": 5}

        async def listed(key: str, **params: str) -> list[Any]:
            answer = await http("GET", url(server, "/api/corrections"), params=params,
                                headers={"X-API-KEY": key})
            assert answer.status_code == 200, answer.text
            return list(answer.json()["corrections"])

        everything = await listed("reader-key")
        assert [(c["kind"], c["customerId"], c["by"], c["cancelled"]) for c in everything] == [
            ("amend", "acme", "acme's own", 1), ("cancel", "acme", "ops", 1),
            ("cancel_where", None, "ops", 1)]
        assert everything[0]["amended"] == {
            "meterApiName": "peak", "customerId": "acme", "meterValue": 2.5,
            "meterTimeInMillis": NOW - 40 * MINUTE, "dimensions": {"region": "us"},
            "uniqueId": "acme-40"}
        assert [c["lsn"] for c in everything] == sorted(c["lsn"] for c in everything)
        assert all(c["receivedMs"] == NOW for c in everything)
        assert "end_ms=" in everything[2]["description"]
        # Every customer's correction is listed for each customer, but not to a bound key.
        assert await listed("reader-key", customerId="beta") == everything[2:]
        assert await listed("reader-key", meterApiName="calls") == []
        assert await listed("acme-key") == everything[:2]
        assert await listed("acme-key", customerId="acme") == everything[:2]
        # The corrections are the engine's own list.
        assert [c.lsn for c in await engine.corrections()] == [c["lsn"] for c in everything]


# ---------------------------------------------------------------- scopes and refusals


async def test_scopes_bound_keys_and_refusals_name_what_is_wrong() -> None:
    clock = [NOW]
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: clock[0],
                           raw_retention_ms=DAY) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.ingest([Event(meter_api_name="calls", customer_id=customer, meter_value=1,
                                meter_time_in_millis=NOW - MINUTE, unique_id=f"{customer}-1")
                          for customer in CUSTOMERS])
        async with open_http(eng, keys=KEYS, clock_ms=lambda: clock[0]) as server:

            async def refused(path: str, body: Any, key: str | None = "ops-key"
                              ) -> tuple[int, str, str]:
                response = await post(server, path, body, key)
                answer = response.json()
                return response.status_code, answer["code"], answer["error"]

            cancel = {"meterApiName": "calls", "customerId": "beta", "uniqueIds": ["beta-1"]}
            where = {"meterApiName": "calls", "customerId": "beta", "startMs": 0,
                     "endMs": NOW + 1}
            amend = {"meterApiName": "calls", "customerId": "beta", "uniqueId": "beta-1",
                     "event": {"meterValue": 3, "meterTimeInMillis": NOW - MINUTE}}
            paths = {"/api/corrections/cancel": cancel,
                     "/api/corrections/cancel-where": where,
                     "/api/corrections/amend": amend}
            for path, body in paths.items():
                # No key, a key without the correct scope, a key bound to another customer.
                assert (await refused(path, body, None))[0] == 401
                assert (await refused(path, body, "reader-key"))[:2] == (403, "forbidden")
                status, code, error = await refused(path, body, "acme-key")
                assert (status, code) == (403, "forbidden") and "own customer" in error
                # An unknown meter is a 404 naming it.
                status, code, error = await refused(path, {**body, "meterApiName": "nope"})
                assert (status, code) == (404, "unknown_meter") and "'nope'" in error, path
                # A missing field is a 400 naming it.
                status, _, error = await refused(path, {k: v for k, v in body.items()
                                                        if k != "customerId"})
                assert status == 400 and "customerId" in error, (path, error)
            # A customer-bound key may not cancel across every customer.
            assert (await refused("/api/corrections/cancel-where",
                                  {**where, "customerId": None}, "acme-key"))[0] == 403
            # Bad ranges.
            status, _, error = await refused("/api/corrections/cancel-where",
                                             {**where, "startMs": NOW, "endMs": NOW - 1})
            assert status == 400 and "start_ms" in error and "after" in error
            status, _, error = await refused("/api/corrections/cancel-where", {
                **where, "receivedStartMs": NOW, "receivedEndMs": NOW - 1})
            assert status == 400 and "receivedStartMs" in error
            status, _, error = await refused("/api/corrections/cancel-where",
                                             {**where, "startMs": "yesterday"})
            assert status == 400 and "startMs" in error
            # An amend must keep its meter, customer and unique id, and name a live event.
            status, _, error = await refused("/api/corrections/amend", {
                **amend, "event": {**amend["event"], "customerId": "gamma"}})
            assert status == 400 and "keep its meter, customer and unique id" in error
            status, _, error = await refused("/api/corrections/amend",
                                             {**amend, "uniqueId": "missing"})
            assert status == 400 and "no live event" in error
            # Nothing above changed anything.
            assert await totals(server, "calls") == dict.fromkeys(CUSTOMERS, 1)
            assert await eng.corrections() == []
            # The bound key corrects its own customer.
            response = await post(server, "/api/corrections/cancel", {
                **cancel, "customerId": "acme", "uniqueIds": ["acme-1"]}, "acme-key")
            assert response.json() == {"cancelled": 1}
            # The log is trimmed past the retention: a range reaching before it is refused
            # whole, naming the oldest time a correction can reach.
            # (the log is trimmed through a checkpoint older than the retention).
            await eng.snapshot()
            clock[0] = NOW + 3 * DAY
            await eng.ingest([Event(meter_api_name="calls", customer_id="beta", meter_value=7,
                                    meter_time_in_millis=NOW, unique_id="beta-2")])
            await eng.snapshot()
            status, _, error = await refused("/api/corrections/cancel-where", {
                **where, "endMs": clock[0] + 1})
            assert status == 400 and "oldest time a correction can reach" in error, error
            assert await totals(server, "calls") == {"beta": 8, "gamma": 1}


async def test_a_trait_filter_is_refused_not_silently_matched_against_nothing() -> None:
    """A query's ``customer.NAME`` filter resolves the customer registry; the embedded
    ``cancel_where`` does not (it would cancel nothing), so the route refuses it."""
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(METERS[0])
        await eng.add_customer(Customer(id="acme", traits={"plan": "pro"}))
        await eng.ingest([Event(meter_api_name="calls", customer_id=customer, meter_value=1,
                                meter_time_in_millis=NOW - MINUTE) for customer in CUSTOMERS])
        async with open_http(eng, keys=KEYS) as server:
            query = await post(server, "/api/query", {
                "meterApiName": "calls", **RANGE, "filter": {"customer.plan": ["pro"]}})
            assert [row["value"] for row in query.json()["rows"]] == [1]  # acme's
            response = await post(server, "/api/corrections/cancel-where", {
                "meterApiName": "calls", "customerId": None, **RANGE,
                "dimensions": {"customer.plan": ["pro"], "region": ["eu"]}})
            assert response.status_code == 400
            assert "customer.plan" in response.json()["error"]
            assert await totals(server, "calls") == dict.fromkeys(CUSTOMERS, 1)


async def test_the_openapi_examples_of_the_correction_routes_do_what_they_say(
        engine: Engine) -> None:
    """The OpenAPI document's request examples of the correction routes (schemathesis
    sends them among its cases in tests/test_http_native.py, which runs every route of the
    document against a live server) do what they say."""
    # The examples name these events.
    await engine.define_meter(Meter(name="api_calls"))
    await engine.ingest([Event(meter_api_name="api_calls", customer_id=customer, meter_value=1,
                               meter_time_in_millis=NOW - MINUTE * (1 + n),
                               dimensions={"region": "eu"}, unique_id=f"e-{n}")
                         for n, customer in enumerate(["acme"] * 4 + ["beta"])])
    async with open_http(engine) as server:
        document = (await http("GET", url(server, "/openapi.json"))).json()
        document["paths"] = {path: item for path, item in document["paths"].items()
                             if path.startswith("/api/corrections")}
        assert len(document["paths"]) == 4
        answers = {}
        for path, item in document["paths"].items():
            if "post" in item:
                example = item["post"]["requestBody"]["content"]["application/json"]["example"]
                response = await post(server, path, example, key=None)
                assert response.status_code == 200, (path, response.text)
                answers[path.rpartition("/")[2]] = response.json()
        assert answers["cancel"] == {"cancelled": 2}  # e-1 and e-2
        assert answers["amend"]["accepted"] == 1  # e-3
        assert answers["cancel-where"] == {"cancelled": 1}  # beta's e-4
        assert await totals(server, "api_calls") == {"acme": Decimal("3.5")}  # e-0 + 2.5


async def test_the_received_range_picks_a_bugs_window_in_ingest_time() -> None:
    """Events of the same event times, received before, during and after a bug: a
    cancel-where by received time takes only those received during it."""
    clock = [NOW]
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: clock[0]) as eng:
        await eng.define_meter(METERS[0])
        for hour, value in enumerate((1, 10, 100)):
            clock[0] = NOW + hour * HOUR
            await eng.ingest([Event(meter_api_name="calls", customer_id=customer,
                                    meter_value=value, meter_time_in_millis=NOW - MINUTE,
                                    unique_id=f"{customer}-{hour}")
                              for customer in ("acme", "beta")])
        async with open_http(eng, keys=KEYS, clock_ms=lambda: clock[0]) as server:
            response = await post(server, "/api/corrections/cancel-where", {
                "meterApiName": "calls", "customerId": None, "startMs": NOW - HOUR,
                "endMs": NOW, "receivedStartMs": NOW + HOUR, "receivedEndMs": NOW + 2 * HOUR})
            assert response.json() == {"cancelled": 2}
            assert await totals(server, "calls") == {"acme": 101, "beta": 101}
            # Only a start: everything received from then on (what is left of it).
            response = await post(server, "/api/corrections/cancel-where", {
                "meterApiName": "calls", "customerId": "beta", "startMs": NOW - HOUR,
                "endMs": NOW, "receivedStartMs": NOW + HOUR})
            assert response.json() == {"cancelled": 1}
            assert await totals(server, "calls") == {"acme": 101, "beta": 1}
