"""Smoke test of ``benchmarks/growth.py``: a tiny run end to end, its answers against a model.

The benchmark spawns its worker and restart children itself and calls
``trio.run`` in them, so this is a plain sync test. The model here is built
independently of the traffic's own bookkeeping: every event the traffic sends,
regenerated in this process, deduplicated by unique id (first arrival wins),
aggregated naively.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks import growth

ARGV = ["--days", "2", "--customers", "4", "--distinct-per-customer-day", "10",
        "--checkpoint-days", "1", "--query-runs", "3", "--query-budget-s", "1",
        "--pace-events-per-s", "400", "--pace-seconds", "1", "--batch-size", "60",
        "--late-fraction", "0.05", "--retry-fraction", "0.05", "--timeout-s", "60",
        "--report-answers"]


def model_answers(args: Any, days: int) -> tuple[dict[str, Any], int, int]:
    """Per meter: the probe customer's days, every customer's total; and sent, accepted."""
    traffic = growth.Traffic(seed=args.seed, customers=args.customers, aggregations=args.meters,
                             distinct_per_customer_day=args.distinct_per_customer_day,
                             late_fraction=args.late_fraction,
                             retry_fraction=args.retry_fraction)
    seen: set[tuple[str, str, str | None]] = set()
    sent = 0
    by_day: dict[str, dict[int, Any]] = defaultdict(dict)
    totals: dict[str, dict[str, Any]] = defaultdict(dict)
    unique = {m.name for m in traffic.meters if m.aggregation == "unique_count"}
    for minute in range(days * growth.DAY_MINUTES):
        for event in traffic.minute_events(minute):
            sent += 1
            key = (event.meter_api_name, event.customer_id, event.unique_id)
            if key in seen:
                continue
            seen.add(key)
            day = (event.meter_time_in_millis - growth.START_MS) // growth.DAY_MS
            meter, customer = event.meter_api_name, event.customer_id
            if meter in unique:
                user = event.dimensions[growth.UNIQUE_DIMENSION]
                totals[meter].setdefault(customer, set()).add(user)
                if customer == traffic.customer_ids[0]:
                    by_day[meter].setdefault(day, set()).add(user)
            else:
                totals[meter][customer] = totals[meter].get(customer, 0) + event.meter_value
                if customer == traffic.customer_ids[0]:
                    by_day[meter][day] = by_day[meter].get(day, 0) + event.meter_value
    answers: dict[str, Any] = {}
    for meter in by_day:
        def count(value: Any) -> int:
            return len(value) if isinstance(value, set) else int(value)
        answers[f"{meter}/customer_by_day"] = [
            (growth.START_MS + day * growth.DAY_MS, count(v))
            for day, v in sorted(by_day[meter].items())]
        answers[f"{meter}/top10_customers"] = sorted(
            ((count(v), c) for c, v in totals[meter].items()), reverse=True)[:10]
    return answers, sent, len(seen)


def test_a_tiny_growth_run_measures_and_answers_like_the_model(tmp_path: Path) -> None:
    json_path = tmp_path / "growth.json"
    assert growth.main([*ARGV, "--json", str(json_path)]) == 0
    report = json.loads(json_path.read_text())
    args = growth.parse_args(ARGV)
    assert args.checkpoint_days == [1, 2]  # the last day is always a checkpoint

    assert [c["day"] for c in report["checkpoints"]] == [1, 2]
    for checkpoint in report["checkpoints"]:
        expected, sent, accepted = model_answers(args, checkpoint["day"])
        assert checkpoint["events_sent"] == sent
        assert checkpoint["events_accepted"] == accepted
        assert checkpoint["duplicates"] == sent - accepted > 0  # the retries, every one
        answers = checkpoint["answers"]
        for name, rows in expected.items():
            got = answers[name]
            if name.endswith("customer_by_day"):
                assert [(r[0], int(r[2])) for r in got] == rows, name
            else:  # top 10 of 4 customers: every customer, with its own total, in order
                assert [int(r[2]) for r in got] == [v for v, _ in rows], name
                assert sorted((int(r[2]), dict(r[1])["customer_id"]) for r in got) == sorted(
                    rows), name
        # The figures: present and positive.
        for key in ("rss_bytes", "rss_anon_bytes", "rss_peak_bytes", "ram_bytes_per_event",
                    "data_file_bytes", "disk_bytes_per_event", "restart_s",
                    "restart_rss_peak_bytes"):
            assert checkpoint[key] > 0, key
        ingest = checkpoint["ingest"]
        assert ingest["events_per_s"] > 0
        assert 0 < ingest["ack_p50_ms"] <= ingest["ack_p99_ms"] <= ingest["ack_max_ms"]
        assert ingest["loop_stall_max_ms"] >= 0
        assert len(checkpoint["queries"]) == 6  # three shapes on two meters
        for figures in checkpoint["queries"].values():
            assert figures["cold_ms"] > 0 and figures["warm_runs"] >= 1
            assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    paced = report["paced"]
    assert paced["events_sent"] > 0 and paced["ack_count"] > 0
    assert paced["ack_max_ms"] >= paced["ack_p50_ms"] > 0
    assert paced["snapshot_call_s"] > 0
    assert report["machine"]["python"]


def test_traffic_is_deterministic_and_retries_only_delivered_events() -> None:
    def stream() -> list[Any]:
        traffic = growth.Traffic(seed=3, customers=5, aggregations=["sum", "unique_count"],
                                 distinct_per_customer_day=8, late_fraction=0.05,
                                 retry_fraction=0.05)
        return [e for minute in range(3 * growth.DAY_MINUTES)
                for e in traffic.minute_events(minute)]

    events = stream()
    assert events == stream()
    first: dict[str | None, Any] = {}
    late = changed = 0
    for index, event in enumerate(events):
        original = first.setdefault(event.unique_id, event)
        if original is not event:  # a retry: the same event, or only its timestamp changed
            changed += original.meter_time_in_millis != event.meter_time_in_millis
            assert (original.meter_value, original.dimensions) == (
                event.meter_value, event.dimensions)
        elif index and event.meter_time_in_millis < events[index - 1].meter_time_in_millis:
            late += 1
    assert late > 0 and changed > 0
    # Each customer's unique values per day: exactly the distinct count asked for.
    users = {(e.customer_id, (e.meter_time_in_millis - growth.START_MS) // growth.DAY_MS,
              e.dimensions.get(growth.UNIQUE_DIMENSION)) for e in first.values()
             if e.meter_api_name.startswith("unique_count")}
    per_day: dict[tuple[str, int], int] = defaultdict(int)
    for customer, day, _ in users:
        per_day[(customer, day)] += 1
    assert set(per_day.values()) == {8}


def test_the_paced_trace_runs_and_accounts_for_its_acks(tmp_path: Path) -> None:
    """``benchmarks/paced_trace.py`` (it wraps engine internals: its own process)."""
    json_path = tmp_path / "trace.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "paced_trace.py"
    subprocess.run([sys.executable, str(script), "--days", "2", "--customers", "5",
                    "--pace-seconds", "2", "--pace-events-per-s", "2000", "--slow-ms", "0",
                    "--json", str(json_path)], check=True, capture_output=True, timeout=120)
    result = json.loads(json_path.read_text())
    assert result["build"]["events_accepted"] > 2 * 5 * growth.DAY_MINUTES  # both meters
    assert result["acks"] > 0 and result["acks_over_slow_ms"] == result["acks"]
    work = result["work"]
    assert work["writer: group commit"]["count"] >= result["acks"] // 4
    assert work["shard: apply group"]["count"] > 0
    slowest = result["slowest_acks"][0]
    assert slowest["ack_ms"] >= result["paced"]["ack_p50_ms"]
    assert slowest["overlapping_ms"]  # a slow ack overlapped some traced work
