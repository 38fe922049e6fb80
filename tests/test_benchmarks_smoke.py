"""Smoke tests of the benchmark scripts, so they do not rot.

The generator is checked for the properties the benchmarks rely on, and the
ingest benchmark runs end to end on a tiny workload (a real LMDB store, the
floor and the tracemalloc runs), in a few seconds. The benchmark calls
``trio.run`` itself, so these tests are plain sync functions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from benchmarks import alert_latency, ingest, workload
from engine import Event

DAY_MS = 86_400_000


def test_generator_is_seeded_and_has_the_promised_shape() -> None:
    w = workload.generate(7, customers=200, meters=4, events=5_000, batch_size=300,
                          duplicate_fraction=0.02, late_fraction=0.1)
    again = workload.generate(7, customers=200, meters=4, events=5_000, batch_size=300,
                              duplicate_fraction=0.02, late_fraction=0.1)
    assert w.encoded == again.encoded

    events = [event for batch in w.batches for event in batch]
    assert w.event_count == len(events) == 5_000
    assert [len(b) for b in w.batches] == [300] * 16 + [200]
    assert [m.aggregation for m in w.meters] == ["sum", "count", "sum", "count"]

    # The encoded bytes are the batches.
    decoded = [msgspec.msgpack.decode(raw, type=list[Event]) for raw in w.encoded]
    assert decoded == w.batches

    # Duplicates: exact retries of earlier events, and exactly as many as announced.
    seen: dict[tuple[str, str, str], Event] = {}
    duplicates = 0
    for event in events:
        assert event.unique_id
        key = (event.meter_api_name, event.customer_id, event.unique_id)
        if key in seen:
            duplicates += 1
            assert seen[key] == event
        seen[key] = event
    assert duplicates == w.expected_duplicates
    assert 50 <= duplicates <= 150  # ~2% of 5000
    assert len({e.unique_id for e in events}) == 5_000 - duplicates

    # Timestamps within the engine's late limit and not in the future; some out of order.
    times = [e.meter_time_in_millis for e in events]
    assert min(times) >= w.now_ms - 34 * DAY_MS
    assert max(times) <= w.now_ms
    assert sum(1 for t in times if t < w.now_ms - 30 * DAY_MS) > 0  # late beyond the span
    out_of_order = sum(1 for batch in w.batches for a, b in itertools.pairwise(batch)
                       if b.meter_time_in_millis < a.meter_time_in_millis)
    assert 200 <= out_of_order <= 1_200  # ~10% late events, each breaks order about twice

    # Zipf: the top customer is far busier than the median one.
    per_customer = Counter(e.customer_id for e in events)
    counts = [per_customer.get(c, 0) for c in w.customer_ids]
    assert counts[0] == max(counts)
    assert counts[0] > 10 * statistics.median(counts)

    # Dimensions: 0 to 3 per event, from small vocabularies.
    assert {len(e.dimensions) for e in events} == {0, 1, 2, 3}
    assert {e.dimensions.get("region") for e in events} <= {*workload.REGIONS, None}


def test_generator_mixed_aggregations_and_no_ids() -> None:
    w = workload.generate(3, customers=20, meters=7, events=700, batch_size=100,
                          aggregations=workload.AGGREGATIONS_MIXED, unique_ids=False)
    aggregations = [m.aggregation for m in w.meters]
    assert sum(a in ("sum", "count") for a in aggregations) * 2 >= len(aggregations)
    unique_meter = next(m for m in w.meters if m.aggregation == "unique_count")
    events = [e for batch in w.batches for e in batch]
    assert all(e.unique_id is None for e in events)
    assert w.expected_duplicates == 0
    assert all("user" in e.dimensions for e in events
               if e.meter_api_name == unique_meter.name)


def test_ingest_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ingest.parse_args([
        "--quick", "--events", "2000", "--customers", "300", "--batch-size", "200",
        "--in-flight", "1,4", "--shards", "3", "--memory-events", "1000",
        "--tmpdir", str(tmp_path), "--json", str(out), "--timeout-s", "60",
    ])
    results = ingest.run(args)

    assert json.loads(out.read_text())["summary"] == json.loads(
        json.dumps(results["summary"])
    )
    assert results["checks"] == {"accepted_plus_duplicates_equals_sent": True,
                                 "duplicates_equal_expected": True}
    for in_flight in ("1", "4"):
        row = results["summary"]["engine"][in_flight]
        assert row["events_per_s"] > 0
        assert 0 < row["ack_p50_ms"] <= row["ack_p99_ms"]
        assert row["ratio_to_floor"] > 0
        run = results["engine_runs"][in_flight][0]
        assert run["accepted"] + run["duplicates"] == 2000
        assert run["duplicates"] > 0
    assert results["summary"]["floor"]["events_per_s"] > 0
    assert results["engine_statistics"]["bucket_count"] > 0
    for shape in ("headline", "100_buckets_per_series", "100_buckets_per_series_no_ids"):
        assert results["memory"][shape]["bytes_per_bucket"] > 0
    assert list(tmp_path.iterdir()) == [out]  # temporary LMDB directories were removed


def test_engine_run_fails_loudly_on_a_wrong_duplicate_count(tmp_path: Path) -> None:
    w = workload.generate(5, customers=50, events=500, batch_size=100)
    lying = dataclasses.replace(w, expected_duplicates=w.expected_duplicates + 1)
    with pytest.raises(ingest.BenchmarkFailure, match="duplicates"):
        ingest.run_engine(lying, shards=2, in_flight=2, timeout_s=30, tmp_root=str(tmp_path))


def test_alert_latency_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """A real ``meter serve`` subprocess, one subscriber, a few batches: every alert the
    acks named arrives once, and the figures are in the report and the JSON."""
    out = tmp_path / "alerts.json"
    args = alert_latency.parse_args([
        "--quick", "--batches", "6", "--batch-size", "20", "--crossers", "2",
        "--warmup", "1", "--shards", "2", "--json", str(out), "--timeout-s", "30",
    ])
    report = alert_latency.run(args)
    assert json.loads(out.read_text())["results"] == json.loads(
        json.dumps(report["results"]))
    [row] = report["results"]
    assert row["alerts"] == 12 and row["timed_alerts"] == 10
    for name in ("ack_to_alert", "send_to_alert", "ack"):
        figures = row[name]
        assert figures["min_ms"] <= figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    assert 0 < row["send_to_alert"]["min_ms"] and row["ack"]["min_ms"] > 0
    assert row["send_to_alert"]["max_ms"] < 10_000
    assert "| 1 | 10 |" in alert_latency.format_table(report)
