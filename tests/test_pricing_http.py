"""Pricing over HTTP: plan CRUD, assignments, invoices as JSON and CSV, cost limits."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from pathlib import Path

from engine import Charge, Engine, Event, IngestRules, Meter, Plan, open_engine
from engine.auth import parse_keys
from tests.helpers.events import DAY, NOW
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


async def test_a_query_key_reads_a_final_invoice_the_first_time(tmp_path: Path) -> None:
    """Reading a final period stores its invoice (a WAL record); a key with only the
    query scope may read it, and the stored invoice is what later reads return."""
    now = [NOW - 40 * DAY]
    keys = parse_keys({"keys": [{"key": "reader", "scopes": ["query"]}]})
    async with open_engine(tmp_path / "data", shards=2, clock_ms=lambda: now[0],
                           ingest_rules=IngestRules(late_ms=2 * DAY)) as eng:
        await eng.define_meter(Meter(name="api_calls"))
        await eng.define_plan(Plan(id="flat", currency="USD", charges=[
            Charge(meter_api_name="api_calls", unit_price="0.5")]))
        await eng.assign_plan("acme", "flat", effective_from_ms=now[0])
        await eng.ingest([Event("api_calls", "acme", 10, now[0])])
        past = now[0]
        now[0] = NOW
        async with open_http(eng, keys=keys) as server:
            answer = await http("GET", url(server, f"/invoices/acme?atMs={past}"),
                                headers={"X-API-KEY": "reader"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "final"
            assert Decimal(str(answer.json()["total"])) == Decimal("5.00")
            stored = await eng.invoice("acme", past)
            assert stored.status == "final" and stored.as_of_ms == NOW
            again = await http("GET", url(server, f"/invoices/acme?atMs={past}"),
                               headers={"X-API-KEY": "reader"})
            assert again.json() == answer.json()
