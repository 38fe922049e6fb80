"""OpenMeter ingest: ``POST /api/v1/events`` with CloudEvents, the meters' CloudEvent
mapping (``event_type``, ``value_property``, ``dimension_paths``), and its errors."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine import Engine, Meter, Query, open_engine
from engine.auth import parse_keys
from engine.domain import records
from engine.domain.meters import IngestRules, check_meter, merge_meter
from engine.errors import MeterConflict
from engine.schema import parse_path
from tests.http_support import NOW, http, open_http, url

SINGLE = {"Content-Type": "application/cloudevents+json"}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}
KEYS = parse_keys({"keys": [
    {"key": "admin-key", "scopes": ["admin", "ingest", "query"]},
    {"key": "acme-key", "scopes": ["ingest", "query"], "customer_id": "acme"},
]})
ADMIN = {"Authorization": "Bearer admin-key"}


def iso(ms: int, offset_hours: int = 0) -> str:
    """RFC 3339 with milliseconds, in the zone ``offset_hours`` east of UTC."""
    zone = UTC if not offset_hours else timezone(timedelta(hours=offset_hours))
    text = datetime.fromtimestamp(ms // 1000, zone).strftime("%Y-%m-%dT%H:%M:%S")
    suffix = "Z" if not offset_hours else f"{offset_hours:+03d}:00"
    return f"{text}.{ms % 1000:03d}{suffix}"


def cloud(event_id: str, subject: str = "acme", data: Any = None, *,
          type_: str = "llm.request", source: str = "api", time: str | None = None
          ) -> dict[str, Any]:
    event: dict[str, Any] = {"specversion": "1.0", "id": event_id, "source": source,
                             "type": type_, "subject": subject}
    if time is not None:
        event["time"] = time
    if data is not None:
        event["data"] = data
    return event


async def define(server: Any) -> None:
    for meter in (
        {"meterApiName": "tokens", "aggregation": "sum", "eventType": "llm.request",
         "valueProperty": "$.usage.tokens", "dimensionPaths": {"model": "$.model",
                                                               "cached": "$['is cached']"}},
        {"meterApiName": "requests", "aggregation": "count", "eventType": "llm.request"},
        {"meterApiName": "users", "meterType": "active_users",
         "aggregationDimensions": ["user"], "eventType": "llm.request",
         "valueProperty": "$.user"},
        {"meterApiName": "calls", "aggregation": "sum"},  # no mapping: not fed by CloudEvents
    ):
        answer = await http("POST", url(server, "/meters"), json=meter, headers=ADMIN)
        assert answer.status_code == 200, answer.text


async def totals(engine: Engine, group_by: list[str] | None = None) -> dict[str, Any]:
    found = {}
    for meter in ("tokens", "requests", "users"):
        result = await engine.query(Query(meter_api_name=meter, start_ms=0,
                                          end_ms=NOW + 3_600_000, group_by=group_by or []))
        found[meter] = [(row.group, row.value) for row in result.rows]
    return found


async def test_cloudevents_feed_every_meter_of_their_type(engine: Engine) -> None:
    async with open_http(engine, keys=KEYS) as server:
        await define(server)
        listed = (await http("GET", url(server, "/meters?meterApiName=tokens"),
                             headers=ADMIN)).json()
        assert listed[0]["eventType"] == "llm.request"
        assert listed[0]["dimensionPaths"] == {"model": "$.model", "cached": "$['is cached']"}
        events = url(server, "/api/v1/events")
        one = await http("POST", events, headers={**SINGLE, **ADMIN}, data=json.dumps(cloud(
            "e1", data={"usage": {"tokens": 10}, "model": "gpt", "user": "u1",
                        "is cached": True}, time=iso(NOW - 60_000))))
        assert one.status_code == 204 and one.content == b"", one.text
        assert "content-type" not in one.headers
        batch = [
            cloud("e2", data={"usage": {"tokens": 0.1}, "model": "gpt", "user": "u2"},
                  time=iso(NOW - 59_999)),
            cloud("e3", "beta", data={"usage": {"tokens": "2.25"}, "user": 7, "model": None},
                  time=iso(NOW - 3_600_000 + 5, offset_hours=5)),
            cloud("e1", data={"usage": {"tokens": 10**20}, "user": "u1"}, source="batch"),
        ]
        many = await http("POST", events, headers={**BATCH, **ADMIN,
                                                   "Content-Encoding": "gzip"},
                          data=gzip.compress(json.dumps(batch).encode()))
        assert many.status_code == 204, many.text
        assert await totals(engine) == {
            "tokens": [({}, 10 + Decimal("0.1") + Decimal("2.25") + 10**20)],
            "requests": [({}, 4)],
            "users": [({}, 3)],  # u1, u2 and "7" (a number, as its text)
        }
        by_model = await engine.query(Query(meter_api_name="tokens", start_ms=0,
                                            end_ms=NOW + 1, group_by=["model", "cached"]))
        assert [(r.group, r.value) for r in by_model.rows] == [
            ({"model": None, "cached": None}, Decimal("2.25") + 10**20),
            ({"model": "gpt", "cached": None}, Decimal("0.1")),
            ({"model": "gpt", "cached": "true"}, 10)]
        # the event times, to the millisecond, offsets honoured; no time: the server clock
        minutes = await engine.query(Query(meter_api_name="requests", start_ms=NOW - 86_400_000,
                                           end_ms=NOW + 60_000, window="minute",
                                           group_by=["customer_id"]))
        assert [(r.window_start_ms, r.group["customer_id"]) for r in minutes.rows] == [
            ((NOW - 3_600_000) // 60_000 * 60_000, "beta"),
            ((NOW - 60_000) // 60_000 * 60_000, "acme"),
            (NOW // 60_000 * 60_000, "acme")]
        # a retry of the same events is absorbed: source + id is the unique id
        before = engine.statistics().events_duplicate
        again = await http("POST", events, headers={**BATCH, **ADMIN}, data=json.dumps(batch))
        assert again.status_code == 204
        assert engine.statistics().events_duplicate == before + 3 * 3
        assert (await totals(engine))["requests"] == [({}, 4)]
        # a customer-bound key sends only its own customer's events
        payload = {"usage": {"tokens": 1}, "user": "u1"}
        foreign = await http("POST", events, headers={**BATCH, "X-API-KEY": "acme-key"},
                             data=json.dumps([cloud("x1", data=payload),
                                              cloud("x2", "beta", data=payload)]))
        assert foreign.status_code == 403, foreign.text
        own = await http("POST", events, headers={**SINGLE, "X-API-KEY": "acme-key"},
                         data=json.dumps(cloud("x3", data={"usage": {"tokens": 1},
                                                           "user": "u1"})))
        assert own.status_code == 204
        assert (await totals(engine))["requests"] == [({}, 5)]


async def test_a_bad_event_refuses_the_whole_request_naming_each(engine: Engine) -> None:
    async with open_http(engine) as server:
        await define(server)
        events = url(server, "/api/v1/events")
        good = cloud("g1", data={"usage": {"tokens": 1}, "user": "u1"})
        bad = [
            good,
            {"specversion": "1.0", "id": "b1", "source": "api", "type": "llm.request"},
            cloud("b2", type_="nobody.listens"),
            cloud("b3", data={"usage": {"tokens": "lots"}, "user": "u1"}),
            cloud("b4", data={"usage": {"tokens": 1}, "user": "u1"}, time="yesterday"),
            cloud("b5", data={"usage": {"tokens": 1}, "user": "u1"},
                  time=iso(NOW - 90 * 86_400_000)),  # older than the late limit
            cloud("b6", data={"usage": {"tokens": 1}, "user": {"id": 1}}),
            cloud("b7", data={"usage": {"tokens": 1}}),  # users: nothing to count
            {**cloud("b8"), "specversion": "0.3"},
            cloud("b9", data=[1, 2]),
            cloud("b10", data={"usage": {"tokens": 1}, "user": "u"}, time="2026-01-01T00:00"),
        ]
        answer = await http("POST", events, headers=BATCH, data=json.dumps(bad))
        assert answer.status_code == 400, answer.text
        body = answer.json()
        assert body["code"] == "batch_rejected"
        reasons = {p["index"]: p["reason"] for p in body["problems"]}
        assert sorted(reasons) == [1, 2, 3, 4, 6, 7, 8, 9, 10]  # 5 passes here...
        assert "subject" in reasons[1] and "nobody.listens" in reasons[2]
        assert "'lots', not a number" in reasons[3] and "RFC 3339" in reasons[4]
        assert "JSON object" in reasons[6] and "missing" in reasons[7]
        assert "specversion" in reasons[8] and "data must be a JSON object" in reasons[9]
        assert "time zone" in reasons[10]
        late = await http("POST", events, headers=BATCH, data=json.dumps([good, bad[5]]))
        assert late.status_code == 400  # ...and the engine refuses it: named by its index
        assert {p["index"] for p in late.json()["problems"]} == {1}
        assert await totals(engine) == {"tokens": [], "requests": [], "users": []}
        metrics = (await http("GET", url(server, "/metrics"))).text
        assert 'meter_events_rejected_total{reason="invalid_record"} 9.0' in metrics
        for headers, data, status in (
            ({"Content-Type": "text/plain"}, json.dumps(good), 415),
            ({}, json.dumps(good), 415),
            (BATCH, json.dumps(good), 400),  # a batch must be an array
            (SINGLE, json.dumps([good]), 400),  # one event must be an object
            (SINGLE, "{not json", 400),
            (BATCH, json.dumps([1]), 400),
        ):
            refused = await http("POST", events, headers=headers, data=data)
            assert refused.status_code == status, (headers, data, refused.text)
            assert "error" in refused.json()
        plain = await http("POST", events, headers={"Content-Type": "application/json"},
                           data=json.dumps([good]))
        assert plain.status_code == 204
        empty = await http("POST", events, headers=BATCH, data="[]")
        assert empty.status_code == 204
        assert (await totals(engine))["requests"] == [({}, 1)]


async def test_the_mapping_survives_a_restart_and_old_meter_records_decode(
        tmp_path: Path) -> None:
    old = msgspec.msgpack.encode({"name": "old", "aggregation": "sum"})  # before the fields
    assert records.decode_meter(old) == Meter(name="old")
    mapped = Meter(name="tokens", event_type="llm.request", value_property="$.tokens",
                   dimension_paths={"model": "$.model"})
    async with open_engine(tmp_path / "data", shards=2, clock_ms=lambda: NOW) as eng:
        await eng.define_meter(mapped)
        # an older client's idempotent define keeps the mapping
        assert await eng.define_meter(Meter(name="tokens")) == mapped
        with pytest.raises(MeterConflict):
            await eng.define_meter(Meter(name="tokens", event_type="other",
                                         value_property="$.tokens"))
    async with open_engine(tmp_path / "data", shards=2, clock_ms=lambda: NOW) as eng:
        assert eng.meters() == [mapped]


def test_meter_mapping_rules() -> None:
    rules = IngestRules()
    plain = check_meter(Meter(name="m"), rules)
    with_mapping = check_meter(Meter(name="m", event_type="t", value_property="$.v"), rules)
    assert merge_meter(plain, with_mapping) is True  # a meter may gain a mapping
    assert merge_meter(with_mapping, plain) is False  # a define without one keeps it
    assert merge_meter(with_mapping, with_mapping) is False
    for bad, reason in (
        (Meter(name="m", value_property="$.v"), "need an event_type"),
        (Meter(name="m", event_type="t"), "needs value_property"),
        (Meter(name="m", event_type=""), "non-empty"),
        (Meter(name="m", event_type="t", value_property="v"), "must start with"),
        (Meter(name="m", event_type="t", value_property="$.a[0]"), "only .name"),
        (Meter(name="u", aggregation="unique_count", unique_dimension="user", event_type="t",
               value_property="$.u", dimension_paths={"user": "$.u"}), "may not name"),
    ):
        with pytest.raises(ValueError, match=reason):
            check_meter(bad, rules)
    assert check_meter(Meter(name="c", aggregation="count", event_type="t"), rules)
    assert parse_path("$.a['b.c'].d") == ("a", "b.c", "d")
