"""benchmarks/http_ingest.py runs end to end on a tiny workload and checks its counts."""

from __future__ import annotations

from benchmarks import http_ingest


def test_http_ingest_benchmark_runs_and_compares_both_transports() -> None:
    args = http_ingest.parse_args(["--events", "3000", "--batch-sizes", "500", "--repeats", "1",
                                   "--shards", "2", "--connections", "2", "--in-flight", "2"])
    report = http_ingest.run(args)
    [row] = report["results"]
    assert row["batch_size"] == 500
    assert row["tcp_events_per_s"] > 0 and row["http_events_per_s"] > 0
    assert row["http_to_tcp"] == row["http_events_per_s"] / row["tcp_events_per_s"]
    assert "| 500 |" in http_ingest.format_table(report)
