"""Pricing over HTTP: plan CRUD, assignments, invoices as JSON and CSV, cost limits."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from engine import Engine, Event, Meter
from engine.auth import parse_keys
from tests.helpers.events import NOW
from tests.http_support import http, open_http, url

PLAN = {"id": "pro", "currency": "USD", "fixedFee": 20, "charges": [
    {"meterApiName": "api_calls", "model": "graduated", "tiers": [
        {"upTo": 1000, "unitPrice": 0.01}, {"unitPrice": 0.005}]},
    {"meterApiName": "api_calls", "id": "eu-calls", "unitPrice": 0.1,
     "dimensions": {"region": ["eu"]}}]}


async def test_plans_assignments_and_invoices_over_http(engine: Engine) -> None:
    await engine.define_meter(Meter(name="api_calls"))
    keys = parse_keys({"keys": [
        {"key": "admin", "scopes": ["admin", "ingest", "query"]},
        {"key": "acme", "scopes": ["query"], "customer_id": "acme"}]})
    admin = {"X-API-KEY": "admin"}
    async with open_http(engine, keys=keys) as server:
        created = await http("POST", url(server, "/api/plans"), json=PLAN, headers=admin)
        assert created.status_code == 200, created.text
        assert created.json()["version"] == 1
        again = await http("PUT", url(server, "/api/plans/pro"),
                           json={**PLAN, "fixedFee": 25}, headers=admin)
        assert again.json()["version"] == 2 and again.json()["fixedFee"] == 25
        versions = await http("GET", url(server, "/api/plans/pro/versions"), headers=admin)
        assert [p["version"] for p in versions.json()] == [1, 2]
        first = await http("GET", url(server, "/api/plans/pro?version=1"), headers=admin)
        assert first.json()["fixedFee"] == 20
        assert (await http("GET", url(server, "/api/plans/nope"),
                           headers=admin)).status_code == 404
        mismatch = await http("PUT", url(server, "/api/plans/other"), json=PLAN, headers=admin)
        assert mismatch.status_code == 400
        assigned = await http("POST", url(server, "/api/customers/acme/plan"),
                              json={"planId": "pro", "effectiveFromMs": NOW}, headers=admin)
        assert assigned.status_code == 200 and assigned.json()["startsMs"] <= NOW
        limit = await http("POST", url(server, "/limits"), headers=admin, json={
            "id": "spend", "meterApiName": None, "customerId": "acme", "thresholds": [30],
            "period": "month", "measure": "cost"})
        assert limit.status_code == 200, limit.text
        await engine.ingest([Event("api_calls", "acme", 1500, NOW, {"region": "eu"})])
        answer = await http("GET", url(server, f"/invoices/acme?atMs={NOW}"),
                            headers={"X-API-KEY": "acme"})
        assert answer.status_code == 200, answer.text
        expected = await engine.invoice("acme", NOW)
        body = answer.json()
        assert Decimal(str(body["total"])) == expected.total == Decimal("187.50")
        assert body["planVersion"] == 2 and body["status"] == "open"
        assert [line["kind"] for line in body["lines"]] == ["fixed", "usage", "usage"]
        as_csv = await http("GET", url(server, f"/invoices/acme?atMs={NOW}&format=csv"),
                            headers=admin)
        assert as_csv.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [Decimal(r["amount"]) for r in rows] == [
            *(line.amount for line in expected.lines), expected.total]
        assert (await http("GET", url(server, f"/invoices/globex?atMs={NOW}"),
                           headers={"X-API-KEY": "acme"})).status_code == 403
        assert (await http("GET", url(server, f"/invoices/globex?atMs={NOW}"),
                           headers=admin)).status_code == 404
        status = await http("GET", url(server, "/api/customers/acme/limits"), headers=admin)
        (spend,) = status.json()["limits"]
        assert Decimal(str(spend["usage"])) == Decimal("187.50")
        assert spend["reached"] == [30]
