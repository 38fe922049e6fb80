"""``/metrics`` beyond the HTTP shell's own: the TCP server beside it and the engine's
writes in flight."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from engine import Engine, Event, Meter
from engine.client import open_client
from tests.http_support import NOW, http, open_http, url
from tests.test_http_native import _samples


async def test_tcp_connections_and_writes_in_flight(engine: Engine,
                                                    serving: Callable[..., Any]) -> None:
    await engine.define_meter(Meter(name="calls"))
    async with serving(engine) as tcp, open_http(engine) as server:
        server.attach_tcp(tcp)
        async with open_client("127.0.0.1", tcp.port) as client:
            await client.ingest([Event(meter_api_name="calls", customer_id="acme",
                                       meter_value=1, meter_time_in_millis=NOW)])
            samples = _samples((await http("GET", url(server, "/metrics"))).text)
            assert samples["meter_tcp_connections"] == 1
            assert samples["meter_tcp_connections_accepted_total"] == 1
            assert samples["meter_tcp_requests_total"] == 1  # the ingest
            assert samples["meter_tcp_protocol_errors_total"] == 0
            assert samples["meter_writes_in_flight"] == 0  # every write was acknowledged
            assert samples["meter_events_accepted_total"] == 1
        with trio.fail_after(10):  # the server notices the close on its own time
            while tcp.statistics().connections:
                await trio.sleep(0.005)
        samples = _samples((await http("GET", url(server, "/metrics"))).text)
        assert samples["meter_tcp_connections"] == 0
    assert engine.writes_in_flight() == 0


async def test_the_last_checkpoint_is_in_the_metrics(engine: Engine) -> None:
    await engine.define_meter(Meter(name="calls"))
    await engine.ingest([Event(meter_api_name="calls", customer_id="acme", meter_value=1,
                               meter_time_in_millis=NOW)])
    async with open_http(engine) as server:
        before = _samples((await http("GET", url(server, "/metrics"))).text)
        await engine.snapshot()
        after = _samples((await http("GET", url(server, "/metrics"))).text)
        assert after["meter_snapshots_total"] == before["meter_snapshots_total"] + 1
        assert after["meter_checkpoint_last_bytes"] == engine.statistics().checkpoint_bytes > 0
        assert after["meter_checkpoint_last_milliseconds"] == engine.statistics().checkpoint_ms
