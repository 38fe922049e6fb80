"""``meter serve --http-port``: TCP and HTTP from one process and one engine."""

from __future__ import annotations

import re
import time
from pathlib import Path

import requests
import trio

from engine import Meter, Query
from engine.client import open_client
from tests.helpers.serve import serve_in

HTTP_READY = re.compile(r"HTTP ready on http://127\.0\.0\.1:(\d+)/")


def test_one_process_serves_tcp_and_http_on_one_engine(tmp_path: Path) -> None:
    now_ms = time.time_ns() // 1_000_000
    with serve_in(tmp_path, "--http-port", "0") as server:
        startup = "".join(server.lines)
        assert "HTTP listening on http://127.0.0.1:" in startup, startup
        ready = HTTP_READY.search(startup)
        assert ready, startup
        base = f"http://127.0.0.1:{int(ready.group(1))}"
        assert requests.get(f"{base}/readyz", timeout=10).status_code == 200

        async def define_over_tcp() -> None:
            async with open_client("127.0.0.1", server.port) as client:
                await client.define_meter(Meter(name="api_calls"))

        trio.run(define_over_tcp)
        records = [{"meterApiName": "api_calls", "customerId": "acme", "meterValue": 2,
                    "meterTimeInMillis": now_ms, "uniqueId": f"u{i}"} for i in range(3)]
        answer = requests.post(f"{base}/ingest", json=records + records[:1], timeout=10)
        assert (answer.status_code, answer.text) == (200, "4 records were ingested")

        async def total_over_tcp() -> object:
            async with open_client("127.0.0.1", server.port) as client:
                result = await client.query(Query(meter_api_name="api_calls",
                                                  start_ms=now_ms - 60_000, end_ms=now_ms + 1))
                return result.rows[0].value

        assert trio.run(total_over_tcp) == 6  # the retried record counted once
        assert server.terminate() == 0
