"""engine.client's statistics records and the verbs it shares with the embedded engine,
over loopback (the protocol state itself is tested without sockets in test_connection)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from engine import Engine, Event, Meter
from engine.client import (
    BatcherStatistics,
    RemoteStatistics,
    SyncClient,
    open_batcher,
    open_client,
)
from engine.server import ServerStatistics
from tests.conftest import HOST, NOW


def event(customer: str = "acme", value: int = 1, **fields: Any) -> Event:
    return Event(meter_api_name="calls", customer_id=customer, meter_value=value,
                 meter_time_in_millis=NOW, **fields)


async def test_client_statistics_is_the_stats_map_as_a_record(engine: Engine, serving: Any
                                                              ) -> None:
    await engine.define_meter(Meter(name="calls"))
    async with serving(engine) as server, open_client(HOST, server.port) as client:
        await client.ingest([event(), event("globex")])
        stats = await client.stats()
        record = await client.statistics()
        assert isinstance(record, RemoteStatistics)
        assert record.engine["meter_count"] == stats["meter_count"] == 1
        assert record.server["events_ingested"] == stats["server_events_ingested"] == 2
        assert record.server["connections"] == 1
        assert isinstance(record.server_time_ms, int) and "time_ms" not in record.server
        with pytest.raises(TypeError):
            record.engine["meter_count"] = 5  # type: ignore[index]
        assert await client.meters() == await client.list_meters() == engine.meters()


async def test_server_statistics_is_a_snapshot_and_stats_still_reads(engine: Engine,
                                                                     serving: Any) -> None:
    async with serving(engine) as server:
        before = server.statistics()
        assert isinstance(before, ServerStatistics) and before.connections_total == 0
        async with open_client(HOST, server.port) as client:
            await client.ping()
            now = server.statistics()
            assert (now.connections, now.connections_total, now.requests) == (1, 1, 1)
            assert server.stats == now  # the former attribute, read-only
        assert before.connections_total == 0  # a snapshot does not move
        with pytest.raises(AttributeError):
            server.stats = before  # type: ignore[misc]
        with pytest.raises(AttributeError):
            now.requests = 0  # type: ignore[misc]


async def test_batcher_statistics_is_a_method_and_still_reads_as_an_attribute(
    engine: Engine, serving: Any
) -> None:
    await engine.define_meter(Meter(name="calls"))
    async with serving(engine) as server:
        async with open_batcher(HOST, server.port, max_events=2, flush_interval_s=60) as batcher:
            for index in range(3):
                await batcher.add(event(unique_id=f"e{index}"))
            record = batcher.statistics()
            assert isinstance(record, BatcherStatistics)
            assert (record.events_added, record.batches_sent, record.accepted) == (3, 1, 2)
            assert batcher.statistics.events_added == 3  # the former attribute form
        assert batcher.statistics().accepted == 3 and record.accepted == 2


async def test_subscription_statistics(engine: Engine, serving: Any) -> None:
    async with serving(engine) as server, open_client(HOST, server.port) as client:
        async with client.subscribe(from_seq=0) as subscription:
            stats = subscription.statistics()
            assert (stats.next_seq, stats.buffered_alerts, stats.lagged,
                    stats.server_lag_notices) == (0, 0, 0, 0)


async def test_the_sync_client_has_the_same_verbs(engine: Engine, serving: Any) -> None:
    await engine.define_meter(Meter(name="calls"))
    async with serving(engine) as server:
        def use() -> tuple[Any, ...]:
            with SyncClient(HOST, server.port) as client:
                return client.meters(), client.list_meters(), client.statistics()

        meters, listed, record = await trio.to_thread.run_sync(use)
        assert meters == listed == engine.meters()
        assert record.engine["meter_count"] == 1
