"""The real Amberflo Python SDK (amberflo-metering-python, from PyPI) against a live server:
only its root URL changed. Answers are compared with the engine's own queries."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, TypeVar, cast

import pytest
import trio
from metering.ingest import IngestApiClient, create_ingest_client
from metering.session import ApiSession, IngestSession
from metering.usage import (
    AggregationType,
    Take,
    TimeGroupingInterval,
    TimeRange,
    UsageApiClient,
    create_all_usage_query,
    create_usage_query,
)

from engine import Engine, Meter, Query
from engine.errors import EngineClosed
from tests.http_support import NOW, open_http

T = TypeVar("T")
DAY_S = 86400
START_S = NOW // 1000 - 3 * DAY_S


@pytest.fixture
async def sum_meter(engine: Engine) -> Engine:
    await engine.define_meter(Meter(name="api_calls", aggregation="sum"))
    return engine


@pytest.fixture
def point_sdk_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[int | None], None]:
    def point(port: int | None) -> None:
        root = f"http://127.0.0.1:{port}"  # no trailing slash: the SDK adds "/usage/" etc.
        monkeypatch.setattr(ApiSession, "root_url", root)
        monkeypatch.setattr(IngestSession, "root_url", root)
    return point


async def blocking(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking SDK call in a thread, bounded in time."""
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(
            functools.partial(call, *args, **kwargs), abandon_on_cancel=True)


def payload(customer: str, value: float, hours_ago: int, unique_id: str) -> dict[str, Any]:
    from metering.ingest import create_ingest_payload

    return cast(dict[str, Any], create_ingest_payload(
        meter_api_name="api_calls", meter_value=value,
        meter_time_in_millis=NOW - hours_ago * 3_600_000, customer_id=customer,
        dimensions={"region": "eu"}, unique_id=unique_id))


async def engine_total(engine: Engine, customer: str | None = None) -> Any:
    result = await engine.query(Query(
        meter_api_name="api_calls", start_ms=START_S * 1000, end_ms=NOW + 1,
        filter={"customer_id": [customer]} if customer else {}))
    return result.rows[0].value if result.rows else 0


async def test_ingest_client_send_and_usage_reports(
        sum_meter: Engine, point_sdk_at: Callable[[int | None], None]) -> None:
    async with open_http(sum_meter) as server:
        point_sdk_at(server.port)
        ingest = IngestApiClient("any-key")
        answer = await blocking(ingest.send, [payload("acme", 1.5, 30, "a1"),
                                              payload("acme", 2, 2, "a2"),
                                              payload("beta", 7, 1, "b1")])
        assert answer == "3 records were ingested"
        assert await blocking(ingest.send, payload("acme", 1.5, 30, "a1")) == \
            "1 records were ingested"  # a re-send of one record: absorbed
        usage = UsageApiClient("any-key")
        time_range = TimeRange(START_S, NOW // 1000)
        query = create_usage_query(
            AggregationType.SUM, "api_calls", TimeGroupingInterval.DAY, time_range,
            group_by=["customerId"], take=Take(10, is_ascending=False))
        report = await blocking(usage.get, query)
        assert set(report) == {"metadata", "secondsSinceEpochIntervals", "clientMeters"}
        by_customer = {m["group"]["groupInfo"]["customerId"]: m for m in report["clientMeters"]}
        assert Decimal(str(by_customer["acme"]["groupValue"])) == await engine_total(
            sum_meter, "acme")
        assert by_customer["beta"]["groupValue"] == await engine_total(sum_meter, "beta") == 7
        assert len(by_customer["acme"]["values"]) == len(report["secondsSinceEpochIntervals"])
        filtered = create_usage_query(
            AggregationType.SUM, "api_calls", TimeGroupingInterval.HOUR, time_range,
            usage_filter={"customerId": ["beta"]})
        reports = await blocking(usage.get, [query, filtered])
        assert [r["clientMeters"][0]["groupValue"] for r in reports[1:]] == [7]
        assert reports[0] == report
        everything = await blocking(usage.get_all, create_all_usage_query(
            TimeGroupingInterval.DAY, time_range, group_by_customer_id=True))
        assert [r["metadata"]["meterApiName"] for r in everything] == ["api_calls"]
        assert {m["group"]["groupInfo"]["customerId"] for m in everything[0]["clientMeters"]} \
            == {"acme", "beta"}
    assert sum_meter.statistics().events_duplicate == 1


class LostAcks:
    """An engine whose first ``lost`` ingests are applied but then fail with 503, as if
    the answer were lost on the way: the SDK's retry re-sends the same unique ids."""

    def __init__(self, engine: Engine, lost: int) -> None:
        self._engine = engine
        self.lost = lost

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def ingest(self, events: Any, **kwargs: Any) -> Any:
        ack = await self._engine.ingest(events, **kwargs)
        if self.lost > 0:
            self.lost -= 1
            raise EngineClosed("simulated: applied, but the answer was lost")
        return ack


def short_waits(*args: Any, **kwargs: Any) -> Iterator[float | None]:
    """The SDK's backoff generator, with waits of at most 20 ms (backoff primes it first)."""
    yield None
    while True:
        yield 0.02


async def test_batching_producer_with_retries_of_the_same_unique_ids(
        sum_meter: Engine, point_sdk_at: Callable[[int | None], None]) -> None:
    flaky = LostAcks(sum_meter, lost=2)
    errors: list[Any] = []
    lock = threading.Lock()

    def on_error(error: Exception, batch: list[Any]) -> None:
        with lock:
            errors.append((error, len(batch)))

    async with open_http(cast(Engine, flaky)) as server:
        point_sdk_at(server.port)
        producer = create_ingest_client(
            api_key="any-key", threads=2, batch_size=40, send_interval_in_secs=0.05,
            sleep_interval_in_secs=0.01, retries=4, backoff_delay=short_waits,
            on_error=on_error)
        try:
            for number in range(250):
                assert producer.meter(
                    meter_api_name="api_calls", meter_value=number % 7 + 1,
                    meter_time_in_millis=NOW - number * 60_000,
                    customer_id=f"customer-{number % 5}", unique_id=f"event-{number}")
        finally:
            await blocking(producer.shutdown)
    assert not errors
    assert flaky.lost == 0
    stats = sum_meter.statistics()
    assert stats.events_accepted == 250
    assert stats.events_duplicate >= 2  # both lost batches came back whole
    assert await engine_total(sum_meter) == sum(number % 7 + 1 for number in range(250))


async def test_a_refused_batch_reaches_on_error_after_one_post(
        sum_meter: Engine, point_sdk_at: Callable[[int | None], None]) -> None:
    errors: list[int] = []
    async with open_http(sum_meter) as server:
        point_sdk_at(server.port)
        producer = create_ingest_client(
            api_key="any-key", threads=1, batch_size=10, send_interval_in_secs=0.05,
            sleep_interval_in_secs=0.01, backoff_delay=short_waits,
            on_error=lambda error, batch: errors.append(error.status_code))
        try:
            producer.meter(meter_api_name="no_such_meter", meter_value=1,
                           meter_time_in_millis=NOW, customer_id="acme")
        finally:
            await blocking(producer.shutdown)
        requests_seen = server.metrics.requests.labels("/ingest", "POST", "400")._value.get()
    assert errors == [400]
    assert requests_seen == 1  # a 4xx is final for the SDK: never retried
