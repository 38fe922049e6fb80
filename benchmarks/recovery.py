"""Recovery time after a SIGKILL: server start to ready, on the state a killed server left.

A plain script (not collected by pytest; tests/test_benchmarks_smoke.py runs it
on a tiny workload). It starts ``meter serve`` (``ServerProcess`` from
``serve.py``) on a fresh data directory, streams a seeded workload into it
over TCP (``WorkloadStream``: batches are generated while earlier ones are in
flight, so a 10M-event state never has to be held by the load generator),
reads the server's statistics, kills it with SIGKILL (no drain, no snapshot on
close), and starts a new server on the same directory.

- **ready_s**: from spawning the new process to its "listening" line, which the
  server prints only once recovery (latest snapshot + write-ahead-log tail) is
  done: the time a restarted server is unavailable, interpreter start included.
- **recovery_ms**: the engine's own figure for loading the snapshot and replaying.
- **first_query_ms**: the first query after ready (one customer, one meter, by day).

Correctness before a figure counts: the recovered server reports the same
series count, bucket count, meter count and last lsn as the killed one did after
its last ack, and answers two probe queries (one customer by day; the top 100
customers of a month) exactly as it did before the kill (every acknowledged
batch was fsynced, so nothing acknowledged may be lost); the ingest acks add up
(accepted + duplicates = sent, duplicates = the generator's count).

    python benchmarks/recovery.py --quick                   # 100k events
    python benchmarks/recovery.py --events 10000000         # minutes: budget it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkFailure, machine_facts
from benchmarks.query_latency import QueryModel, current_minute_ms, measure_queries, month_range
from benchmarks.serve import ServerProcess
from benchmarks.workload import AGGREGATIONS_MIXED, WorkloadStream
from engine.client import open_client
from engine.schema import Event, Query, Take

# events_accepted/duplicate count since the process started, and series/bucket counts
# change with background compaction (a delta merged into its block leaves the counted
# series; a kill between that pass and the checkpoint that writes it brings the delta
# back), so they are not compared: the probe queries' answers are.
COMPARED = ("last_lsn", "meter_count")


PROGRESS_EVERY = 1_000_000


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_memory(pid: int) -> dict[str, float]:
    """Resident memory of a process, and the part not backed by files (LMDB maps excluded).

    From ``/proc/<pid>/statm`` (resident and shared pages); NaN where there is none.
    """
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return {"rss": math.nan, "anon": math.nan}
    resident, shared = int(fields[1]) * PAGE_BYTES, int(fields[2]) * PAGE_BYTES
    return {"rss": resident, "anon": resident - shared}


def _observed(batches: Iterator[list[Event]],
              observe: Callable[[list[Event]], None] | None) -> Iterator[list[Event]]:
    for batch in batches:
        if observe is not None:
            observe(batch)
        yield batch


async def stream_ingest(port: int, stream: WorkloadStream, in_flight: int, timeout_s: float,
                        progress: Callable[[int, float], None] | None = None,
                        observe: Callable[[list[Event]], None] | None = None) -> dict[str, Any]:
    """Send every batch of ``stream`` with ``in_flight`` batches outstanding; check the acks.

    ``progress(events_acknowledged, seconds)`` is called about every million events;
    ``observe(batch)`` sees every batch before it is sent (to build a query model).
    """
    batches = _observed(stream.batches(), observe)
    totals = {"accepted": 0, "duplicates": 0, "events": 0}
    next_report = PROGRESS_EVERY

    async def sender(client: Any) -> None:
        nonlocal next_report
        for batch in batches:  # one shared iterator: each batch is taken by one sender
            ack = await client.ingest(batch)
            totals["accepted"] += ack.accepted
            totals["duplicates"] += ack.duplicates
            totals["events"] += len(batch)
            if progress is not None and totals["events"] >= next_report:
                next_report += PROGRESS_EVERY
                progress(totals["events"], time.perf_counter() - started)

    with trio.fail_after(timeout_s):
        async with open_client("127.0.0.1", port) as client:
            for meter in stream.meters:
                await client.define_meter(meter)
            started = time.perf_counter()  # read by sender() for progress
            async with trio.open_nursery() as nursery:
                for _ in range(in_flight):
                    nursery.start_soon(sender, client)
            elapsed_s = time.perf_counter() - started
            stats = await client.stats()
    if totals["events"] != stream.events or totals["accepted"] + totals["duplicates"] != (
            stream.events):
        raise BenchmarkFailure(f"recovery ingest: {totals} for {stream.events} events")
    if totals["duplicates"] != stream.duplicates:
        raise BenchmarkFailure(f"recovery ingest: {totals['duplicates']} duplicates, "
                               f"expected {stream.duplicates}")
    return {"elapsed_s": elapsed_s, "events_per_s": stream.events / elapsed_s,
            "accepted": totals["accepted"], "duplicates": totals["duplicates"], "stats": stats}


def probe_queries(meter: str, customer: str, now_ms: int) -> list[Query]:
    """One customer by day and the top 100 customers, over the last 30 days."""
    start_ms, end_ms = month_range(now_ms)
    return [Query(meter_api_name=meter, start_ms=start_ms, end_ms=end_ms, window="day",
                  filter={"customer_id": [customer]}),
            Query(meter_api_name=meter, start_ms=start_ms, end_ms=end_ms,
                  group_by=["customer_id"], take=Take(limit=100))]


async def state_of(port: int, probes: Sequence[Query]) -> tuple[dict[str, Any], list[Any], float]:
    """Statistics, the probe queries' rows, and the time of the first probe query."""
    async with open_client("127.0.0.1", port) as client:
        answers = []
        first_query_s = 0.0
        for index, query in enumerate(probes):
            sent = time.perf_counter()
            answers.append((await client.query(query)).rows)
            if index == 0:
                first_query_s = time.perf_counter() - sent
        return await client.stats(), answers, first_query_s


def kill_and_restart(server: ServerProcess, shards: int, probes: Sequence[Query], *,
                     start_timeout_s: float) -> dict[str, Any]:
    """SIGKILL ``server``, start a new one on its directory, check the recovered state.

    The caller owns the directory (``server`` was started with ``data_dir``);
    the restarted server is killed too (a clean stop would write a snapshot).
    """
    before, answers_before, _ = trio.run(state_of, server.port, probes)
    memory_before = process_memory(server.pid)
    server.kill()
    restarted = ServerProcess(shards, data_dir=server.data_dir, start_timeout_s=start_timeout_s)
    try:
        after, answers_after, first_query_s = trio.run(state_of, restarted.port, probes)
        memory_after = process_memory(restarted.pid)
    finally:
        restarted.stop(kill=True)
    lost = {k: (before.get(k), after.get(k)) for k in COMPARED if before.get(k) != after.get(k)}
    if lost:
        raise BenchmarkFailure(f"recovered state differs from the killed server's: {lost}")
    if answers_before != answers_after:
        raise BenchmarkFailure("a probe query answers differently after recovery")
    return {"ready_s": restarted.ready_s, "recovery_ms": restarted.recovery_ms,
            "first_query_ms": 1000 * first_query_s,
            "snapshots_before_kill": before.get("snapshots"),
            "wal_bytes_replayed": before.get("wal_bytes_since_snapshot"),
            "series_count": after.get("series_count"), "bucket_count": after.get("bucket_count"),
            "rss_before_kill_bytes": memory_before["rss"],
            "anon_before_kill_bytes": memory_before["anon"],
            "rss_after_recovery_bytes": memory_after["rss"],
            "anon_after_recovery_bytes": memory_after["anon"],
            "last_lsn": after.get("last_lsn")}


def measure_recovery(*, shards: int, events: int, customers: int, meters: int, seed: int,
                     in_flight: int, timeout_s: float, tmp_root: str | None = None,
                     start_timeout_s: float = 600.0,
                     progress: Callable[[int, float], None] | None = None,
                     queries: int = 0, query_budget_s: float = 10.0) -> dict[str, Any]:
    """Fresh server, stream ``events`` events in, SIGKILL, restart, time it.

    With ``queries`` > 0, the three shapes of ``query_latency.py`` are also timed on
    the full state before the kill, their answers checked against a model built from
    the batches as they were sent.
    """
    stream = WorkloadStream(seed, customers=customers, meters=meters, events=events,
                            now_ms=current_minute_ms(), aggregations=AGGREGATIONS_MIXED)
    probes = probe_queries(stream.meters[0].name, stream.customer_ids[0], stream.now_ms)
    model = (QueryModel(stream.meters, int(str(stream.parameters["max_dimensions"])),
                        stream.now_ms, stream.customer_ids) if queries > 0 else None)
    query_results: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="meter-bench-recovery-", dir=tmp_root) as data_dir:
        server = ServerProcess(shards, data_dir=data_dir)
        try:
            ingest = trio.run(stream_ingest, server.port, stream, in_flight, timeout_s, progress,
                              None if model is None else model.add)
            ingest.pop("stats")
            if model is not None:
                plan = model.plan()
                query_results = {
                    "customers_with_events": plan.customers_with_events,
                    "sample_ranks": plan.sample_ranks,
                    "results": trio.run(lambda: measure_queries(
                        server.port, plan, queries=queries, warmup=2, budget_s=query_budget_s,
                        timeout_s=timeout_s)),
                }
                del model, plan
            recovery = kill_and_restart(server, shards, probes, start_timeout_s=start_timeout_s)
        finally:
            server.stop(kill=True)
    return {"shards": shards, "events": events, "customers": customers, "meters": meters,
            "in_flight": in_flight, "ingest": ingest, "queries": query_results, **recovery}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k events")
    parser.add_argument("--events", type=int, default=None, help="default 1M (quick 100k)")
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--meters", type=int, default=10)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=4, dest="in_flight")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="ingest budget")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 100_000 if args.quick else 1_000_000
    return args


def format_row(r: dict[str, Any]) -> str:
    return (f"| {r['shards']} | {r['events']:,} | {r['series_count']:,} | "
            f"{r['ingest']['events_per_s']:,.0f} | {r['snapshots_before_kill']} | "
            f"{r['wal_bytes_replayed'] / 1e6:.1f} | {r['recovery_ms']:,} | {r['ready_s']:.2f} | "
            f"{r['first_query_ms']:.1f} | {r['anon_before_kill_bytes'] / 1e6:,.0f} / "
            f"{r['anon_after_recovery_bytes'] / 1e6:,.0f} |")


TABLE_HEADER = ("| shards | events ingested | series | ingest events/s | snapshots before kill "
                "| WAL tail MB replayed | engine recovery ms | start → ready s "
                "| first query ms | server MB before kill / after recovery |\n"
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure_recovery(shards=args.shards, events=args.events, customers=args.customers,
                              meters=args.meters, seed=args.seed, in_flight=args.in_flight,
                              timeout_s=args.timeout_s)
    report = {"machine": machine_facts(), "result": result}
    print(json.dumps(report["machine"], indent=2))
    print(TABLE_HEADER)
    print(format_row(result))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
