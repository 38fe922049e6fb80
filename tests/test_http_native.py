"""The native HTTP routes (/api/query, /metrics, /openapi.json) and a schemathesis run of
every route in the OpenAPI document against the live server."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from typing import Any

import pytest
import trio

from engine import Engine, Event, Meter, Query, Take
from tests.http_support import NOW, http, open_http, url

# Examples per route: a handful in `make test`; `make soak` runs SOAK_EXAMPLES per route.
EXAMPLES = int(os.environ.get("METER_SCHEMATHESIS_EXAMPLES", "6"))
SOAK_EXAMPLES = 60


@pytest.fixture
async def loaded(engine: Engine) -> Engine:
    await engine.define_meter(Meter(name="api_calls", aggregation="sum"))
    await engine.ingest([
        Event(meter_api_name="api_calls", customer_id=customer, meter_value=value,
              meter_time_in_millis=NOW - offset_ms, dimensions={"region": region})
        for customer, value, offset_ms, region in (
            ("acme", Decimal("0.1"), 0, "eu"), ("acme", 2, 61_000, "us"),
            ("beta", 10**20, 3_600_000, "eu"))])
    return engine


async def test_api_query_is_the_engines_query_in_camel_case(loaded: Engine) -> None:
    body = {"meterApiName": "api_calls", "startMs": NOW - 86_400_000, "endMs": NOW + 1,
            "window": "MINUTE", "timezone": "Asia/Kolkata", "groupBy": ["customer_id"],
            "take": {"limit": 1}}
    async with open_http(loaded) as server:
        response = await http("POST", url(server, "/api/query/"), json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = await loaded.query(Query(
            meter_api_name="api_calls", start_ms=NOW - 86_400_000, end_ms=NOW + 1,
            window="minute", timezone="Asia/Kolkata", group_by=["customer_id"],
            take=Take(limit=1)))
        assert answer["window"] == "minute" and answer["timezone"] == "Asia/Kolkata"
        assert [(r["windowStartMs"], r["group"], r["value"]) for r in answer["rows"]] == [
            (r.window_start_ms, r.group, r.value) for r in expected.rows]
        assert '"value":100000000000000000000' in response.text  # no float, no string
        whole = await http("POST", url(server, "/api/query"), json={
            "meterApiName": "api_calls", "startMs": 0, "endMs": NOW + 1,
            "filter": {"region": ["eu"]}})
        assert json.loads(whole.text, parse_float=Decimal)["rows"][0]["value"] == 10**20 + Decimal(
            "0.1")
        assert '"value":100000000000000000000.1' in whole.text
        for bad in ({"meterApiName": "api_calls", "startMs": 0, "endMs": 1, "window": "year"},
                    {"meterApiName": "api_calls", "startMs": 0, "endMs": 1, "timezone": "Mars"},
                    {"meterApiName": "api_calls", "startMs": 5, "endMs": 1},
                    {"startMs": 0}):
            refused = await http("POST", url(server, "/api/query"), json=bad)
            assert refused.status_code == 400, (bad, refused.text)


async def test_metrics_in_prometheus_text_format(loaded: Engine) -> None:
    async with open_http(loaded) as server:
        await http("POST", url(server, "/ingest"), json={
            "customerId": "acme", "meterApiName": "api_calls", "meterValue": 1,
            "meterTimeInMillis": NOW, "uniqueId": "m1"})
        await http("POST", url(server, "/ingest"), json={
            "customerId": "acme", "meterApiName": "api_calls", "meterValue": 1,
            "meterTimeInMillis": NOW, "uniqueId": "m1"})
        await http("POST", url(server, "/api/query"), json={
            "meterApiName": "api_calls", "startMs": 0, "endMs": NOW})
        response = await http("GET", url(server, "/metrics"))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = _samples(response.text)
        assert samples["meter_events_accepted_total"] == 4  # 3 embedded + 1 over HTTP
        assert samples["meter_events_duplicate_total"] == 1
        assert samples["meter_ingest_duration_seconds_count"] == 2
        assert samples["meter_query_duration_seconds_count"] == 1
        assert samples['meter_http_requests_total{method="POST",route="/ingest",status="200"}'] == 2
        assert samples["meter_series"] >= 1


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_openapi_document_and_schemathesis_against_the_live_server(
        loaded: Engine) -> None:
    await _openapi_and_schemathesis(loaded, EXAMPLES)


@pytest.mark.slow
async def test_schemathesis_soak(loaded: Engine) -> None:
    # SOAK_EXAMPLES per route over every route: bounded in count, longer than 30 s.
    await _openapi_and_schemathesis(loaded, SOAK_EXAMPLES, timeout_s=900)


async def _openapi_and_schemathesis(loaded: Engine, examples: int,
                                    timeout_s: float = 30) -> None:
    async with open_http(loaded, timeout_s, max_body_bytes=256 * 1024) as server:
        response = await http("GET", url(server, "/openapi.json"))
        assert response.status_code == 200
        document = response.json()
        assert document["openapi"] == "3.1.0"
        routes = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item}
        assert routes == {(r.method, r.path) for r in server.app.router.routes()}
        failures = await trio.to_thread.run_sync(
            _run_schemathesis, document, f"http://127.0.0.1:{server.port}", examples)
        assert not failures, "\n".join(failures)


def _run_schemathesis(document: dict[str, Any], base_url: str, examples: int) -> list[str]:
    """Every operation, ``examples`` generated cases each: no 5xx, answers match the schema."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_dict(document)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.definition.raw.get("x-stream"):
            continue  # an event stream never ends by itself: tests/test_http_limits.py

        @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                             derandomize=True, suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy())
        def check(case: Any) -> None:
            case.call_and_validate(base_url=base_url, checks=checks, timeout=10)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report all
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    return failures
