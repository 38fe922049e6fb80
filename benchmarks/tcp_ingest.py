"""End-to-end ingest over TCP: events/s and ack latency, beside the in-process floor.

A plain script (not collected by pytest; tests/test_benchmarks_smoke.py runs it
on a tiny workload). For each (connections, batches in flight per connection)
it starts a fresh ``meter serve`` subprocess on 127.0.0.1 with a fresh data
directory (real LMDB, fsync on), connects with ``engine.client``, sends the
seeded workload (Zipf customers, several meters, dimensions, late and
duplicate events), and measures wall time from the first send to the last ack,
and the latency of every acknowledgement. The server and the load generator
are separate processes on the same 2-core machine. Correctness is checked
before a figure counts: accepted + duplicates must equal the events sent and
the duplicate count must equal the generator's.

    python benchmarks/tcp_ingest.py            # full grid, 3 repeats
    python benchmarks/tcp_ingest.py --quick    # about a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkFailure, machine_facts, percentile
from benchmarks.ingest import run_floor
from benchmarks.serve import ServerProcess
from benchmarks.workload import Workload, generate
from engine.client import open_client

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, one repeat")
    parser.add_argument("--events", type=int, default=None, help="events per run")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--connections", default=None, help="comma list, default 1,4")
    parser.add_argument("--in-flight", default=None, help="comma list, default 1,4,16")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 100_000 if args.quick else 400_000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.connections = [int(x) for x in (args.connections or ("4" if args.quick else "1,4"))
                        .split(",")]
    args.in_flight = [int(x) for x in (args.in_flight or ("4,16" if args.quick else "1,4,16"))
                      .split(",")]
    return args


async def send_workload(port: int, workload: Workload, connections: int, in_flight: int,
                        timeout_s: float) -> dict[str, Any]:
    """Define the workload's meters, then send its batches over ``connections`` clients
    with ``in_flight`` ingests each; check every event was acknowledged once. Returns
    events/s, the elapsed time and the ack latency p50/p99 (ms)."""
    batches = list(enumerate(workload.batches))
    latencies: list[float] = []
    totals = {"accepted": 0, "duplicates": 0}

    async def sender(client: Any) -> None:
        while batches:
            _, batch = batches.pop()
            sent = time.perf_counter()
            ack = await client.ingest(batch)
            latencies.append(time.perf_counter() - sent)
            totals["accepted"] += ack.accepted
            totals["duplicates"] += ack.duplicates

    async def connection() -> None:
        async with open_client("127.0.0.1", port) as client:
            async with trio.open_nursery() as nursery:
                for _ in range(in_flight):
                    nursery.start_soon(sender, client)

    async with open_client("127.0.0.1", port) as admin:
        for meter in workload.meters:
            await admin.define_meter(meter)
    batches.reverse()  # pop() from the end: send in generation order
    with trio.fail_after(timeout_s):
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(connection)
        elapsed_s = time.perf_counter() - started
    if totals["accepted"] + totals["duplicates"] != workload.event_count:
        raise BenchmarkFailure(f"tcp: {totals} for {workload.event_count} events sent")
    if totals["duplicates"] != workload.expected_duplicates:
        raise BenchmarkFailure(
            f"tcp: {totals['duplicates']} duplicates, expected {workload.expected_duplicates}")
    latencies.sort()
    return {"events_per_s": workload.event_count / elapsed_s, "elapsed_s": elapsed_s,
            "ack_p50_ms": 1000 * percentile(latencies, 0.5),
            "ack_p99_ms": 1000 * percentile(latencies, 0.99)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    now_ms = time.time_ns() // 1_000_000
    workload = generate(args.seed, events=args.events, batch_size=args.batch_size, now_ms=now_ms)
    results: list[dict[str, Any]] = []
    floors = []
    for _ in range(args.repeats):
        floors.append(run_floor(workload, timeout_s=args.timeout_s, tmp_root=None)["events_per_s"])
    floor = statistics.median(floors)
    for connections in args.connections:
        for in_flight in args.in_flight:
            runs = []
            for _ in range(args.repeats):
                server = ServerProcess(args.shards)
                try:
                    runs.append(trio.run(send_workload, server.port, workload, connections,
                                         in_flight, args.timeout_s))
                finally:
                    server.stop()
            results.append({
                "connections": connections,
                "in_flight": in_flight,
                "events_per_s": statistics.median(r["events_per_s"] for r in runs),
                "ack_p50_ms": statistics.median(r["ack_p50_ms"] for r in runs),
                "ack_p99_ms": statistics.median(r["ack_p99_ms"] for r in runs),
                "ratio_to_floor": statistics.median(r["events_per_s"] for r in runs) / floor,
                "runs": runs,
            })
    return {
        "machine": machine_facts(),
        "parameters": {"events": args.events, "batch_size": args.batch_size,
                       "shards": args.shards, "repeats": args.repeats, "seed": args.seed,
                       "duplicates": workload.expected_duplicates},
        "floor_events_per_s": floor,
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"in-process floor (decode + LMDB put per batch + dict increment): "
        f"{report['floor_events_per_s']:,.0f} events/s",
        "| connections | in flight / conn | events/s | ack p50 ms | ack p99 ms | ratio to floor |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['connections']} | {r['in_flight']} | {r['events_per_s']:,.0f} | "
                     f"{r['ack_p50_ms']:.2f} | {r['ack_p99_ms']:.2f} | {r['ratio_to_floor']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report["machine"], indent=2))
    print(json.dumps(report["parameters"]))
    print(format_table(report))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
