"""``meter plans`` and ``meter invoice`` against a live server."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio

from engine import Event, Meter, open_engine
from engine.server import MeterServer, ServerConfig
from tests.helpers.events import utc_ms
from tests.test_cli import run_cli

NOV_MID = utc_ms(2026, 11, 15)
PLAN = {"id": "pro", "currency": "EUR", "fixedFee": "20", "charges": [
    {"meterApiName": "calls", "model": "package", "packageSize": 100, "packagePrice": "5",
     "freeUnits": 100}]}


async def test_plans_and_invoice_commands(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(PLAN))
    async with open_engine(tmp_path / "data", clock_ms=lambda: NOV_MID) as eng:
        await eng.define_meter(Meter(name="calls"))
        await eng.ingest([Event("calls", "acme", 201, NOV_MID)])
        server = MeterServer(eng, ServerConfig(port=0))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)

            def body(port: str) -> tuple[Any, ...]:
                return (run_cli(["plans", "define", str(plan_file), "--port", port]),
                        run_cli(["plans", "assign", "acme", "pro", "--from", "2026-11",
                                 "--port", port]),
                        run_cli(["plans", "list", "--port", port]),
                        run_cli(["plans", "show", "pro", "--port", port]),
                        run_cli(["invoice", "acme", "--period", "2026-11", "--port", port]),
                        run_cli(["invoice", "acme", "--period", "2026-11", "--json",
                                 "--port", port]),
                        run_cli(["invoice", "acme", "--period", "2026-11", "--csv",
                                 "--port", port]),
                        run_cli(["invoice", "acme", "--period", "2026-10", "--port", port]))

            try:
                with trio.fail_after(30):
                    defined, assigned, listed, shown, table, as_json, as_csv, before = (
                        await trio.to_thread.run_sync(body, str(port)))
            finally:
                server.shutdown()
        expected = await eng.invoice("acme", NOV_MID)
    assert defined == (0, "plan pro version 1\n")
    assert assigned[0] == 0 and "2026-11-01T00:00:00+00:00" in assigned[1]
    assert listed[0] == 0 and listed[1].startswith("pro  version 1  EUR  1 charges")
    assert json.loads(shown[1])["charges"][0]["packageSize"] == "100"
    assert table[0] == 0 and table[1].rstrip().endswith("total 30.00 EUR")
    assert Decimal(json.loads(as_json[1])["total"]) == expected.total == Decimal("30.00")
    rows = list(csv.DictReader(io.StringIO(as_csv[1])))
    assert [(r["kind"], Decimal(r["amount"])) for r in rows] == [
        ("fixed", Decimal("20.00")), ("usage", Decimal("10.00")), ("total", Decimal("30.00"))]
    assert before[0] == 1  # no plan billed acme in October
