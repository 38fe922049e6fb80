"""The meter command line against a real server on loopback: ingest, query, stats, and
what ``meter watch`` says when its server goes away."""

from __future__ import annotations

import io
import json
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import trio

from engine import Engine, Event, Limit, Meter, open_engine
from engine.cli import main
from engine.server import MeterServer, ServerConfig
from tests.helpers.events import NOW as HELPER_NOW

NOW = time.time_ns() // 1_000_000
MINUTE = 60_000


def run_cli(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue()


async def with_server(tmp_path: Path, body: Any) -> Any:
    async with open_engine(tmp_path / "data") as eng:
        await eng.define_meter(Meter(name="calls", aggregation="sum"))
        server = MeterServer(eng, ServerConfig(port=0))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            try:
                with trio.fail_after(30):
                    return await trio.to_thread.run_sync(body, str(port))
            finally:
                server.shutdown()


async def test_ingest_ndjson_reports_accepted_duplicates_and_bad_lines(tmp_path: Path) -> None:
    ts = (NOW // MINUTE) * MINUTE - 10 * MINUTE
    lines = [
        {"meterApiName": "calls", "customerId": "acme", "meterValue": 1.5,
         "meterTimeInMillis": ts, "dimensions": {"region": "eu"}, "uniqueId": "a-1"},
        {"meterApiName": "calls", "customerId": "acme", "meterValue": 1.5,
         "meterTimeInMillis": ts, "dimensions": {"region": "eu"}, "uniqueId": "a-1"},
        {"meterApiName": "calls", "customerId": "bob", "meterValue": 2, "meterTimeInMillis": ts},
        {"meterApiName": "nope", "customerId": "bob", "meterValue": 2, "meterTimeInMillis": ts},
    ]
    path = tmp_path / "events.ndjson"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")

    def body(port: str) -> tuple[Any, ...]:
        ingest = run_cli(["ingest", str(path), "--port", port, "--batch-size", "2"])
        table = run_cli(["query", "calls", "--port", port, "--group-by", "customer_id",
                         "--start", str(ts - MINUTE), "--end", str(ts + MINUTE)])
        as_json = run_cli(["query", "calls", "--port", port, "--json",
                           "--start", str(ts - MINUTE), "--end", str(ts + MINUTE)])
        stats = run_cli(["stats", "--port", port, "--json"])
        return ingest, table, as_json, stats

    ingest, table, as_json, stats = await with_server(tmp_path, body)
    code, text = ingest
    assert code == 1  # some lines were rejected
    assert "read 5 events: accepted 2, duplicates 1, rejected 2" in text
    assert "line 4: unknown meter 'nope'" in text
    assert "line 5: not an event" in text
    assert table[0] == 0
    rows = [line.split() for line in table[1].splitlines()[1:-1]]
    assert [(r[1], r[2]) for r in rows] == [("acme", "1.5"), ("bob", "2")]
    assert json.loads(as_json[1])["rows"][0]["value"] == "3.5"
    assert json.loads(stats[1])["events_accepted"] == 2


async def test_ingest_csv_with_dimension_columns(tmp_path: Path) -> None:
    ts = (NOW // MINUTE) * MINUTE - 5 * MINUTE
    path = tmp_path / "events.csv"
    path.write_text(
        "meterApiName,customerId,meterValue,meterTimeInMillis,uniqueId,dimensions.region\n"
        f"calls,acme,3,{ts},c-1,eu\n"
        f"calls,acme,4,{ts},c-2,us\n"
        f"calls,acme,x,{ts},c-3,us\n"
    )

    def body(port: str) -> tuple[Any, ...]:
        ingest = run_cli(["ingest", str(path), "--port", port])
        query = run_cli(["query", "calls", "--port", port, "--json", "--group-by", "region",
                         "--filter", "customer_id=acme",
                         "--start", str(ts - MINUTE), "--end", str(ts + MINUTE)])
        return ingest, query

    (code, text), (_, result) = await with_server(tmp_path, body)
    assert "accepted 2, duplicates 0, rejected 1" in text and code == 1
    rows = json.loads(result)["rows"]
    assert [(r["group"]["region"], r["value"]) for r in rows] == [("eu", 3), ("us", 4)]


def test_query_needs_a_running_server() -> None:
    code, _ = run_cli(["stats", "--port", "1"])
    assert code == 1


class _Signalling(io.StringIO):
    """A stdout that tells another thread once a line holding ``marker`` was written."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.seen = threading.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        if self.marker in self.getvalue():
            self.seen.set()
        return written


async def test_watch_names_the_seq_to_resume_from_when_the_server_goes(
        engine: Engine, serving: Any) -> None:
    await engine.define_meter(Meter(name="gb", aggregation="sum"))
    await engine.add_limit(Limit(id="gb-total", meter_api_name="gb", thresholds=[5],
                                 period="total"))
    await engine.ingest([Event(meter_api_name="gb", customer_id="acme", meter_value=7,
                               meter_time_in_millis=HELPER_NOW, unique_id="g-1")])
    out, err = _Signalling("#0 "), io.StringIO()

    def watch(port: int) -> int:
        with redirect_stdout(out), redirect_stderr(err):
            return main(["watch", "--from-seq", "0", "--port", str(port)])

    async with serving(engine) as server, trio.open_nursery() as nursery:
        codes: list[int] = []

        async def run_watch() -> None:
            codes.append(await trio.to_thread.run_sync(watch, server.port))

        nursery.start_soon(run_watch)
        with trio.fail_after(30):  # a hang guard
            await trio.to_thread.run_sync(out.seen.wait)
        server.shutdown()  # the watch is past alert 0 and waiting for more
    assert codes == [1]
    assert out.getvalue().startswith("#0  ") and out.getvalue().count("\n") == 1
    assert err.getvalue().endswith("; resume with --from-seq 1\n")
    assert err.getvalue().startswith("meter watch: ") and err.getvalue().count("\n") == 1
