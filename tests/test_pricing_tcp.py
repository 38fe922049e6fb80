"""Pricing over TCP: the client's methods of the same names as the engine's."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import trio

from engine import Charge, Engine, Event, Limit, Meter, Plan
from engine.auth import parse_keys
from engine.client import open_client
from engine.errors import Forbidden, UnknownCustomer
from engine.sync_client import SyncClient
from tests.helpers.events import NOW
from tests.helpers.serve import HOST

PLAN = Plan(id="pro", currency="USD", fixed_fee="20",
            charges=[Charge(meter_api_name="tokens", unit_price="0.002")])


async def test_tcp_plans_assignments_invoices_and_cost_alerts(engine: Engine,
                                                             serving: Any) -> None:
    keys = parse_keys({"keys": [
        {"key": "admin-key", "scopes": ["admin", "ingest", "query"]},
        {"key": "acme-key", "scopes": ["query"], "customer_id": "acme"},
    ]})
    async with serving(engine, keys=keys) as server:
        async with open_client(HOST, server.port, "admin-key") as admin, \
                open_client(HOST, server.port, "acme-key") as acme:
            await admin.define_meter(Meter(name="tokens"))
            stored = await admin.define_plan(PLAN)
            assert stored.version == 1 and stored.fixed_fee == Decimal("20")
            assert await admin.plans() == [stored]
            assert await admin.get_plan("pro", 1) == stored
            assert await admin.get_plan("pro", 2) is None
            assignment = await admin.assign_plan("acme", "pro", effective_from_ms=NOW)
            assert assignment.starts_ms <= NOW
            limit = await admin.add_limit(Limit(
                id="spend", meter_api_name=None, customer_id="acme", thresholds=[25],
                period="month", measure="cost"))
            assert limit.measure == "cost" and limit.meter_api_name is None
            ack = await admin.ingest([Event("tokens", "acme", 3000, NOW)], report_alerts=True)
            (alert,) = ack.alerts
            assert (alert.measure, alert.currency, alert.value) == ("cost", "USD",
                                                                  Decimal("26.00"))
            invoice = await acme.invoice("acme", NOW)
            assert invoice == await engine.invoice("acme", NOW)
            assert invoice.total == Decimal("26.00")
            with pytest.raises(Forbidden):
                await acme.invoice("globex", NOW)
            with pytest.raises(Forbidden):
                await acme.define_plan(PLAN)
            with pytest.raises(UnknownCustomer):
                await admin.invoice("globex", NOW)


async def test_the_sync_client_has_the_pricing_verbs(engine: Engine, serving: Any) -> None:
    await engine.define_meter(Meter(name="tokens"))
    await engine.ingest([Event("tokens", "acme", 500, NOW)])
    async with serving(engine) as server:
        def use() -> tuple[Any, ...]:
            with SyncClient(HOST, server.port) as client:
                stored = client.define_plan(PLAN)
                client.assign_plan("acme", "pro", effective_from_ms=NOW)
                return (stored, client.plans(), client.get_plan("pro"),
                        client.invoice("acme", NOW))

        stored, plans, got, invoice = await trio.to_thread.run_sync(use)
    assert plans == [stored] == [got]
    assert invoice.total == Decimal("21.00") == (await engine.invoice("acme", NOW)).total
