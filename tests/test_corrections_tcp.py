"""Corrections over TCP: the ``correct`` scope, customer-bound keys, the audit name."""

from __future__ import annotations

from typing import Any

import pytest

from engine import Engine, Event, Meter, Query
from engine.auth import parse_keys
from engine.client import open_client
from engine.errors import Forbidden
from tests.conftest import HOST, NOW

DAY = 86_400_000
KEYS = {"keys": [
    {"key": "fixer", "scopes": ["correct", "query"], "name": "fixer"},
    {"key": "reader", "scopes": ["query", "ingest"]},
    {"key": "acme-fixer", "scopes": ["correct", "query"], "customer_id": "acme",
     "name": "acme-ops"},
]}


def event(customer: str, value: int, uid: str) -> Event:
    return Event(meter_api_name="calls", customer_id=customer, meter_value=value,
                 meter_time_in_millis=NOW - 60_000, unique_id=uid)


async def totals(eng: Engine) -> dict[str, Any]:
    result = await eng.query(Query(meter_api_name="calls", start_ms=NOW - DAY, end_ms=NOW + DAY,
                                   group_by=["customer_id"]))
    return {row.group["customer_id"]: row.value for row in result.rows}


async def test_corrections_over_tcp_need_the_correct_scope(engine: Engine, serving: Any) -> None:
    await engine.define_meter(Meter(name="calls"))
    await engine.ingest([event("acme", 1, "a1"), event("acme", 2, "a2"),
                         event("globex", 10, "g1"), event("globex", 20, "g2")])
    async with serving(engine, keys=parse_keys(KEYS)) as server:
        async with open_client(HOST, server.port, api_key="reader") as client:
            with pytest.raises(Forbidden):
                await client.cancel("calls", "acme", unique_ids=["a1"])
        async with open_client(HOST, server.port, api_key="acme-fixer") as client:
            with pytest.raises(Forbidden):
                await client.cancel("calls", "globex", unique_ids=["g1"])
            # customer_id=None from a bound key means its own customer only.
            assert await client.cancel_where("calls", customer_id=None, start_ms=NOW - DAY,
                                             end_ms=NOW) == 2
            assert [c.by for c in await client.corrections()] == ["acme-ops"]
        async with open_client(HOST, server.port, api_key="fixer") as client:
            assert await client.cancel("calls", "globex", unique_ids=["g1", "zz"]) == 1
            ack = await client.amend("calls", "globex", "g2",
                                     Event(meter_api_name="calls", customer_id="globex",
                                           meter_value=5, meter_time_in_millis=NOW - 60_000))
            assert ack.accepted == 1
            listed = await client.corrections("calls")
            assert [(c.kind, c.by) for c in listed] == [
                ("cancel_where", "acme-ops"), ("cancel", "fixer"), ("amend", "fixer")]
    assert await totals(engine) == {"globex": 5}
