"""Customer traits in queries (``customer.NAME``) and the refusal of ``customer.*``
dimension keys on ingest: embedded, over TCP and over HTTP; replay of records logged
before the refusal; deleted customers; trait changes between queries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import (
    BatchRejected,
    Customer,
    Engine,
    Event,
    InvalidQuery,
    Meter,
    Query,
    Take,
    open_engine,
)
from engine.client import open_client
from engine.domain import batch as batch_module
from engine.storage.memory import MemoryStore
from tests.conftest import HOST
from tests.http_support import NOW, http, open_http, url


def usage(customer_id: str, value: int = 1, meter: str = "calls",
          **dimensions: str) -> Event:
    return Event(meter_api_name=meter, customer_id=customer_id, meter_value=value,
                 meter_time_in_millis=NOW - 1_000, dimensions=dimensions)


def over(meter: str = "calls", **fields: Any) -> Query:
    return Query(meter_api_name=meter, start_ms=NOW - 60_000, end_ms=NOW + 60_000, **fields)


def rows(result: Any) -> list[tuple[dict[str, Any], Any]]:
    return [(row.group, row.value) for row in result.rows]


async def setup(eng: Engine) -> None:
    await eng.define_meter(Meter(name="calls"))
    await eng.define_meter(Meter(name="users", aggregation="unique_count",
                                 unique_dimension="user"))
    await eng.add_customer(Customer(id="acme", traits={"plan": "pro", "tier": "gold"}))
    await eng.add_customer(Customer(id="beta", traits={"plan": "pro"}))
    await eng.add_customer(Customer(id="gamma", traits={"plan": "free"}))
    await eng.ingest([usage("acme", 1, region="eu"), usage("beta", 2, region="us"),
                      usage("gamma", 4, region="eu"), usage("walk-in", 8, region="eu"),
                      usage("acme", 16, region="us")])
    await eng.ingest([usage(cid, 1, "users", user=user) for cid, user in (
        ("acme", "u1"), ("acme", "u2"), ("beta", "u1"), ("beta", "u3"), ("gamma", "u1"))])


async def test_group_by_and_filter_on_traits_with_dimensions_and_take() -> None:
    async with open_engine(store=MemoryStore(), shards=3, clock_ms=lambda: NOW) as eng:
        await setup(eng)
        assert rows(await eng.query(over(group_by=["customer.plan"]))) == [
            ({"customer.plan": None}, 8), ({"customer.plan": "free"}, 4),
            ({"customer.plan": "pro"}, 19)]
        assert rows(await eng.query(over(group_by=["region", "customer.plan"]))) == [
            ({"region": "eu", "customer.plan": None}, 8),
            ({"region": "eu", "customer.plan": "free"}, 4),
            ({"region": "eu", "customer.plan": "pro"}, 1),
            ({"region": "us", "customer.plan": "pro"}, 18)]
        assert rows(await eng.query(over(filter={"customer.plan": ["pro"]},
                                         group_by=["customer_id"]))) == [
            ({"customer_id": "acme"}, 17), ({"customer_id": "beta"}, 2)]
        # Filters intersect: a trait with a dimension and with customer ids.
        assert rows(await eng.query(over(filter={"customer.plan": ["pro"],
                                                 "region": ["us"]}))) == [({}, 18)]
        assert rows(await eng.query(over(filter={"customer.plan": ["pro"],
                                                 "customer_id": ["beta", "gamma"]}))) == [
            ({}, 2)]
        assert rows(await eng.query(over(filter={"customer.tier": ["gold"]},
                                         group_by=["customer.plan"]))) == [
            ({"customer.plan": "pro"}, 17)]
        # A customer without the trait matches no value, not even "".
        assert rows(await eng.query(over(filter={"customer.tier": ["", "silver"]}))) == []
        assert rows(await eng.query(over(group_by=["customer.plan"],
                                         take=Take(limit=1, ascending=True)))) == [
            ({"customer.plan": "free"}, 4)]
        # unique_count: distinct users over the plan's customers together (u1 counts once).
        assert rows(await eng.query(over("users", group_by=["customer.plan"]))) == [
            ({"customer.plan": "free"}, 1), ({"customer.plan": "pro"}, 3)]
        page = await eng.query_page(over("users", group_by=["customer.plan"],
                                         take=Take(limit=1)), other=True)
        assert rows(page.result) == [({"customer.plan": "pro"}, 3)]
        assert [row.value for row in page.other or []] == [1]
        (plans,) = await eng.dimensions("calls", NOW - 60_000, NOW + 60_000, top=1,
                                        keys=["customer.plan"])
        assert (plans.value_count, [(v.value, v.usage) for v in plans.values], plans.other) == (
            2, [("pro", 19)], 4)
        with pytest.raises(InvalidQuery, match="names no trait"):
            await eng.query(over(group_by=["customer."]))


async def test_traits_are_resolved_at_query_time_and_deleted_customers_have_none() -> None:
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: NOW) as eng:
        await setup(eng)
        await eng.update_customer(Customer(id="gamma", traits={"plan": "pro"}))
        await eng.add_customer(Customer(id="walk-in", traits={"plan": "free"}))
        assert rows(await eng.query(over(group_by=["customer.plan"]))) == [
            ({"customer.plan": "free"}, 8), ({"customer.plan": "pro"}, 23)]
        # Deleted: still metered and counted, but its traits are unknown.
        assert await eng.delete_customer("acme") is not None
        await eng.ingest([usage("acme", 32)])
        assert rows(await eng.query(over(group_by=["customer.plan"]))) == [
            ({"customer.plan": None}, 49), ({"customer.plan": "free"}, 8),
            ({"customer.plan": "pro"}, 6)]
        assert rows(await eng.query(over(filter={"customer.plan": ["pro"]}))) == [({}, 6)]
        # Reinstated with a new record: its traits apply again, to all its usage.
        await eng.add_customer(Customer(id="acme", traits={"plan": "free"}))
        assert rows(await eng.query(over(group_by=["customer.plan"]))) == [
            ({"customer.plan": "free"}, 57), ({"customer.plan": "pro"}, 6)]


async def test_ingest_refuses_customer_keys_naming_the_event_and_key() -> None:
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls"))
        for _ in range(2):  # the second time through the checked-dimension memo
            with pytest.raises(BatchRejected) as refused:
                await eng.ingest([usage("acme", region="eu"),
                                  usage("acme", **{"customer.plan": "pro"})])
            assert refused.value.problems[0].index == 1
            assert "event 1: dimension key 'customer.plan' starts with 'customer.'" in str(
                refused.value)
        await eng.ingest([usage("acme", region="eu"), usage("acme", customer_plan="x",
                                                            customers="y")])
        assert rows(await eng.query(over())) == [({}, 2)]


async def test_records_logged_with_customer_keys_still_replay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    async with open_engine(data, shards=2, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls"))
        await eng.add_customer(Customer(id="acme", traits={"plan": "pro"}))
        # As an earlier version logged them, before the refusal.
        with monkeypatch.context() as patched:
            patched.setattr(batch_module, "RESERVED_DIMENSION_PREFIX", "\x01unused")
            await eng.ingest([usage("acme", 1, **{"customer.plan": "old", "region": "eu"}),
                              usage("beta", 2, **{"customer.plan": "old"})])
    for snapshot_on_close in (False, True):  # from the WAL, then from a snapshot
        async with open_engine(data, shards=2, clock_ms=lambda: NOW,
                               snapshot_on_close=snapshot_on_close) as eng:
            assert rows(await eng.query(over())) == [({}, 3)]
            assert rows(await eng.query(over(group_by=["region"]))) == [
                ({"region": None}, 2), ({"region": "eu"}, 1)]
            # customer.plan is the trait, never the old dimension.
            assert rows(await eng.query(over(group_by=["customer.plan"]))) == [
                ({"customer.plan": None}, 2), ({"customer.plan": "pro"}, 1)]
            with pytest.raises(BatchRejected, match=r"customer\.plan"):
                await eng.ingest([usage("acme", **{"customer.plan": "new"})])


async def test_over_tcp_traits_query_and_the_refusal(engine: Engine, serving: Any) -> None:
    await setup(engine)
    async with serving(engine) as server, open_client(HOST, server.port) as client:
        result = await client.query(over(group_by=["customer.plan", "region"],
                                         filter={"customer.plan": ["pro", "free"]}))
        assert rows(result) == [
            ({"customer.plan": "free", "region": "eu"}, 4),
            ({"customer.plan": "pro", "region": "eu"}, 1),
            ({"customer.plan": "pro", "region": "us"}, 18)]
        with pytest.raises(BatchRejected, match=r"'customer\.x' starts with 'customer\.'"):
            await client.ingest([usage("acme", **{"customer.x": "1"})])


async def test_over_http_query_and_ingest(engine: Engine) -> None:
    await setup(engine)
    await engine.define_meter(Meter(name="tokens", event_type="tokens",
                                    value_property="$.n",
                                    dimension_paths={"customer.tier": "$.tier"}))
    async with open_http(engine) as server:
        answer = await http("POST", url(server, "/api/query"), json={
            "meterApiName": "calls", "startMs": NOW - 60_000, "endMs": NOW + 60_000,
            "groupBy": ["customer.plan"], "filter": {"customer.plan": ["pro", "free"]},
            "take": {"limit": 1, "offset": 1}, "other": True})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert [(r["group"], r["value"]) for r in body["rows"]] == [({"customer.plan": "free"}, 4)]
        assert [r["value"] for r in body["other"]] == [19]
        assert body["groupCount"] == 2
        refused = await http("POST", url(server, "/ingest"), json=[
            {"customerId": "acme", "meterApiName": "calls", "meterValue": 1,
             "meterTimeInMillis": NOW, "dimensions": {"customer.plan": "pro"}}])
        assert refused.status_code == 400 and "customer.plan" in refused.text
        cloud = await http("POST", url(server, "/api/v1/events"), json={
            "specversion": "1.0", "id": "e-1", "source": "test", "type": "tokens",
            "subject": "acme", "time": "2026-09-21T14:13:19Z",
            "data": {"n": 3, "tier": "gold"}})
        assert cloud.status_code == 400 and "customer.tier" in cloud.text
    assert rows(await engine.query(over())) == [({}, 31)]
