"""The HTTP shell's Amberflo surface against a live server on 127.0.0.1 (port 0):
ingest (gzip, plain, one or many, dedup, all-or-nothing), usage reports, meters,
routing, size limits and auth. Answers are compared with the engine's own queries."""

from __future__ import annotations

import gzip
import json
from decimal import Decimal

import pytest
import trio

from engine import Engine, Event, Meter, Query
from engine.auth import parse_keys
from tests.http_support import NOW, http, open_http, raw_exchange, url

DAY_S = 86400
TODAY_S = NOW // 1000 - (NOW // 1000) % DAY_S  # 00:00Z of the engine clock's day
KEYS = parse_keys({"keys": [
    {"key": "admin-key", "scopes": ["admin", "ingest", "query"]},
    {"key": "reader", "scopes": ["query"]},
    {"key": "acme-key", "scopes": ["ingest", "query"], "customer_id": "acme"},
]})


def record(customer: str, value: object, day: int, unique: str | None = None,
           **dimensions: str) -> dict[str, object]:
    """A record ``day`` days before today (0 = today), at 01:00Z."""
    item: dict[str, object] = {
        "customerId": customer, "meterApiName": "api_calls", "meterValue": value,
        "meterTimeInMillis": (TODAY_S - day * DAY_S + 3600) * 1000}
    if unique is not None:
        item["uniqueId"] = unique
    if dimensions:
        item["dimensions"] = dimensions
    return item


async def total(engine: Engine, meter: str = "api_calls") -> object:
    result = await engine.query(Query(meter_api_name=meter, start_ms=0, end_ms=NOW + 60_000))
    return result.rows[0].value if result.rows else 0


@pytest.fixture
async def meters(engine: Engine) -> Engine:
    await engine.define_meter(Meter(name="api_calls", aggregation="sum"))
    return engine


async def test_health_routes_and_unknown_route(meters: Engine) -> None:
    async with open_http(meters) as server:
        for path in ("/healthz", "/healthz/", "/readyz", "/readyz/"):
            response = await http("GET", url(server, path))
            assert response.status_code == 200, path
        missing = await http("GET", url(server, "/nope"))
        assert missing.status_code == 404
        assert missing.json()["code"] == "not_found"
        wrong_method = await http("DELETE", url(server, "/ingest"))
        assert wrong_method.status_code == 405
        assert wrong_method.headers["allow"] == "POST"


async def test_ingest_plain_gzip_one_or_many_with_and_without_slash(meters: Engine) -> None:
    async with open_http(meters) as server:
        one = await http("POST", url(server, "/ingest"), json=record("acme", 1, 0, "u1"))
        assert (one.status_code, one.text) == (200, "1 records were ingested")
        many = [record("acme", 2, 0, "u2"), record("beta", 3, 1, "u3")]
        zipped = await http("POST", url(server, "/ingest/"), data=gzip.compress(
            json.dumps(many).encode()), headers={"Content-Encoding": "gzip",
                                                 "Content-Type": "application/json"})
        assert (zipped.status_code, zipped.text) == (200, "2 records were ingested")
        # A retry of the same records is absorbed: counted in the answer, applied once.
        again = await http("POST", url(server, "/ingest/"), json=many)
        assert (again.status_code, again.text) == (200, "2 records were ingested")
    assert await total(meters) == 6
    stats = meters.statistics()
    assert (stats.events_accepted, stats.events_duplicate) == (3, 2)


async def test_bad_records_are_named_by_index_and_nothing_is_applied(meters: Engine) -> None:
    async with open_http(meters) as server:
        body = [record("acme", 1, 0), {"meterApiName": "api_calls", "meterValue": 1},
                record("acme", "x", 0), {**record("acme", 1, 0), "meterApiName": "nope"}]
        response = await http("POST", url(server, "/ingest"), json=body)
        assert response.status_code == 400
        problems = {p["index"]: p["reason"] for p in response.json()["problems"]}
        assert sorted(problems) == [1, 2]  # undecodable records are reported first
        assert "customerId" in problems[1]
        unknown = await http("POST", url(server, "/ingest"), json=[body[0], body[3]])
        assert unknown.status_code == 400
        assert [p["index"] for p in unknown.json()["problems"]] == [1]
        assert "nope" in unknown.json()["problems"][0]["reason"]
        for garbage in (b"{", b"42", b"[1]"):
            refused = await http("POST", url(server, "/ingest"), data=garbage)
            assert refused.status_code == 400, garbage
        metrics = (await http("GET", url(server, "/metrics"))).text
        assert 'meter_events_rejected_total{reason="invalid_record"}' in metrics
    assert await total(meters) == 0


async def test_bodies_over_the_limit_get_413_before_being_read(meters: Engine) -> None:
    async with open_http(meters, max_body_bytes=64 * 1024) as server:
        assert server.port is not None
        # Announced too large: answered at once, though the body never comes.
        answer = await raw_exchange(server.port, (
            b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        # A gzip bomb: 64 MiB of zeros in ~64 KiB... refused while inflating.
        bomb = gzip.compress(b"[" + b" " * (50 * 1024 * 1024) + b"]", compresslevel=9)
        assert len(bomb) < 64 * 1024
        response = await http("POST", url(server, "/ingest"), data=bomb,
                              headers={"Content-Encoding": "gzip"})
        assert response.status_code == 413
        assert "inflated" in response.json()["error"]
        corrupt = await http("POST", url(server, "/ingest"), data=b"\x1f\x8bnot gzip",
                             headers={"Content-Encoding": "gzip"})
        assert corrupt.status_code == 400
    assert await total(meters) == 0


async def test_auth_keys_scopes_and_customer_bound_keys(meters: Engine) -> None:
    async with open_http(meters, keys=KEYS) as server:
        ingest = url(server, "/ingest")
        assert (await http("POST", ingest, json=record("acme", 1, 0))).status_code == 401
        wrong = await http("POST", ingest, json=record("acme", 1, 0),
                           headers={"X-API-KEY": "guess"})
        assert wrong.status_code == 401
        reader = await http("POST", ingest, json=record("acme", 1, 0),
                            headers={"X-API-KEY": "reader"})
        assert reader.status_code == 403
        ok = await http("POST", ingest, json=[record("acme", 1, 0), record("beta", 10, 0)],
                        headers={"Authorization": "Bearer admin-key"})
        assert ok.status_code == 200
        foreign = await http("POST", ingest, json=[record("acme", 1, 0), record("beta", 1, 0)],
                             headers={"X-API-KEY": "acme-key"})
        assert foreign.status_code == 403
        own = await http("POST", ingest, json=record("acme", 2, 0),
                         headers={"X-API-KEY": "acme-key"})
        assert own.status_code == 200
        query = usage_query(groupBy=["customerId"])
        seen = await http("POST", url(server, "/usage"), json=query,
                          headers={"X-API-KEY": "acme-key"})
        assert seen.status_code == 200
        groups = [m["group"]["groupInfo"] for m in seen.json()["clientMeters"]]
        assert groups == [{"customerId": "acme"}]
        other = await http("POST", url(server, "/usage"), json={
            **query, "filter": {"customerId": ["beta"]}}, headers={"X-API-KEY": "acme-key"})
        assert other.status_code == 403
        define = await http("POST", url(server, "/meters"), json={"meterApiName": "m2"},
                            headers={"X-API-KEY": "reader"})
        assert define.status_code == 403
        assert (await http("GET", url(server, "/healthz"))).status_code == 200
    assert await total(meters) == 13


async def test_any_key_or_none_is_accepted_without_keys(meters: Engine) -> None:
    async with open_http(meters) as server:
        for headers in ({}, {"X-API-KEY": "anything"}, {"Authorization": "Bearer x"}):
            response = await http("GET", url(server, "/meters"), headers=headers)
            assert response.status_code == 200


def usage_query(**extra: object) -> dict[str, object]:
    return {"meterApiName": "api_calls", "aggregation": "sum", "timeGroupingInterval": "day",
            "timeRange": {"startTimeInSeconds": TODAY_S - 2 * DAY_S + 60,
                          "endTimeInSeconds": NOW // 1000}, **extra}


async def test_usage_report_zero_filled_exact_ordered_and_taken(meters: Engine) -> None:
    await meters.ingest([Event(**_event(r)) for r in (
        record("acme", Decimal("0.1"), 2), record("acme", Decimal("0.2"), 0),
        record("beta", 4040, 1), record("beta", 19605, 0), record("gamma", 1, 0))])
    async with open_http(meters) as server:
        response = await http("POST", url(server, "/usage/"),
                              json=usage_query(groupBy=["customerId"]))
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["secondsSinceEpochIntervals"] == [
            TODAY_S - 2 * DAY_S, TODAY_S - DAY_S, TODAY_S]
        assert report["metadata"]["aggregation"] == "SUM"
        assert report["metadata"]["timeGroupingInterval"] == "DAY"
        customers = [m["group"]["groupInfo"]["customerId"] for m in report["clientMeters"]]
        assert customers == ["beta", "gamma", "acme"]  # by groupValue, descending
        beta = report["clientMeters"][0]
        assert beta["groupValue"] == 23645
        assert [v["value"] for v in beta["values"]] == [0, 4040, 19605]
        assert [v["percentageFromPrevious"] for v in beta["values"]] == pytest.approx(
            [0.0, 100.0, 385.2722772277228])
        # Exact decimals travel as JSON numbers, digit for digit (0.1 + 0.2 is 0.3).
        assert '"groupValue":0.3' in response.text
        taken = await http("POST", url(server, "/usage"), json=usage_query(
            groupBy=["customerId"], take={"limit": 2, "isAscending": True},
            aggregation="SUM", timeGroupingInterval="Day"))
        taken_customers = [m["group"]["groupInfo"]["customerId"]
                           for m in taken.json()["clientMeters"]]
        assert taken_customers == ["acme", "gamma"]
        whole = await http("POST", url(server, "/usage"), json=usage_query())
        (only,) = whole.json()["clientMeters"]
        assert only["group"] is None
        expected = await meters.query(Query(
            meter_api_name="api_calls", start_ms=(TODAY_S - 2 * DAY_S + 60) * 1000,
            end_ms=NOW))
        assert Decimal(str(only["groupValue"])) == expected.rows[0].value
        batch = await http("POST", url(server, "/usage/batch"), json=[
            usage_query(), usage_query(filter={"customerId": ["gamma"]})])
        assert [r["clientMeters"][0]["groupValue"] for r in batch.json()] == [
            only["groupValue"], 1]
        mismatch = await http("POST", url(server, "/usage"), json=usage_query(aggregation="MAX"))
        assert mismatch.status_code == 400
        assert "SUM" in mismatch.json()["error"]
        unknown = await http("POST", url(server, "/usage"), json=usage_query(
            meterApiName="nope"))
        assert unknown.status_code == 404
        bad = await http("POST", url(server, "/usage"), json=usage_query(
            timeGroupingInterval="fortnight"))
        assert bad.status_code == 400


def _event(item: dict[str, object]) -> dict[str, object]:
    return {"meter_api_name": item["meterApiName"], "customer_id": item["customerId"],
            "meter_value": item["meterValue"], "meter_time_in_millis": item["meterTimeInMillis"],
            "unique_id": item.get("uniqueId"), "dimensions": item.get("dimensions", {})}


async def test_usage_all_one_report_per_meter(meters: Engine) -> None:
    await meters.define_meter(Meter(name="peak", aggregation="max"))
    await meters.ingest([Event(**_event(record("acme", 5, 0))),
                         Event(**_event({**record("acme", 7, 1), "meterApiName": "peak"}))])
    async with open_http(meters) as server:
        response = await http("GET", url(server, "/usage/all"), params={
            "startTimeInSeconds": TODAY_S - 2 * DAY_S, "timeGroupingInterval": "DAY",
            "groupBy": "customerId", "customerId": "acme"})
        assert response.status_code == 200, response.text
        reports = {r["metadata"]["meterApiName"]: r for r in response.json()}
        assert set(reports) == {"api_calls", "peak"}
        assert reports["peak"]["metadata"]["aggregation"] == "MAX"
        assert reports["peak"]["clientMeters"][0]["groupValue"] == 7
        assert reports["api_calls"]["metadata"]["timeRange"]["endTimeInSeconds"] == NOW // 1000
        missing = await http("GET", url(server, "/usage/all"))
        assert missing.status_code == 400


async def test_meters_in_amberflo_shape(engine: Engine) -> None:
    async with open_http(engine) as server:
        created = await http("POST", url(server, "/meters"), json={
            "meterApiName": "calls", "label": "Calls", "meterType": "sum_of_all_usage"})
        assert created.status_code == 200, created.text
        assert created.json()["aggregation"] == "SUM"
        users = await http("POST", url(server, "/meters/"), json={
            "meterApiName": "users", "meterType": "ACTIVE_USERS",
            "aggregationDimensions": ["user"]})
        assert users.status_code == 200, users.text
        ours = await http("POST", url(server, "/meters"), json={
            "meterApiName": "peak", "aggregation": "Max"})
        assert ours.json()["meterType"] == "max"
        conflict = await http("POST", url(server, "/meters"), json={
            "meterApiName": "calls", "aggregation": "max"})
        assert conflict.status_code == 409
        bad_type = await http("POST", url(server, "/meters"), json={
            "meterApiName": "x", "meterType": "event_duration"})
        assert bad_type.status_code == 400
        listed = (await http("GET", url(server, "/meters"))).json()
        assert {m["meterApiName"]: m["meterType"] for m in listed} == {
            "calls": "sum_of_all_usage", "users": "active_users", "peak": "max"}
        one = (await http("GET", url(server, "/meters"), params={"meterApiName": "users"})).json()
        assert one[0]["aggregationDimensions"] == ["user"]
    assert {m.name: m.aggregation for m in engine.meters()} == {
        "calls": "sum", "users": "unique_count", "peak": "max"}


async def test_routes_answer_503_until_an_engine_is_attached(meters: Engine) -> None:
    async with open_http(None) as server:
        assert (await http("GET", url(server, "/healthz"))).status_code == 200
        waiting = await http("GET", url(server, "/readyz"))
        assert waiting.status_code == 503
        assert waiting.headers["retry-after"] == "1"
        assert (await http("POST", url(server, "/ingest"), json=[])).status_code == 503
        server.attach(meters)
        assert (await http("GET", url(server, "/readyz"))).status_code == 200
        await trio.sleep(0)


def test_interval_starts_are_utc_aligned_weeks_on_monday_months_on_the_first() -> None:
    from engine.http.amberflo import interval_starts, percentage_change

    # 2021-04-24T20:07:31Z to 2021-04-26T20:07:30Z: Amberflo's own example.
    assert interval_starts(1619294851, 1619467650, "day") == [1619222400, 1619308800, 1619395200]
    assert interval_starts(1619294851, 1619298000, "hour") == [1619294400, 1619298000]
    # Wednesday 2024-05-01 to Tuesday 2024-05-14: weeks of Monday 29 Apr, 6 May and 13 May.
    assert interval_starts(1714521600, 1715644800, "week") == [1714348800, 1714953600, 1715558400]
    # 2024-12-15 to 2025-02-01: December, January, February.
    assert interval_starts(1734220800, 1738368000, "month") == [1733011200, 1735689600, 1738368000]
    assert percentage_change(None, 5) == 0.0
    assert percentage_change(0, 5) == 100.0
    assert percentage_change(4040, 19605) == pytest.approx(385.2722772277228)
    assert percentage_change(Decimal("0.2"), Decimal("0.1")) == -50.0


async def test_a_body_that_does_not_arrive_in_time_gets_408(meters: Engine) -> None:
    async with open_http(meters, body_timeout_s=0.2) as server:
        assert server.port is not None
        answer = await raw_exchange(server.port, (
            b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n[{"))
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert await total(meters) == 0


async def test_bodies_wait_for_room_in_a_shared_request_budget(meters: Engine) -> None:
    from engine.server import ByteBudget

    budget = ByteBudget(1024 * 1024)
    budget.charge(budget.limit_bytes)  # as if the TCP server's requests held all of it
    async with open_http(meters, request_budget=budget) as server:
        answers: list[int] = []

        async def send() -> None:
            response = await http("POST", url(server, "/ingest"), json=record("acme", 1, 0))
            answers.append(response.status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with trio.fail_after(10):
                while not budget._queue:  # the request waits for room, its body unread
                    await trio.sleep(0.01)
            assert answers == []
            budget.release(budget.limit_bytes)
        assert answers == [200]
        assert budget.used_bytes == 0  # given back once answered
    assert await total(meters) == 1


async def test_a_unique_count_report_totals_distinct_values_over_the_range(
        engine: Engine) -> None:
    await engine.define_meter(Meter(name="users", aggregation="unique_count",
                                    unique_dimension="user"))
    await engine.ingest([
        Event(**_event({**record("acme", 1, day, user=user), "meterApiName": "users"}))
        for day, user in ((2, "a"), (0, "a"), (0, "b"))])
    async with open_http(engine) as server:
        response = await http("POST", url(server, "/usage"), json=usage_query(
            meterApiName="users", aggregation="UNIQUE_COUNT"))
        assert response.status_code == 200, response.text
        (only,) = response.json()["clientMeters"]
        assert [v["value"] for v in only["values"]] == [1, 0, 2]
        assert only["groupValue"] == 2  # a and b, not the 3 of the buckets added up

