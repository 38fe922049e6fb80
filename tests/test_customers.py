"""The customer registry: records, customers known by usage, deletion, durability."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from engine import (
    Customer,
    CustomerExists,
    Event,
    Forbidden,
    InvalidRequest,
    Meter,
    Query,
    UnknownCustomer,
    open_engine,
)
from engine.auth import parse_keys
from engine.client import open_client
from engine.storage.memory import MemoryStore
from tests.conftest import HOST

NOW = 1_790_000_000_000


def usage(customer_id: str, value: int = 1) -> Event:
    return Event(meter_api_name="calls", customer_id=customer_id, meter_value=value,
                 meter_time_in_millis=NOW - 1_000)


async def total(eng: object, customer_id: str) -> object:
    result = await eng.query(Query(  # type: ignore[attr-defined]
        meter_api_name="calls", start_ms=NOW - 60_000, end_ms=NOW + 60_000,
        filter={"customer_id": [customer_id]}))
    return result.rows[0].value if result.rows else None


async def test_add_get_update_list_and_delete() -> None:
    async with open_engine(store=MemoryStore(), shards=3, clock_ms=lambda: NOW) as eng:
        stored = await eng.add_customer(Customer(
            id="acme", name="Acme", email="ops@acme.test", traits={"plan": "pro"},
            extra={"lifecycleStage": "ACTIVE", "address": {"city": "Oslo"}}))
        assert stored.created_ms == stored.updated_ms == NOW
        assert await eng.get_customer("acme") == stored
        with pytest.raises(CustomerExists, match="acme"):
            await eng.add_customer(Customer(id="acme", name="Acme again"))
        updated = await eng.update_customer(Customer(id="acme", name="Acme Inc"))
        # An update replaces the record whole: traits and extra are gone.
        assert (updated.name, updated.traits, updated.extra) == ("Acme Inc", {}, {})
        assert updated.created_ms == NOW
        with pytest.raises(UnknownCustomer, match="nobody"):
            await eng.update_customer(Customer(id="nobody", name="x"))
        assert await eng.get_customer("nobody") is None
        await eng.add_customer(Customer(id="beta", name="Beta"))
        assert [c.id for c in await eng.list_customers()] == ["acme", "beta"]
        assert await eng.delete_customer("beta") == Customer(
            id="beta", name="Beta", created_ms=NOW, updated_ms=NOW)
        assert await eng.delete_customer("beta") is None
        assert [c.id for c in await eng.list_customers()] == ["acme"]
        assert await eng.get_customer("beta") is None


async def test_usage_makes_a_customer_known_and_an_add_fills_it_in() -> None:
    async with open_engine(store=MemoryStore(), shards=4, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls"))
        await eng.ingest([usage("walk-in"), usage("acme")])
        assert await eng.get_customer("walk-in") == Customer(id="walk-in")
        assert [c.id for c in await eng.list_customers()] == ["acme", "walk-in"]
        # Known only by usage: an update works, and so does an add (it fills the name in).
        filled = await eng.add_customer(Customer(id="walk-in", name="Walk-in Ltd"))
        assert (await eng.get_customer("walk-in")) == filled
        assert (await eng.update_customer(Customer(id="acme", name="Acme"))).name == "Acme"


async def test_a_deleted_customer_is_hidden_its_usage_still_counted_and_add_reinstates() -> None:
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(Meter(name="calls"))
        await eng.add_customer(Customer(id="acme", name="Acme"))
        await eng.ingest([usage("acme", 5)])
        assert (await eng.delete_customer("acme")) is not None
        await eng.ingest([usage("acme", 7)])
        assert await total(eng, "acme") == 12
        assert await eng.get_customer("acme") is None
        assert await eng.list_customers() == []
        with pytest.raises(UnknownCustomer):
            await eng.update_customer(Customer(id="acme", name="Acme"))
        back = await eng.add_customer(Customer(id="acme", name="Acme Again"))
        assert await eng.get_customer("acme") == back


async def test_concurrent_adds_of_one_id_settle_in_commit_order() -> None:
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: NOW) as eng:
        outcomes: list[str] = []

        async def add(name: str) -> None:
            try:
                await eng.add_customer(Customer(id="acme", name=name))
                outcomes.append(name)
            except CustomerExists:
                outcomes.append("refused")

        async with trio.open_nursery() as nursery:
            for name in ("first", "second", "third"):
                nursery.start_soon(add, name)
        assert sorted(outcomes).count("refused") == 2
        winner = next(o for o in outcomes if o != "refused")
        assert (await eng.get_customer("acme")).name == winner  # type: ignore[union-attr]


@pytest.mark.parametrize("bad, reason", [
    (Customer(id=""), "non-empty"),
    (Customer(id="x", traits={"plan": 3}), "string value"),  # type: ignore[dict-item]
    (Customer(id="x", name="n" * 300), "at most 256"),
    (Customer(id="x", extra={"blob": "b" * 20_000}), "bytes encoded"),
    (Customer(id="x", enabled="yes"), "true or false"),  # type: ignore[arg-type]
])
async def test_bad_customers_are_refused_with_the_field_named(bad: Customer, reason: str) -> None:
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: NOW) as eng:
        with pytest.raises(InvalidRequest, match=reason):
            await eng.add_customer(bad)
        assert await eng.list_customers() == []


@pytest.mark.parametrize("snapshot", [False, True], ids=["wal-replay", "snapshot"])
async def test_the_registry_survives_a_restart(tmp_path: Path, snapshot: bool) -> None:
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW,
                           snapshot_on_close=snapshot) as eng:
        await eng.define_meter(Meter(name="calls"))
        await eng.add_customer(Customer(id="acme", name="Acme", traits={"plan": "pro"},
                                        extra={"description": "first"}))
        await eng.add_customer(Customer(id="gone", name="Gone"))
        await eng.delete_customer("gone")
        await eng.ingest([usage("walk-in")])
        before = await eng.list_customers()
        state = eng.export_state()
    async with open_engine(tmp_path, shards=3, clock_ms=lambda: NOW) as eng:
        assert eng.statistics().recovered_wal_records == (0 if snapshot else 4)
        assert await eng.list_customers() == before
        assert [c.id for c in before] == ["acme", "walk-in"]
        assert await eng.get_customer("gone") is None
        assert eng.export_state() == state
    async with open_engine(tmp_path, shards=5, clock_ms=lambda: NOW) as eng:  # resharded
        assert await eng.list_customers() == before


async def test_customers_over_tcp_with_scopes_and_customer_bound_keys(
        engine: object, serving: Any) -> None:
    keys = parse_keys({"keys": [
        {"key": "admin", "scopes": ["admin", "ingest", "query"]},
        {"key": "reader", "scopes": ["query"]},
        {"key": "acme", "scopes": ["ingest", "query"], "customer_id": "acme"},
    ]})
    async with serving(engine, keys=keys) as server:
        async with open_client(HOST, server.port, api_key="admin") as admin:
            stored = await admin.add_customer(Customer(id="acme", name="Acme",
                                                       extra={"address": {"city": "Oslo"}}))
            assert stored.extra == {"address": {"city": "Oslo"}}
            await admin.add_customer(Customer(id="beta", name="Beta"))
            assert await admin.get_customer("acme") == stored
            with pytest.raises(CustomerExists):
                await admin.add_customer(Customer(id="acme", name="Again"))
            with pytest.raises(UnknownCustomer):
                await admin.update_customer(Customer(id="nobody"))
            assert (await admin.update_customer(Customer(id="beta", name="B"))).name == "B"
        async with open_client(HOST, server.port, api_key="reader") as reader:
            assert [c.id for c in await reader.list_customers()] == ["acme", "beta"]
            with pytest.raises(Forbidden):
                await reader.delete_customer("beta")
        async with open_client(HOST, server.port, api_key="acme") as bound:
            # A customer-bound key reads its own record only (and is never admin).
            assert [c.id for c in await bound.list_customers()] == ["acme"]
            assert await bound.get_customer("acme") == stored
            with pytest.raises(Forbidden):
                await bound.get_customer("beta")
            with pytest.raises(Forbidden):
                await bound.update_customer(Customer(id="acme", name="mine now"))
        async with open_client(HOST, server.port, api_key="admin") as admin:
            assert (await admin.delete_customer("acme")) == stored
        async with open_client(HOST, server.port, api_key="acme") as bound:
            assert await bound.get_customer("acme") is None
            assert await bound.list_customers() == []
