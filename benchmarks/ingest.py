"""In-process ingest benchmark: the engine against a floor, side by side.

Benchmark script (not collected by pytest; ``tests/test_benchmarks_smoke.py``
imports it so it does not rot). It may import anything the project depends on.

What it measures, on one seeded workload (``benchmarks/workload.py``):

- **engine**: ``open_engine`` over a real LMDB store (fsync on) in a fresh
  temporary directory; ``--in-flight`` tasks pull encoded batches from one
  shared queue, decode each (``list[Event]``, as a server would) and
  ``await eng.ingest(batch)``. Events/s is the wall time of that ingest phase
  (generation, opening and the final close-time snapshot excluded); ack latency
  is the time of each ``ingest`` call. Correctness is checked after every run:
  accepted + duplicates == events sent, duplicates == the generator's count.
- **floor**: the least any engine must do, on the same encoded batches: decode
  each batch, put it in LMDB in its own write transaction with sync on, and
  one dict increment per event keyed by (customer, meter, minute).
- **memory**: bytes per (series, bucket) under ``tracemalloc``, on smaller
  fresh engines over an in-memory store whose write-ahead log keeps no record
  bytes; the engine decodes each batch itself and drops it, so the net
  allocation is what the engine retains: buckets, series headers, the dedup
  index and per-minute bounds. Shapes: the headline traffic, and ~100 buckets
  per series with and without unique ids.

Every measurement is repeated (``--repeats``) and reported as a median, with
the engine/floor ratio, as a table and as JSON (``--json PATH`` writes it).

    python benchmarks/ingest.py --quick      # ~30-60 s
    python benchmarks/ingest.py              # a few minutes
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import linecache
import math
import pstats
import statistics
import struct
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lmdb
import msgspec
import trio

from benchmarks.common import BenchmarkFailure, machine_facts, percentile
from benchmarks.workload import AGGREGATIONS_MIXED, DAY_MS, Workload, generate
from engine import Event, open_engine
from engine.storage import MemoryStore
from engine.storage.base import RunSlice

REPO_ROOT = Path(__file__).resolve().parent.parent
LSN_KEY = struct.Struct(">Q")
MINUTE_MS = 60_000

QUICK = {"events": 500_000, "in_flight": [4], "repeats": 1, "memory_events": 200_000}
FULL = {"events": 1_000_000, "in_flight": [1, 4, 16], "repeats": 3, "memory_events": 200_000}


# ------------------------------------------------------------------ arguments


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Ingest benchmark: the engine against a decode+LMDB+dict floor."
    )
    parser.add_argument("--quick", action="store_true",
                        help="small run: 500k events, in-flight 4, 1 repeat (~30-60 s)")
    parser.add_argument("--events", type=int, help="events in the workload (full: 1M)")
    parser.add_argument("--shards", type=int, default=8, help="engine shards (default 8)")
    parser.add_argument("--in-flight", type=_int_list, dest="in_flight",
                        help="concurrent ingest tasks, comma separated (full: 1,4,16)")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (full: 3)")
    parser.add_argument("--seed", type=int, default=20250615, help="workload seed")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--meters", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1000, dest="batch_size")
    parser.add_argument("--aggregations", default="sum,count",
                        help="aggregation mix the meters cycle through (default sum,count); "
                             "'mixed' for all seven, at least half sum/count")
    parser.add_argument("--memory-events", type=int, dest="memory_events",
                        help="events for the tracemalloc runs (full: 200k, quick: 50k; 0 skips)")
    parser.add_argument("--timeout-s", type=float, default=900.0, dest="timeout_s",
                        help="time budget of any single run (default 900 s)")
    parser.add_argument("--tmpdir", help="where the temporary LMDB directories go")
    parser.add_argument("--profile", metavar="PATH",
                        help="also cProfile one engine run; print the top 15 by tottime, "
                             "write pstats to PATH")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON results here")
    parser.add_argument("--source", choices=["bytes", "events"], default="bytes",
                        help="bytes: decode each msgpack batch before ingest (as a server "
                             "does; default); events: ingest batches of Event objects "
                             "already built (the embedding API)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.aggregations == "mixed":
        args.aggregations = list(AGGREGATIONS_MIXED)
    else:
        args.aggregations = [a.strip() for a in args.aggregations.split(",") if a.strip()]
    if args.events < 1 or args.repeats < 1 or args.shards < 1 or args.memory_events < 0:
        parser.error("--events, --repeats and --shards must be positive")
    return args


# -------------------------------------------------------------- machine facts


# --------------------------------------------------------------------- engine


def reset_gc() -> None:
    """Give every run the same collector state.

    ``open_engine`` calls ``gc.freeze()``, which leaves the process with an
    almost empty oldest generation: afterwards full collections (which walk
    big dicts such as the floor's) trigger far more often. Unfreezing and
    collecting before each run keeps runs independent of what ran before.
    """
    gc.unfreeze()
    gc.collect()


class GcPauses:
    """Cyclic-GC pauses while active (``gc.callbacks``): collections per generation, time."""

    def __init__(self) -> None:
        self.pauses_s: list[tuple[int, float]] = []
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses_s.append((info["generation"], time.perf_counter() - self._started))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)

    def report(self) -> dict[str, Any]:
        total = sum(pause for _, pause in self.pauses_s)
        return {
            "collections": [sum(1 for g, _ in self.pauses_s if g == gen) for gen in range(3)],
            "total_ms": total * 1000,
            "max_ms": max((pause for _, pause in self.pauses_s), default=0.0) * 1000,
        }


async def _engine_run(
    workload: Workload,
    data_dir: str,
    shards: int,
    in_flight: int,
    timeout_s: float,
    profiler: cProfile.Profile | None,
    source: str = "bytes",
) -> dict[str, Any]:
    now_ms = workload.now_ms
    decoder = msgspec.msgpack.Decoder(list[Event])
    latencies: list[float] = []
    totals = {"accepted": 0, "duplicates": 0, "events": 0}
    opened = time.perf_counter()
    async with open_engine(data_dir, shards=shards, clock_ms=lambda: now_ms) as eng:
        for meter in workload.meters:
            await eng.define_meter(meter)
        send, receive = trio.open_memory_channel[Any](len(workload.encoded))
        # "bytes": decode each batch first, as a server does; "events": batches of Event
        # objects already built, as a program embedding the engine passes them.
        for item in (workload.encoded if source == "bytes" else workload.batches):
            send.send_nowait(item)
        send.close()

        async def ingest_worker() -> None:
            async for item in receive:
                events = decoder.decode(item) if source == "bytes" else item
                started = time.perf_counter()
                ack = await eng.ingest(events)
                latencies.append(time.perf_counter() - started)
                totals["accepted"] += ack.accepted
                totals["duplicates"] += ack.duplicates
                totals["events"] += len(events)

        gc.collect()
        if profiler is not None:
            profiler.enable()
        started = time.perf_counter()
        with GcPauses() as gc_pauses, trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                for _ in range(in_flight):
                    nursery.start_soon(ingest_worker)
        elapsed_s = time.perf_counter() - started
        if profiler is not None:
            profiler.disable()
        stats = eng.statistics()
        closing = time.perf_counter()
    close_s = time.perf_counter() - closing
    open_s = started - opened

    sent = workload.event_count
    problems = []
    if totals["events"] != sent:
        problems.append(f"ingested {totals['events']} events of {sent}")
    if totals["accepted"] + totals["duplicates"] != sent:
        problems.append(f"accepted {totals['accepted']} + duplicates {totals['duplicates']} "
                        f"!= {sent} events sent")
    if totals["duplicates"] != workload.expected_duplicates:
        problems.append(f"engine counted {totals['duplicates']} duplicates, the workload "
                        f"holds {workload.expected_duplicates}")
    if (stats.events_accepted, stats.events_duplicate) != (
        totals["accepted"], totals["duplicates"]
    ):
        problems.append(f"statistics() say {stats.events_accepted} accepted and "
                        f"{stats.events_duplicate} duplicates, the acks say "
                        f"{totals['accepted']} and {totals['duplicates']}")
    if problems:
        raise BenchmarkFailure(f"engine run (in-flight {in_flight}): " + "; ".join(problems))

    latencies.sort()
    return {
        "in_flight": in_flight,
        "elapsed_s": elapsed_s,
        "events_per_s": sent / elapsed_s,
        "ack_p50_ms": percentile(latencies, 0.50) * 1000,
        "ack_p99_ms": percentile(latencies, 0.99) * 1000,
        "ack_max_ms": latencies[-1] * 1000,
        "accepted": totals["accepted"],
        "duplicates": totals["duplicates"],
        "gc_pauses": gc_pauses.report(),
        "open_s": open_s,
        "close_s": close_s,
        "statistics": {
            "series_count": stats.series_count,
            "bucket_count": stats.bucket_count,
            "batches": stats.batches,
            "group_commits": stats.group_commits,
            "last_lsn": stats.last_lsn,
            "snapshots_before_close": stats.snapshots,
        },
    }


def run_engine(
    workload: Workload,
    *,
    shards: int,
    in_flight: int,
    timeout_s: float,
    tmp_root: str | None,
    profiler: cProfile.Profile | None = None,
    source: str = "bytes",
) -> dict[str, Any]:
    """One engine run in a fresh LMDB directory; ``profiler`` covers the ingest phase only."""
    with tempfile.TemporaryDirectory(prefix="meter-bench-engine-", dir=tmp_root) as data_dir:
        reset_gc()
        return trio.run(_engine_run, workload, data_dir, shards, in_flight, timeout_s, profiler,
                        source)


# ---------------------------------------------------------------------- floor


def run_floor(workload: Workload, *, timeout_s: float, tmp_root: str | None) -> dict[str, Any]:
    """Decode each batch, one fsynced LMDB put per batch, one dict increment per event."""
    decoder = msgspec.msgpack.Decoder(list[Event])
    map_bytes = max(64 << 20, 4 * workload.encoded_bytes)
    counts: dict[tuple[str, str, int], int] = {}
    with tempfile.TemporaryDirectory(prefix="meter-bench-floor-", dir=tmp_root) as path:
        env = lmdb.open(path, map_size=map_bytes, sync=True, metasync=True, subdir=True)
        try:
            reset_gc()
            started = time.perf_counter()
            with GcPauses() as gc_pauses:
                events_seen = _floor_loop(workload.encoded, env, decoder, counts,
                                          started + timeout_s)
            elapsed_s = time.perf_counter() - started
        finally:
            env.close()
    if events_seen != workload.event_count or sum(counts.values()) != events_seen:
        raise BenchmarkFailure(f"floor: counted {sum(counts.values())} of {events_seen} events")
    return {"elapsed_s": elapsed_s, "events_per_s": events_seen / elapsed_s,
            "keys": len(counts), "gc_pauses": gc_pauses.report()}


def _floor_loop(
    encoded: list[bytes],
    env: lmdb.Environment,
    decoder: msgspec.msgpack.Decoder[list[Event]],
    counts: dict[tuple[str, str, int], int],
    deadline: float,
) -> int:
    events_seen = 0
    get = counts.get
    for lsn, raw in enumerate(encoded, 1):
        events = decoder.decode(raw)
        with env.begin(write=True) as txn:
            if not txn.put(LSN_KEY.pack(lsn), raw, append=True):
                raise BenchmarkFailure(f"floor: LMDB append refused lsn {lsn}")
        for event in events:
            key = (event.customer_id, event.meter_api_name,
                   event.meter_time_in_millis // MINUTE_MS)
            counts[key] = get(key, 0) + 1
        events_seen += len(events)
        if time.perf_counter() > deadline:
            raise BenchmarkFailure("floor: over its time budget (--timeout-s)")
    return events_seen


# --------------------------------------------------------------------- memory


class _RecordlessStore(MemoryStore):
    """The in-memory store, minus the record bytes: only engine state is left to measure,
    and the dedup index (its memtable; runs written at checkpoints are kept in lists)."""

    def commit(
        self,
        wal: list[tuple[int, bytes]],
        meta: list[tuple[bytes, bytes]],
        alerts: list[tuple[int, bytes]] | None = None,
        ids: list[tuple[bytes, bytes]] | None = None,
        decisions: list[tuple[int, bytes]] | None = None,
        run_slice: RunSlice | None = None,
    ) -> list[bool]:
        return super().commit([(lsn, b"") for lsn, _ in wal], meta, alerts, ids, decisions,
                              run_slice)


async def _memory_run(workload: Workload, shards: int, top: int) -> dict[str, Any]:
    now_ms = workload.now_ms
    decoder = msgspec.msgpack.Decoder(list[Event])
    async with open_engine(store=_RecordlessStore(), shards=shards,
                           clock_ms=lambda: now_ms) as eng:
        for meter in workload.meters:
            await eng.define_meter(meter)
        gc.collect()
        tracemalloc.start(1)
        try:
            before = tracemalloc.take_snapshot()
            before_bytes = tracemalloc.get_traced_memory()[0]
            for raw in workload.encoded:
                await eng.ingest(decoder.decode(raw))
            gc.collect()
            after_bytes = tracemalloc.get_traced_memory()[0]
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        stats = eng.statistics()
    net_bytes = after_bytes - before_bytes
    sites = []
    for diff in after.compare_to(before, "lineno")[:top]:
        frame = diff.traceback[0]
        sites.append({
            "site": f"{Path(frame.filename).name}:{frame.lineno}",
            "code": linecache.getline(frame.filename, frame.lineno).strip()[:70],
            "net_bytes": diff.size_diff,
            "net_blocks": diff.count_diff,
        })
    buckets = max(stats.bucket_count, 1)
    return {
        "events": workload.event_count,
        "series_count": stats.series_count,
        "bucket_count": stats.bucket_count,
        "buckets_per_series": stats.bucket_count / max(stats.series_count, 1),
        "dedup_keys": stats.events_accepted if workload.parameters["unique_ids"] else 0,
        "net_bytes": net_bytes,
        "bytes_per_bucket": net_bytes / buckets,
        "bytes_per_event": net_bytes / max(workload.event_count, 1),
        "top_sites": sites,
    }


def memory_workloads(args: argparse.Namespace) -> dict[str, Workload]:
    """The headline shape, and ~100 one-minute buckets per series with and without ids."""
    events = args.memory_events
    dense = {
        "customers": 100, "meters": 2, "events": events // 2, "batch_size": args.batch_size,
        "days": 100 * MINUTE_MS / DAY_MS, "late_fraction": 0.0, "zipf_s": 0.0,
        "max_dimensions": 0, "aggregations": ("sum", "count"),
    }
    return {
        "headline": generate(args.seed + 1, customers=args.customers, meters=args.meters,
                             events=events, batch_size=args.batch_size,
                             aggregations=args.aggregations),
        "100_buckets_per_series": generate(args.seed + 2, **dense),
        "100_buckets_per_series_no_ids": generate(
            args.seed + 3, unique_ids=False, **dense
        ),
    }


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for name, workload in memory_workloads(args).items():
        reset_gc()
        results[name] = trio.run(_memory_run, workload, args.shards, 6)
        del workload
    return results


# ---------------------------------------------------------------------- report


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarise(engine_runs: dict[int, list[dict[str, Any]]],
              floor_runs: list[dict[str, Any]]) -> dict[str, Any]:
    floor_median = _median([r["events_per_s"] for r in floor_runs])
    summary: dict[str, Any] = {
        "floor": {"events_per_s": floor_median,
                  "events_per_s_runs": [r["events_per_s"] for r in floor_runs]},
        "engine": {},
    }
    for in_flight, runs in engine_runs.items():
        rates = [r["events_per_s"] for r in runs]
        # Per-repeat ratio against the floor run of the same repeat, then the median.
        ratios = [r["events_per_s"] / f["events_per_s"] for r, f in zip(runs, floor_runs,
                                                                         strict=False)]
        summary["engine"][str(in_flight)] = {
            "events_per_s": _median(rates),
            "events_per_s_runs": rates,
            "ack_p50_ms": _median([r["ack_p50_ms"] for r in runs]),
            "ack_p99_ms": _median([r["ack_p99_ms"] for r in runs]),
            "ack_max_ms": _median([r["ack_max_ms"] for r in runs]),
            "ratio_to_floor": _median(ratios),
            "group_commits": _median([r["statistics"]["group_commits"] for r in runs]),
            "close_s": _median([r["close_s"] for r in runs]),
            "gc_pause_total_ms": _median([r["gc_pauses"]["total_ms"] for r in runs]),
            "gc_pause_max_ms": _median([r["gc_pauses"]["max_ms"] for r in runs]),
        }
    return summary


def format_table(summary: dict[str, Any], repeats: int) -> str:
    lines = [
        f"{'run':<8} {'in-flight':>9} {'events/s':>11} {'ack p50 ms':>11} "
        f"{'ack p99 ms':>11} {'engine/floor':>13} {'commits':>8}",
    ]
    for in_flight, row in summary["engine"].items():
        lines.append(
            f"{'engine':<8} {in_flight:>9} {row['events_per_s']:>11,.0f} "
            f"{row['ack_p50_ms']:>11.2f} {row['ack_p99_ms']:>11.2f} "
            f"{row['ratio_to_floor']:>13.3f} {row['group_commits']:>8.0f}"
        )
    lines.append(f"{'floor':<8} {'-':>9} {summary['floor']['events_per_s']:>11,.0f} "
                 f"{'':>11} {'':>11} {'1.000':>13} {'':>8}")
    lines.append(f"(medians of {repeats} repeat(s); engine/floor is the median of per-repeat "
                 "ratios)")
    return "\n".join(lines)


def format_memory(memory: dict[str, Any]) -> str:
    lines = [f"{'shape':<30} {'events':>8} {'series':>8} {'buckets':>9} {'bkt/series':>10} "
             f"{'net MB':>8} {'B/bucket':>9} {'B/event':>8}"]
    for name, row in memory.items():
        lines.append(
            f"{name:<30} {row['events']:>8} {row['series_count']:>8} {row['bucket_count']:>9} "
            f"{row['buckets_per_series']:>10.1f} {row['net_bytes'] / 1e6:>8.2f} "
            f"{row['bytes_per_bucket']:>9.1f} {row['bytes_per_event']:>8.1f}"
        )
    for name, row in memory.items():
        lines.append(f"  top net allocations, {name}:")
        for site in row["top_sites"]:
            lines.append(f"    {site['net_bytes'] / 1e6:>8.2f} MB {site['net_blocks']:>9} blocks"
                         f"  {site['site']:<22} {site['code']}")
    return "\n".join(lines)


def profile_report(profiler: cProfile.Profile, path: str, limit: int = 15) -> list[dict[str, Any]]:
    profiler.dump_stats(path)
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, lineno, function), (_, calls, tottime, cumtime, _) in sorted(
        stats.stats.items(), key=lambda item: item[1][2], reverse=True  # type: ignore[attr-defined]
    )[:limit]:
        rows.append({"function": f"{Path(filename).name}:{lineno}({function})",
                     "calls": calls, "tottime_s": tottime, "cumtime_s": cumtime})
    return rows


# ------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole benchmark; return the results (what ``--json`` writes)."""
    facts = machine_facts()
    # Cache engine sources now: the allocation report quotes lines of the code that ran.
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if source and module.__name__.startswith(("engine", "benchmarks")):
            linecache.getline(source, 1)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)

    started = time.perf_counter()
    workload = generate(args.seed, customers=args.customers, meters=args.meters,
                        events=args.events, batch_size=args.batch_size,
                        aggregations=args.aggregations)
    generation_s = time.perf_counter() - started
    print(f"workload: {workload.event_count:,} events in {len(workload.batches)} batches, "
          f"{workload.expected_duplicates:,} duplicates, {workload.encoded_bytes / 1e6:.1f} MB "
          f"encoded, meters {[m.aggregation for m in workload.meters]}, "
          f"generated in {generation_s:.1f} s", flush=True)
    print(f"parameters: shards={args.shards} in_flight={args.in_flight} "
          f"repeats={args.repeats} seed={args.seed} source={args.source}", flush=True)

    engine_runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.in_flight}
    floor_runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        floor = run_floor(workload, timeout_s=args.timeout_s, tmp_root=args.tmpdir)
        floor_runs.append(floor)
        pauses = floor["gc_pauses"]
        print(f"  repeat {repeat + 1}: floor {floor['events_per_s']:,.0f} events/s, gc pauses "
              f"{pauses['total_ms']:.0f} ms (max {pauses['max_ms']:.0f} ms)", flush=True)
        for in_flight in args.in_flight:
            result = run_engine(workload, shards=args.shards, in_flight=in_flight,
                                timeout_s=args.timeout_s, tmp_root=args.tmpdir,
                                source=args.source)
            engine_runs[in_flight].append(result)
            print(f"  repeat {repeat + 1}: engine in-flight {in_flight}: "
                  f"{result['events_per_s']:,.0f} events/s, ack p50 "
                  f"{result['ack_p50_ms']:.2f} ms p99 {result['ack_p99_ms']:.2f} ms, "
                  f"{result['statistics']['group_commits']} commits, gc pauses "
                  f"{result['gc_pauses']['total_ms']:.0f} ms (max "
                  f"{result['gc_pauses']['max_ms']:.0f} ms), close {result['close_s']:.1f} s",
                  flush=True)
    summary = summarise(engine_runs, floor_runs)
    last = engine_runs[args.in_flight[-1]][-1]["statistics"]

    profile_rows: list[dict[str, Any]] | None = None
    if args.profile:
        profiler = cProfile.Profile()
        run_engine(workload, shards=args.shards, in_flight=args.in_flight[0],
                   timeout_s=args.timeout_s, tmp_root=args.tmpdir, profiler=profiler,
                   source=args.source)
        profile_rows = profile_report(profiler, args.profile)

    del workload
    gc.collect()
    memory = measure_memory(args) if args.memory_events else {}

    results: dict[str, Any] = {
        "benchmark": "ingest",
        "machine": facts,
        "parameters": {
            "events": args.events, "shards": args.shards, "in_flight": args.in_flight,
            "repeats": args.repeats, "seed": args.seed, "customers": args.customers,
            "meters": args.meters, "batch_size": args.batch_size,
            "aggregations": args.aggregations, "memory_events": args.memory_events,
            "quick": args.quick, "source": args.source,
        },
        "checks": {"accepted_plus_duplicates_equals_sent": True,
                   "duplicates_equal_expected": True},
        "workload": {"generation_s": generation_s},
        "summary": summary,
        "engine_statistics": last,
        "engine_runs": {str(k): v for k, v in engine_runs.items()},
        "floor_runs": floor_runs,
        "memory": memory,
        "profile_top15": profile_rows,
        "total_s": time.perf_counter() - started,
    }
    print()
    print(format_table(summary, args.repeats))
    print(f"engine state after ingest: {last['series_count']:,} series, "
          f"{last['bucket_count']:,} buckets, {last['batches']} batches, "
          f"{last['group_commits']} group commits")
    if memory:
        print()
        print(format_memory(memory))
    if profile_rows:
        print()
        print(f"top {len(profile_rows)} functions by tottime (ingest phase of one engine run, "
              f"in-flight {args.in_flight[0]}; pstats in {args.profile}):")
        for row in profile_rows:
            print(f"  {row['tottime_s']:>8.3f} s {row['cumtime_s']:>8.3f} s cum "
                  f"{row['calls']:>10}  {row['function']}")
    blob = json.dumps(results, indent=2, default=str)
    print()
    print(blob)
    if args.json:
        Path(args.json).write_text(blob + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BenchmarkFailure as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
