"""Alert push latency over TCP: from the ingest ack, and from the send, to the alert's
arrival at a subscribed client.

A plain script (not collected by pytest; tests/test_benchmarks_smoke.py runs it on
a tiny workload). Each run starts a fresh ``meter serve`` subprocess on 127.0.0.1
with a fresh data directory (real LMDB, fsync on; ``ServerProcess`` from
``serve.py``), defines a sum meter and a limit, and connects three clients
from this process: an admin, a subscriber (``subscribe(from_seq=0)``) and an
ingester. The ingester sends ``--batches`` batches of ``--batch-size`` events with
``report_alerts=True`` (``--in-flight`` at a time); in each batch ``--crossers``
new customers cross the limit's first threshold, and the other events go to a pool
of customers that stay far below it. So every batch causes exactly ``--crossers``
alerts, and the ack names their seqs.

Per alert (``time.perf_counter``, same process, so the clocks agree):

- **ack → alert**: arrival at the subscriber minus the moment the ingester got the
  ack of the batch that crossed. Negative when the push overtook the ack: the
  engine publishes alerts as the batch is applied, before it acknowledges.
- **send → alert**: arrival minus the moment the ingester started sending the batch.

Correctness is checked before a figure counts: every alert the acks named
arrives exactly once, seqs gap-free, nothing else. The first ``--warmup``
batches are sent and checked but not timed.

    python benchmarks/alert_latency.py --quick    # a few seconds
    python benchmarks/alert_latency.py            # about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkFailure, machine_facts, percentile
from benchmarks.serve import ServerProcess
from engine.client import open_client
from engine.schema import Event, Limit, Meter

THRESHOLD = 1_000_000
POOL_CUSTOMERS = 2_000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workload, one repeat")
    parser.add_argument("--batches", type=int, default=None, help="batches per run")
    parser.add_argument("--batch-size", type=int, default=None, help="events per batch")
    parser.add_argument("--crossers", type=int, default=5,
                        help="customers crossing the threshold in each batch")
    parser.add_argument("--in-flight", default=None,
                        help="comma list of batches in flight, default 1,4 (quick: 1)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches at the start")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = 60 if args.quick else 500
    if args.batch_size is None:
        args.batch_size = 200 if args.quick else 1000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.in_flight = [int(x) for x in (args.in_flight or ("1" if args.quick else "1,4"))
                      .split(",")]
    if not 0 < args.crossers <= args.batch_size:
        parser.error("--crossers must be from 1 to --batch-size")
    if args.batches <= args.warmup:
        parser.error("--batches must exceed --warmup")
    return args


def make_batches(batches: int, batch_size: int, crossers: int,
                 now_ms: int) -> list[list[Event]]:
    """Each batch: ``crossers`` new customers at the threshold, the rest below it."""
    out = []
    pool = 0
    for b in range(batches):
        batch = [Event(meter_api_name="calls", customer_id=f"crosser-{b}-{i}",
                       meter_value=THRESHOLD, meter_time_in_millis=now_ms - i,
                       unique_id=f"x-{b}-{i}")
                 for i in range(crossers)]
        for i in range(batch_size - crossers):
            batch.append(Event(meter_api_name="calls", customer_id=f"pool-{pool % POOL_CUSTOMERS}",
                               meter_value=1, meter_time_in_millis=now_ms - i % 60_000,
                               dimensions={"region": ("eu", "us", "ap")[i % 3]},
                               unique_id=f"p-{b}-{i}"))
            pool += 1
        out.append(batch)
    return out


async def _measure(port: int, batches: list[list[Event]], in_flight: int, warmup: int,
                   timeout_s: float) -> dict[str, Any]:
    expected = sum(1 for batch in batches for e in batch if e.meter_value == THRESHOLD)
    arrivals: dict[int, float] = {}
    duplicates = 0
    sent_at: list[float] = [0.0] * len(batches)
    acked_at: list[float] = [0.0] * len(batches)
    batch_of_seq: dict[int, int] = {}
    queue = list(range(len(batches)))
    queue.reverse()  # pop() from the end: send in order
    with trio.fail_after(timeout_s):
        async with open_client("127.0.0.1", port) as admin, \
                open_client("127.0.0.1", port) as subscriber, \
                open_client("127.0.0.1", port) as ingester:
            await admin.define_meter(Meter(name="calls", aggregation="sum"))
            await admin.add_limit(Limit(id="cap", meter_api_name="calls",
                                        thresholds=[THRESHOLD, 2 * THRESHOLD],
                                        period="total"))
            all_arrived = trio.Event()
            async with subscriber.subscribe(from_seq=0) as alerts:

                async def receive() -> None:
                    nonlocal duplicates
                    async for alert in alerts:
                        now = time.perf_counter()
                        if alert.seq in arrivals:
                            duplicates += 1
                        arrivals.setdefault(alert.seq, now)
                        if len(arrivals) >= expected:
                            all_arrived.set()

                async def send() -> None:
                    while queue:
                        index = queue.pop()
                        sent_at[index] = time.perf_counter()
                        ack = await ingester.ingest(batches[index], report_alerts=True)
                        acked_at[index] = time.perf_counter()
                        if ack.accepted != len(batches[index]):
                            raise BenchmarkFailure(f"batch {index}: {ack.accepted} accepted")
                        for alert in ack.alerts:
                            batch_of_seq[alert.seq] = index

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    started = time.perf_counter()
                    async with trio.open_nursery() as senders:
                        for _ in range(in_flight):
                            senders.start_soon(send)
                    ingest_s = time.perf_counter() - started
                    await all_arrived.wait()
                    await trio.sleep(0.05)  # anything extra would show up now
                    nursery.cancel_scope.cancel()
    if duplicates or len(batch_of_seq) != expected or set(arrivals) != set(batch_of_seq):
        raise BenchmarkFailure(
            f"{len(batch_of_seq)} alerts acknowledged, {len(arrivals)} arrived, "
            f"{duplicates} twice, {expected} expected")
    if sorted(arrivals) != list(range(expected)):
        raise BenchmarkFailure("alert seqs are not gap-free from 0")
    ack_to_alert, send_to_alert, ack_latency = [], [], []
    for seq, arrived in arrivals.items():
        index = batch_of_seq[seq]
        if index < warmup:
            continue
        ack_to_alert.append(arrived - acked_at[index])
        send_to_alert.append(arrived - sent_at[index])
    for index in range(warmup, len(batches)):
        ack_latency.append(acked_at[index] - sent_at[index])
    return {"alerts": expected, "timed_alerts": len(ack_to_alert), "ingest_s": ingest_s,
            "ack_to_alert_s": ack_to_alert, "send_to_alert_s": send_to_alert,
            "ack_s": ack_latency,
            "pushed_before_ack": sum(1 for d in ack_to_alert if d < 0)}


def _figures(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {"p50_ms": 1000 * percentile(ordered, 0.5), "p99_ms": 1000 * percentile(ordered, 0.99),
            "max_ms": 1000 * ordered[-1], "min_ms": 1000 * ordered[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    now_ms = time.time_ns() // 1_000_000
    batches = make_batches(args.batches, args.batch_size, args.crossers, now_ms)
    results = []
    for in_flight in args.in_flight:
        pooled: dict[str, list[float]] = {"ack_to_alert_s": [], "send_to_alert_s": [],
                                          "ack_s": []}
        runs = []
        for _ in range(args.repeats):
            server = ServerProcess(args.shards)
            try:
                measured = trio.run(_measure, server.port, batches, in_flight, args.warmup,
                                    args.timeout_s)
            finally:
                server.stop()
            for name in pooled:
                pooled[name].extend(measured.pop(name))
            runs.append(measured)
        results.append({
            "in_flight": in_flight,
            "alerts": sum(r["alerts"] for r in runs),
            "timed_alerts": sum(r["timed_alerts"] for r in runs),
            "pushed_before_ack": sum(r["pushed_before_ack"] for r in runs),
            "ack_to_alert": _figures(pooled["ack_to_alert_s"]),
            "send_to_alert": _figures(pooled["send_to_alert_s"]),
            "ack": _figures(pooled["ack_s"]),
            "events_per_s": sum(args.batches * args.batch_size / r["ingest_s"] for r in runs)
            / len(runs),
            "runs": runs,
        })
    report = {
        "machine": machine_facts(),
        "parameters": {"batches": args.batches, "batch_size": args.batch_size,
                       "crossers_per_batch": args.crossers, "warmup_batches": args.warmup,
                       "shards": args.shards, "repeats": args.repeats,
                       "in_flight": args.in_flight},
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [
        "| in flight | alerts timed | pushed before ack | ack→alert p50 / p99 / max ms "
        "| send→alert p50 / p99 / max ms | ack p50 / p99 ms | events/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        a, s, k = r["ack_to_alert"], r["send_to_alert"], r["ack"]
        lines.append(
            f"| {r['in_flight']} | {r['timed_alerts']:,} | {r['pushed_before_ack']:,} "
            f"| {a['p50_ms']:.2f} / {a['p99_ms']:.2f} / {a['max_ms']:.2f} "
            f"| {s['p50_ms']:.2f} / {s['p99_ms']:.2f} / {s['max_ms']:.2f} "
            f"| {k['p50_ms']:.2f} / {k['p99_ms']:.2f} | {r['events_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report["machine"], indent=2))
    print(json.dumps(report["parameters"]))
    print(format_table(report))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
