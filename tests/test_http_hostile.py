"""Hostile bodies over HTTP (the fuzzing of tests/test_hostile.py, extended to HTTP): random
bytes, random JSON and broken gzip on every body-taking route never get a 5xx, every refusal
is a JSON error, and a refused ingest applies nothing."""

from __future__ import annotations

import gzip
import json
from typing import Any

import hypothesis
import requests
import trio
from hypothesis import strategies as st

from engine import Engine, Meter
from tests.http_support import open_http

ROUTES = ("/ingest", "/usage", "/usage/batch", "/meters", "/api/query", "/api/v1/events",
          "/webhooks/redeliver")
EXAMPLES = 50

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)
ingest_like = st.fixed_dictionaries({}, optional={
    "customerId": st.text(max_size=5) | st.integers(),
    "meterApiName": st.sampled_from(["api_calls", "nope", ""]) | st.integers(),
    "meterValue": st.integers() | st.floats() | st.text(max_size=5),
    "meterTimeInMillis": st.integers() | st.floats(),
    "uniqueId": st.text(max_size=5) | st.none(),
    "dimensions": json_values,
})
cloud_like = st.fixed_dictionaries({}, optional={
    "specversion": st.sampled_from(["1.0", "0.3"]) | st.integers(),
    "id": st.text(max_size=5) | st.integers(),
    "source": st.text(max_size=5),
    "type": st.sampled_from(["calls.made", "nobody"]) | st.none(),
    "subject": st.text(max_size=5) | st.none(),
    "time": st.sampled_from(["2026-09-21T14:13:20Z", "2026-09-21T14:13:20", "now"]),
    "data": json_values | st.fixed_dictionaries({"n": st.integers() | st.floats()
                                                  | st.text(max_size=5)}),
})
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(ingest_like, max_size=5).map(lambda v: json.dumps(v).encode()),
    st.lists(cloud_like, max_size=5).map(lambda v: json.dumps(v).encode()),
)


async def test_hostile_bodies_never_get_a_server_error(engine: Engine) -> None:
    await engine.define_meter(Meter(name="api_calls", aggregation="sum"))
    await engine.define_meter(Meter(name="cloud_calls", event_type="calls.made",
                                    value_property="$.n", dimension_paths={"n": "$.n"}))
    async with open_http(engine, max_body_bytes=64 * 1024) as server:
        base = f"http://127.0.0.1:{server.port}"
        failures, sent = await trio.to_thread.run_sync(_fuzz, base)
        assert not failures, failures[:5]
        assert sent >= EXAMPLES
        # Whatever got in was valid; nothing refused left a trace (the fixed clock makes
        # most random timestamps too old or too new, so few or none get in at all).
        stats = engine.statistics()
        received = server.metrics.events_received._value.get()
        assert stats.events_accepted + stats.events_duplicate == received


def _fuzz(base: str) -> tuple[list[Any], int]:
    failures: list[Any] = []
    sent = [0]
    session = requests.Session()

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                         derandomize=True, suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(route=st.sampled_from(ROUTES), body=bodies, zipped=st.booleans(),
                      cut=st.integers(0, 30))
    def post(route: str, body: bytes, zipped: bool, cut: int) -> None:
        headers = {"Content-Type": "application/json"}
        if zipped:
            body = gzip.compress(body)
            body = body[: len(body) - cut] if cut < len(body) else body  # sometimes truncated
            headers["Content-Encoding"] = "gzip"
        response = session.post(base + route, data=body, headers=headers, timeout=10)
        sent[0] += 1
        ok = response.status_code == 204 if route == "/api/v1/events" else (
            response.status_code == 200)
        if response.status_code >= 500 or (not ok and "error" not in response.json()):
            failures.append((route, body[:100], response.status_code, response.text[:200]))

    post()
    session.close()
    return failures, sent[0]
