"""HTTP ingest beside TCP ingest: JSON batches to ``POST /ingest`` against the binary protocol.

A plain script; tests/test_http_bench.py runs it on a tiny workload.
For each batch size (1,000 and 100, the Amberflo SDK's default) it runs the same
seeded workload twice, each time on a fresh ``meter serve --http-port 0`` process
with its own data directory: once over TCP (``engine.client``, the given
connections times batches in flight) and once over HTTP (keep-alive HTTP/1.1
connections, as many as TCP has requests in flight, one request at a time each,
bodies JSON in Amberflo's record shape; ``--gzip`` compresses them as the SDK
does). Bodies are encoded before the clock starts, as the TCP client's frames are
encoded per request anyway: the figure is the server's ingest rate, not the load
generator's JSON encoder. Every run must acknowledge every event: TCP by its acks
(accepted + duplicates = sent, duplicates = the generator's count), HTTP by the
engine's own count afterwards (``events_accepted`` from ``meter stats``).

    python benchmarks/http_ingest.py            # 200k events per run, 3 repeats
    python benchmarks/http_ingest.py --quick    # 50k events, 1 repeat

The goal it checks: HTTP with batches of 1,000 reaches at least 0.7 of TCP's rate
in the same run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h11
import msgspec
import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkFailure, machine_facts, percentile
from benchmarks.serve import ServerProcess
from benchmarks.tcp_ingest import send_workload
from benchmarks.workload import Workload, generate
from engine.client import open_client

HTTP_READY = re.compile(r"HTTP ready on http://[^:]+:(\d+)/")
GOAL_RATIO = 0.7
_json = msgspec.json.Encoder(decimal_format="number")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50k events, one repeat")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1000,100")
    parser.add_argument("--connections", type=int, default=4, help="TCP connections")
    parser.add_argument("--in-flight", type=int, default=4, help="TCP requests per connection")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--gzip", action="store_true", help="gzip HTTP bodies, as the SDK does")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    args.events = args.events or (50_000 if args.quick else 200_000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    return args


def http_bodies(workload: Workload, use_gzip: bool) -> list[bytes]:
    bodies = [_json.encode(batch) for batch in workload.batches]
    return [gzip.compress(body, 1) for body in bodies] if use_gzip else bodies


async def _post_all(port: int, bodies: list[bytes], use_gzip: bool,
                    latencies: list[float]) -> None:
    """One keep-alive connection posting bodies (popped from the shared list) in turn."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    connection = h11.Connection(h11.CLIENT)
    headers = [("host", f"127.0.0.1:{port}"), ("content-type", "application/json")]
    if use_gzip:
        headers.append(("content-encoding", "gzip"))
    async with stream:
        while bodies:
            body = bodies.pop()
            sent = time.perf_counter()
            request = h11.Request(method="POST", target="/ingest",
                                  headers=[*headers, ("content-length", str(len(body)))])
            await stream.send_all(connection.send(request) + connection.send(h11.Data(data=body))
                                  + connection.send(h11.EndOfMessage()))
            status = 0
            text = b""
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    text += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                raise BenchmarkFailure(f"http ingest answered {status}: {text[:300]!r}")
            connection.start_next_cycle()


async def send_http(port: int, tcp_port: int, workload: Workload, bodies: list[bytes],
                    connections: int, use_gzip: bool, timeout_s: float) -> dict[str, Any]:
    async with open_client("127.0.0.1", tcp_port) as admin:
        for meter in workload.meters:
            await admin.define_meter(meter)
    pending = list(reversed(bodies))
    latencies: list[float] = []
    with trio.fail_after(timeout_s):
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(_post_all, port, pending, use_gzip, latencies)
        elapsed_s = time.perf_counter() - started
    async with open_client("127.0.0.1", tcp_port) as admin:
        stats = await admin.stats()
    if (stats["events_accepted"], stats["events_duplicate"]) != (
            workload.expected_accepted, workload.expected_duplicates):
        raise BenchmarkFailure(
            f"http: the engine counted {stats['events_accepted']} accepted and "
            f"{stats['events_duplicate']} duplicates, expected {workload.expected_accepted} "
            f"and {workload.expected_duplicates}")
    latencies.sort()
    return {"events_per_s": workload.event_count / elapsed_s, "elapsed_s": elapsed_s,
            "ack_p50_ms": 1000 * percentile(latencies, 0.5),
            "ack_p99_ms": 1000 * percentile(latencies, 0.99)}


def _http_port(server: ServerProcess) -> int:
    ready = HTTP_READY.search("".join(server.lines))
    if ready is None:
        raise BenchmarkFailure(f"no HTTP ready line in {server.lines!r}")
    return int(ready.group(1))


def run(args: argparse.Namespace) -> dict[str, Any]:
    now_ms = time.time_ns() // 1_000_000
    rows = []
    for batch_size in args.batch_sizes:
        workload = generate(args.seed, events=args.events, batch_size=batch_size, now_ms=now_ms)
        bodies = http_bodies(workload, args.gzip)
        runs: dict[str, list[dict[str, Any]]] = {"tcp": [], "http": []}
        for _ in range(args.repeats):
            for transport in ("tcp", "http"):  # alternate: load bursts hit both alike
                with ServerProcess(args.shards, flags=("--http-port", "0")) as server:
                    if transport == "tcp":
                        result = trio.run(send_workload, server.port, workload,
                                          args.connections, args.in_flight, args.timeout_s)
                    else:
                        result = trio.run(send_http, _http_port(server), server.port, workload,
                                          bodies, args.connections * args.in_flight, args.gzip,
                                          args.timeout_s)
                    server.stop()
                runs[transport].append(result)
                print(f"  batch {batch_size}: {transport} {result['events_per_s']:,.0f} "
                      f"events/s, ack p99 {result['ack_p99_ms']:.1f} ms", flush=True)
        tcp = statistics.median(r["events_per_s"] for r in runs["tcp"])
        http = statistics.median(r["events_per_s"] for r in runs["http"])
        rows.append({"batch_size": batch_size, "tcp_events_per_s": tcp,
                     "http_events_per_s": http, "http_to_tcp": http / tcp,
                     "http_ack_p99_ms": statistics.median(r["ack_p99_ms"] for r in runs["http"]),
                     "tcp_ack_p99_ms": statistics.median(r["ack_p99_ms"] for r in runs["tcp"]),
                     "runs": runs})
    return {"benchmark": "http_ingest", "machine": machine_facts(),
            "parameters": {"events": args.events, "batch_sizes": args.batch_sizes,
                           "tcp_connections": args.connections, "tcp_in_flight": args.in_flight,
                           "http_connections": args.connections * args.in_flight,
                           "shards": args.shards, "repeats": args.repeats, "gzip": args.gzip,
                           "seed": args.seed},
            "goal_ratio": GOAL_RATIO, "results": rows}


def format_table(report: dict[str, Any]) -> str:
    lines = ["| batch | TCP events/s | HTTP events/s | HTTP/TCP | TCP ack p99 ms | "
             "HTTP ack p99 ms |", "|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['batch_size']} | {r['tcp_events_per_s']:,.0f} | "
                     f"{r['http_events_per_s']:,.0f} | {r['http_to_tcp']:.2f} | "
                     f"{r['tcp_ack_p99_ms']:.1f} | {r['http_ack_p99_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report["machine"]))
    print(json.dumps(report["parameters"]))
    print(format_table(report))
    big = [r for r in report["results"] if r["batch_size"] == 1000]
    if big:
        verdict = "met" if big[0]["http_to_tcp"] >= GOAL_RATIO else "NOT met"
        print(f"goal HTTP/TCP >= {GOAL_RATIO} at batches of 1,000: {verdict} "
              f"({big[0]['http_to_tcp']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
