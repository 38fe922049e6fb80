"""The Amberflo customer routes against a live server: the real SDK's ``CustomerApiClient``
(only its root URL changed), answers compared with the engine's registry, and raw requests
for the error cases and customer-bound keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from metering.customer import CustomerApiClient, create_customer_payload
from metering.session import ApiSession

from engine import Customer, Engine, Event, Meter
from engine.auth import parse_keys
from tests.http_support import NOW, http, open_http, url
from tests.test_http_sdk import blocking

KEYS = parse_keys({"keys": [
    {"key": "admin-key", "scopes": ["admin", "query"]},
    {"key": "reader-key", "scopes": ["query"]},
    {"key": "acme-key", "scopes": ["query"], "customer_id": "acme"},
]})


@pytest.fixture
def point_sdk_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[int | None], None]:
    def point(port: int | None) -> None:
        monkeypatch.setattr(ApiSession, "root_url", f"http://127.0.0.1:{port}")
    return point


async def test_the_sdk_lists_gets_adds_and_updates_customers(
        engine: Engine, point_sdk_at: Callable[[int | None], None]) -> None:
    async with open_http(engine) as server:
        point_sdk_at(server.port)
        client = CustomerApiClient("any-key")
        assert await blocking(client.list) == []
        assert await blocking(client.get, "acme") == {}  # unknown: {}, never a 404
        added = await blocking(client.add, create_customer_payload(
            "acme", "Acme", customer_email="ops@acme.test", traits={"plan": "pro"}))
        assert added["id"] == added["customerId"] == "acme"
        assert added["customerName"] == "Acme" and added["customerEmail"] == "ops@acme.test"
        assert added["enabled"] is True and added["traits"] == {"plan": "pro"}
        assert added["createTime"] == added["updateTime"] == NOW
        assert await blocking(client.get, "acme") == added
        stored = await engine.get_customer("acme")
        assert stored is not None and (stored.name, stored.email, stored.traits) == (
            "Acme", "ops@acme.test", {"plan": "pro"})
        # PUT semantics: an update without traits leaves none.
        updated = await blocking(client.update, create_customer_payload(
            "acme", "Acme Inc", enabled=False))
        assert updated["customerName"] == "Acme Inc" and updated["enabled"] is False
        assert not updated.get("traits") and "customerEmail" not in updated
        upserted = await blocking(client.add_or_update, create_customer_payload(
            "acme", "Acme Again", traits={"region": "eu"}))
        assert (upserted["customerName"], upserted["traits"]) == ("Acme Again", {"region": "eu"})
        created = await blocking(client.add_or_update, create_customer_payload("beta", "Beta"))
        assert created["customerId"] == "beta"
        listed = await blocking(client.list)
        assert [c["customerId"] for c in listed] == ["acme", "beta"]
        assert [c.id for c in await engine.list_customers()] == ["acme", "beta"]


async def test_a_customer_known_by_its_usage_is_filled_in_by_a_post(engine: Engine) -> None:
    await engine.define_meter(Meter(name="api_calls"))
    await engine.ingest([Event(meter_api_name="api_calls", customer_id="walk-in",
                               meter_value=1, meter_time_in_millis=NOW)])
    async with open_http(engine) as server:
        seen = (await http("GET", url(server, "/customers/walk-in"))).json()
        assert seen["customerId"] == "walk-in" and "customerName" not in seen
        filled = await http("POST", url(server, "/customers/"), json={
            "customerId": "walk-in", "customerName": "Walk In", "lifecycleStage": "TRIAL",
            "description": "came by", "test": True,
            "address": {"line1": "1 Main St", "city": "Springfield", "postalCode": "12345"}})
        assert filled.status_code == 200, filled.text
        body = filled.json()
        assert (body["customerName"], body["lifecycleStage"], body["description"],
                body["test"]) == ("Walk In", "TRIAL", "came by", True)
        assert body["address"] == {"line1": "1 Main St", "city": "Springfield",
                                   "postalCode": "12345"}
        stored = await engine.get_customer("walk-in")
        assert stored is not None and stored.extra["lifecycleStage"] == "TRIAL"
        again = await http("POST", url(server, "/customers"), json={
            "customerId": "walk-in", "customerName": "Other"})
        assert again.status_code == 409 and again.json()["code"] == "customer_exists"


async def test_path_routes_put_and_delete(engine: Engine) -> None:
    await engine.add_customer(Customer(id="acme", name="Acme", traits={"plan": "pro"}))
    async with open_http(engine) as server:
        assert (await http("GET", url(server, "/customers/nobody"))).json() == {}
        assert (await http("GET", url(server, "/customers?customerId=nobody"))).json() == {}
        put = await http("PUT", url(server, "/customers/acme/"), json={"customerName": "A"})
        assert put.status_code == 200 and put.json()["customerName"] == "A"
        assert "traits" not in put.json()
        mismatch = await http("PUT", url(server, "/customers/acme"), json={
            "customerId": "beta", "customerName": "B"})
        assert mismatch.status_code == 400
        unknown = await http("PUT", url(server, "/customers/nobody"), json={"customerName": "N"})
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_customer"
        no_name = await http("POST", url(server, "/customers"), json={"customerId": "x"})
        assert no_name.status_code == 400
        no_id = await http("POST", url(server, "/customers"), json={"customerName": "x"})
        assert no_id.status_code == 400
        deleted = await http("DELETE", url(server, "/customers/acme"))
        assert deleted.status_code == 200 and deleted.json()["customerId"] == "acme"
        assert await engine.get_customer("acme") is None
        assert (await http("GET", url(server, "/customers/acme"))).json() == {}
        gone = await http("DELETE", url(server, "/customers/acme"))
        assert gone.status_code == 404 and gone.json()["code"] == "unknown_customer"
        assert (await http("PATCH", url(server, "/customers/acme"))).status_code == 405


async def test_scopes_and_customer_bound_keys(engine: Engine) -> None:
    for customer_id in ("acme", "beta"):
        await engine.add_customer(Customer(id=customer_id, name=customer_id.title()))

    async def call(method: str, path: str, key: str, **kwargs: Any) -> Any:
        return await http(method, url(server, path), headers={"X-API-KEY": key}, **kwargs)

    async with open_http(engine, keys=KEYS) as server:
        assert (await http("GET", url(server, "/customers"))).status_code == 401
        everyone = await call("GET", "/customers", "reader-key")
        assert [c["customerId"] for c in everyone.json()] == ["acme", "beta"]
        mine = await call("GET", "/customers", "acme-key")
        assert [c["customerId"] for c in mine.json()] == ["acme"]
        assert (await call("GET", "/customers/acme", "acme-key")).json()["customerName"] == "Acme"
        other = await call("GET", "/customers?customerId=beta", "acme-key")
        assert other.status_code == 403 and other.json()["code"] == "forbidden"
        assert (await call("GET", "/customers/beta", "acme-key")).status_code == 403
        for method, path in (("POST", "/customers"), ("PUT", "/customers/acme"),
                             ("DELETE", "/customers/acme")):
            refused = await call(method, path, "reader-key",
                                 json={"customerId": "acme", "customerName": "X"})
            assert refused.status_code == 403, (method, path)
            assert (await call(method, path, "acme-key", json={
                "customerId": "acme", "customerName": "X"})).status_code == 403
        added = await call("POST", "/customers", "admin-key",
                           json={"customerId": "gamma", "customerName": "Gamma"})
        assert added.status_code == 200
    assert [c.id for c in await engine.list_customers()] == ["acme", "beta", "gamma"]
