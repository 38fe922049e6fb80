"""Smoke tests of the benchmark scripts, so they do not rot.

The generator is checked for the properties the benchmarks rely on, and the
ingest benchmark runs end to end on a tiny workload (a real LMDB store, the
floor and the tracemalloc runs), in a few seconds. The benchmark calls
``trio.run`` itself, so these tests are plain sync functions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import statistics
from collections import Counter
from pathlib import Path

import msgspec
import pytest
import trio

from benchmarks import (
    alert_latency,
    backup_latency,
    corrections,
    ingest,
    limit_history,
    query_latency,
    recovery,
    serve,
    suite,
    tcp_ingest,
    workload,
)
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


def test_backup_latency_benchmark_runs_end_to_end(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny store, a backup while two loops ingest, and the same copy inline: the
    figures are in the table and the JSON, and the backup's lsn was checked."""
    out = tmp_path / "backup.json"
    assert backup_latency.main([
        "--store-mb", "1", "--baseline-s", "0.2", "--ingesters", "2", "--shards", "2",
        "--inline", "--dir", str(tmp_path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert backup_latency.format_table(report) in capsys.readouterr().out
    for phase in ("baseline", "backup", "inline"):
        row = report[phase]
        assert row["acks"] > 0 and row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    backup = report["backup"]
    assert backup["lsn"] >= backup["acked_before_lsn"] > 0 and backup["size_bytes"] > 0


def test_limit_history_benchmark_runs_end_to_end() -> None:
    result = limit_history.main(["--quick", "--json"])
    runs = result["runs"]
    assert set(runs) == {"no limit", "month unique_count limit"}
    for run in runs.values():
        assert set(run["median_batch_ms_by_day"]) == {1, 2}
        assert run["last_over_first"] > 0


def test_corrections_benchmark_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    corrections.main(["--events", "20000"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    # The benchmark itself checks that every event was cancelled and no usage is left.
    assert result["events"] == 20_000 and result["cancel_where_s"] > 0
    assert result["other_acks"] >= 1 and result["other_ack_max_ms"] >= result[
        "other_ack_median_ms"]


def test_dedup_index_benchmark_runs_both_layouts(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "dedup_index_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "dedup_index.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--ids", "3000", "--groups", "6", "--batch", "100", "--runs", "3",
                        "--flush-every", "2", "--record-bytes", "100",
                        "--tmpdir", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3,000")]
    assert [row.split("|")[2].strip() for row in rows] == ["btree (format 3-4)", "lsm (format 5)"]


def test_workload_stream_yields_what_generate_collects() -> None:
    kwargs = {"customers": 50, "meters": 6, "events": 1_050, "batch_size": 100,
              "aggregations": workload.AGGREGATIONS_MIXED}
    stream = workload.WorkloadStream(9, **kwargs)  # type: ignore[arg-type]
    streamed = list(stream.batches())
    collected = workload.generate(9, **kwargs)  # type: ignore[arg-type]
    assert streamed == collected.batches
    assert (stream.produced, stream.duplicates) == (1_050, collected.expected_duplicates)
    with pytest.raises(RuntimeError):
        next(stream.batches())


def test_query_latency_checks_answers_against_the_model() -> None:
    """A real server: the three shapes are timed and checked; a wrong model fails loudly."""
    w = workload.generate(4, customers=300, meters=4, events=3_000, batch_size=250,
                          now_ms=query_latency.current_minute_ms(),
                          aggregations=workload.AGGREGATIONS_MIXED)
    plan = query_latency.plan_queries(w)
    assert plan.sample_customers and plan.per_customer_total and plan.per_day_region
    server = serve.ServerProcess(2)
    try:
        trio.run(tcp_ingest.send_workload, server.port, w, 1, 2, 30.0)
        results = trio.run(lambda: query_latency.measure_queries(
            server.port, plan, queries=3, warmup=1, budget_s=5, timeout_s=30))
        assert set(results) == set(query_latency.KINDS)
        for row in results.values():
            assert row["queries"] == 3 and 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert results["top100_customers_month"]["rows_max"] == min(
            100, len(plan.per_customer_total))

        # The busiest customer is in every top 100, so its wrong total must be noticed.
        customer = max(plan.per_customer_total, key=plan.per_customer_total.__getitem__)
        plan.per_customer_total[customer] += 1
        with pytest.raises(ingest.BenchmarkFailure, match="top100"):
            trio.run(lambda: query_latency.measure_queries(
                server.port, plan, queries=1, warmup=0, budget_s=5, timeout_s=30))
    finally:
        server.stop(kill=True)


def test_recovery_benchmark_kills_restarts_and_checks(tmp_path: Path) -> None:
    result = recovery.measure_recovery(shards=2, events=2_000, customers=200, meters=4,
                                       seed=3, in_flight=2, timeout_s=30, tmp_root=str(tmp_path),
                                       start_timeout_s=30)
    assert result["ingest"]["accepted"] + result["ingest"]["duplicates"] == 2_000
    assert result["series_count"] > 0 and result["last_lsn"] > 0
    assert 0 < result["recovery_ms"] / 1000 <= result["ready_s"]
    assert result["wal_bytes_replayed"] > 0
    assert list(tmp_path.iterdir()) == []  # the data directory was removed


def test_suite_runs_end_to_end_and_keeps_the_hand_written_doc(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = suite.parse_args([
        "--quick", "--shards", "2", "--in-flight", "2", "--events", "2000", "--customers",
        "300", "--meters", "4", "--batch-size", "250", "--queries", "3", "--alert-batches",
        "5", "--alert-batch-size", "20", "--recovery-events", "1500", "--memory-events",
        "1000", "--out", str(out), "--json", str(tmp_path / "r.json"), "--timeout-s", "60",
        "--tmpdir", str(tmp_path), "--no-peers",
    ] + ([] if importlib.util.find_spec("matplotlib") else ["--no-plots"]))
    report = suite.run(args)

    assert json.loads((tmp_path / "r.json").read_text())["sizing"]["recommended"] == 2
    [row] = report["sweep"]
    assert row["events_per_s"] > 0 and row["queries"] and row["recovery"]["ready_s"] > 0
    at_scale = report["recovery_at_scale"]
    assert at_scale["events"] == 1_500 and at_scale["ready_s"] > 0
    # The at-scale state is queried too, against a model built while streaming.
    assert set(at_scale["queries"]["results"]) == set(query_latency.KINDS)
    assert at_scale["queries"]["customers_with_events"] > 0
    assert report["peers"]["status"] == "not run (--no-peers)"
    document = (out / "benchmarks.md").read_text()
    # The hand-written part of docs/benchmarks.md is kept; the generated part sits
    # between the markers, and the sizing table ends it.
    hand_written = suite.DOCS.read_text().split(suite.BEGIN)[0]
    assert document.startswith(hand_written)
    generated = document.split(suite.BEGIN)[1].split(suite.END)[0]
    assert "### Choosing a shard count" in generated
    assert "| 2 (recommended) |" in generated
    assert "| 8, at scale |" in generated
    assert generated.rstrip().splitlines()[-1].startswith("**Rule of thumb")
    if importlib.util.find_spec("matplotlib"):
        for name in ("throughput", "latency", "recovery"):
            assert (out / "bench" / f"{name}.png").stat().st_size > 1000
            assert f"(bench/{name}.png)" in generated
        from benchmarks import plots  # the plots redraw from the saved results alone

        assert plots.main([str(tmp_path / "r.json"), str(tmp_path / "redrawn")]) == 0
        assert (tmp_path / "redrawn" / "latency.png").stat().st_size > 1000
    assert not (tmp_path / "docs").exists()


def test_generated_section_is_replaced_and_nothing_else() -> None:
    before = "# T\n\nhand\n\n" + suite.BEGIN + "\n\nold\n\n" + suite.END + "\n\ntail\n"
    after = suite.replace_generated(before, "new")
    assert after == "# T\n\nhand\n\n" + suite.BEGIN + "\n\nnew\n\n" + suite.END + "\ntail\n"
    assert suite.replace_generated("# T\n", "new").endswith(suite.END + "\n")
    assert suite.run_peers(suite.parse_args(["--no-peers"]))["status"] == "not run (--no-peers)"
