"""benchmarks/ab.py: the figures it compares are read from each benchmark's JSON."""

from __future__ import annotations

from benchmarks import ab


def test_ingest_figures_are_read_per_in_flight_level() -> None:
    report = {"summary": {"floor": {"events_per_s": 800_000.0}, "engine": {
        "1": {"events_per_s": 200_000.0, "ratio_to_floor": 0.25, "ack_p99_ms": 3.0},
        "4": {"events_per_s": 240_000.0, "ratio_to_floor": 0.3, "ack_p99_ms": 9.5},
    }}}
    assert ab.FIGURES["ingest"](report) == {
        "floor events/s": 800_000.0,
        "in-flight 1 events/s": 200_000.0, "in-flight 1 ratio to floor": 0.25,
        "in-flight 1 ack p99 ms": 3.0,
        "in-flight 4 events/s": 240_000.0, "in-flight 4 ratio to floor": 0.3,
        "in-flight 4 ack p99 ms": 9.5,
    }


def test_tcp_figures_are_read_per_connection_and_in_flight_level() -> None:
    report = {"floor_events_per_s": 900_000.0, "results": [
        {"connections": 4, "in_flight": 16, "events_per_s": 250_000.0, "ratio_to_floor": 0.28,
         "ack_p99_ms": 40.0},
    ]}
    assert ab.FIGURES["tcp_ingest"](report) == {
        "floor events/s": 900_000.0, "4 conn x 16 in flight events/s": 250_000.0,
        "4 conn x 16 in flight ratio to floor": 0.28, "4 conn x 16 in flight ack p99 ms": 40.0,
    }
