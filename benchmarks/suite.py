"""The benchmark suite: every measurement against shard count, one report, plots.

A plain script (not collected by pytest; tests/test_benchmarks_smoke.py runs it
on a tiny workload). ``make bench`` runs the full suite and rewrites the
generated section of ``docs/benchmarks.md`` and ``docs/bench/*.png``;
``make bench-quick`` runs a small suite in about a minute and writes only under
``--out`` (default ``/tmp/metering-bench-quick``), never into ``docs/``.

Phases, in order, each with its own time budget:

1. **workload**: one seeded workload (``benchmarks/workload.py``): Zipf
   customers, mixed aggregations, 0-3 dimensions, ~1% duplicates, ~5% late
   events up to 30 days, timestamps over 30 days ending at the current minute
   (a live server checks the late limit against its clock).
2. **floor**: ``ingest.run_floor`` on the same batches (decode, one fsynced
   LMDB put per batch, one dict increment per event), repeated; the median is
   the denominator of every engine/floor ratio.
3. **sweep**, for each shard count: for each batches-in-flight level a fresh
   ``meter serve`` subprocess receives the whole workload over one TCP
   connection (events/s, ack p50/p99, the acks checked). At one level
   (``--query-in-flight``) the server is kept: its statistics and memory
   (RSS without file-backed pages) are read, the three query shapes of
   ``query_latency.py`` are timed with their answers checked against a model,
   then it is SIGKILLed and restarted on its directory (``recovery.py``):
   start → ready, state and answers checked against the killed server's.
4. **alerts**: ``alert_latency.py`` at each shard count (one subscriber,
   fewer batches than its own default run).
5. **recovery at scale**: one fresh server at ``--recovery-shards`` streams
   ``--recovery-events`` events (10M in the full run), SIGKILL, restart.
6. **memory**: ``ingest.measure_memory`` (tracemalloc, in process): bytes per
   (series, bucket) and per series on the headline shape and a dense shape.
7. **peers**: ``benchmarks/peers.py`` if present and not ``--no-peers``.

Then the report: markdown (machine, versions, commit, date, what ran at which
size, the tables, and the sizing table last), PNG plots (matplotlib, Agg),
and JSON (``--json PATH``; always also ``<out>/bench/results.json``).

    python benchmarks/suite.py --quick                # ~1 min, writes /tmp/metering-bench-quick
    python benchmarks/suite.py --write-docs           # full, ~15 min, rewrites docs/
    python benchmarks/suite.py --shards 1,8 --out /tmp/x --no-peers
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio

from benchmarks import alert_latency, ingest, query_latency, recovery
from benchmarks.common import BenchmarkFailure, machine_facts
from benchmarks.serve import ServerProcess
from benchmarks.tcp_ingest import send_workload
from benchmarks.workload import AGGREGATIONS_MIXED, Workload, generate
from engine.client import open_client

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- BEGIN GENERATED: benchmarks/suite.py replaces everything up to the END marker -->"
END = "<!-- END GENERATED -->"
PEERS_FILE = Path(__file__).resolve().parent / "peers.py"

FULL: dict[str, Any] = {
    "shards": [1, 2, 4, 8, 16, 64], "events": 400_000, "customers": 100_000, "meters": 10,
    "in_flight": [1, 4, 16], "query_in_flight": 4, "floor_repeats": 3, "repeats": 3,
    "queries": 40, "query_budget_s": 6.0,
    "alert_batches": 150, "alert_batch_size": 1000,
    "recovery_events": 10_000_000, "recovery_shards": 8, "memory_events": 200_000,
    "out": None,
}
QUICK: dict[str, Any] = {
    "shards": [1, 2, 4, 8, 16, 64], "events": 50_000, "customers": 10_000, "meters": 10,
    "in_flight": [1, 4], "query_in_flight": 4, "floor_repeats": 1, "repeats": 1,
    "queries": 10, "query_budget_s": 1.0,
    "alert_batches": 25, "alert_batch_size": 200,
    "recovery_events": 200_000, "recovery_shards": 8, "memory_events": 20_000,
    "out": "/tmp/metering-bench-quick",
}


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The benchmark suite: ingest, queries, alerts, recovery and memory "
                    "against shard count, beside the floor; markdown, plots and JSON.")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, about a minute; writes under --out only")
    parser.add_argument("--write-docs", action="store_true", dest="write_docs",
                        help="write docs/benchmarks.md (generated section) and docs/bench/")
    parser.add_argument("--out", help="output directory for benchmarks.md, bench/*.png and "
                        "bench/results.json when not --write-docs (default /tmp/metering-bench, "
                        "quick: /tmp/metering-bench-quick)")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON results here")
    parser.add_argument("--shards", type=_int_list, help="shard counts (default 1,2,4,8,16,64)")
    parser.add_argument("--in-flight", type=_int_list, dest="in_flight",
                        help="batches in flight over one connection (full 1,4,16; quick 4)")
    parser.add_argument("--query-in-flight", type=int, dest="query_in_flight",
                        help="the in-flight level whose server is kept for queries, memory "
                             "and recovery (default 4)")
    parser.add_argument("--events", type=int, help="sweep workload events (full 400k)")
    parser.add_argument("--customers", type=int, help="Zipf customer universe (full 100k)")
    parser.add_argument("--meters", type=int, help="meters, mixed aggregations (default 10)")
    parser.add_argument("--floor-repeats", type=int, dest="floor_repeats")
    parser.add_argument("--repeats", type=int,
                        help="rounds over the ingest grid, medians reported (full 3, quick 1)")
    parser.add_argument("--queries", type=int, help="timed queries per shape and shard count")
    parser.add_argument("--query-budget-s", type=float, dest="query_budget_s")
    parser.add_argument("--alert-batches", type=int, dest="alert_batches")
    parser.add_argument("--alert-batch-size", type=int, dest="alert_batch_size")
    parser.add_argument("--recovery-events", type=int, dest="recovery_events",
                        help="events before the SIGKILL of the recovery-at-scale phase "
                             "(full 10M, quick 200k; 0 skips it)")
    parser.add_argument("--recovery-shards", type=int, dest="recovery_shards")
    parser.add_argument("--memory-events", type=int, dest="memory_events",
                        help="events of the tracemalloc runs (0 skips them)")
    parser.add_argument("--no-peers", action="store_true", dest="no_peers",
                        help="skip the peer comparison (benchmarks/peers.py)")
    parser.add_argument("--no-plots", action="store_true", dest="no_plots")
    parser.add_argument("--seed", type=int, default=20250615)
    parser.add_argument("--batch-size", type=int, default=1000, dest="batch_size")
    parser.add_argument("--timeout-s", type=float, default=900.0, dest="timeout_s",
                        help="time budget of any single run (default 900 s)")
    parser.add_argument("--tmpdir", help="where temporary data directories go")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.query_in_flight not in args.in_flight:
        args.query_in_flight = args.in_flight[len(args.in_flight) // 2]
    if args.write_docs:
        args.out = str(REPO_ROOT / "docs")
    elif args.out is None:
        args.out = "/tmp/metering-bench"
    if args.events < args.batch_size or args.meters < 2 or args.customers < 1:
        parser.error("--events must be at least --batch-size, --meters at least 2")
    return args


# ------------------------------------------------------------------- phases


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _total_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * recovery.PAGE_BYTES)
    except (AttributeError, ValueError, OSError):
        return math.nan


async def _stats(port: int) -> dict[str, Any]:
    async with open_client("127.0.0.1", port) as client:
        return await client.stats()


def sweep_one(args: argparse.Namespace, workload: Workload, plan: query_latency.QueryPlan,
              shards: int, in_flight: int, keep: bool) -> dict[str, Any]:
    """One fresh server, the whole workload over TCP; with ``keep`` queries/memory/recovery."""
    with tempfile.TemporaryDirectory(prefix="meter-bench-sweep-", dir=args.tmpdir) as data_dir:
        server = ServerProcess(shards, data_dir=data_dir)
        try:
            idle = recovery.process_memory(server.pid)
            row: dict[str, Any] = {"shards": shards, "in_flight": in_flight,
                                   "server_start_s": server.ready_s}
            row.update(trio.run(send_workload, server.port, workload, 1, in_flight, args.timeout_s))
            if not keep:
                return row
            loaded = recovery.process_memory(server.pid)
            stats = trio.run(_stats, server.port)
            series = max(int(stats["series_count"]), 1)
            buckets = max(int(stats["bucket_count"]), 1)
            row["state"] = {
                "series": stats["series_count"], "buckets": stats["bucket_count"],
                "snapshots": stats["snapshots"],
                "rss_idle_bytes": idle["rss"], "rss_bytes": loaded["rss"],
                "anon_idle_bytes": idle["anon"], "anon_bytes": loaded["anon"],
                "anon_bytes_per_series": (loaded["anon"] - idle["anon"]) / series,
                "anon_bytes_per_bucket": (loaded["anon"] - idle["anon"]) / buckets,
                "anon_bytes_per_event": (loaded["anon"] - idle["anon"]) / workload.event_count,
            }
            row["queries"] = trio.run(lambda: query_latency.measure_queries(
                server.port, plan, queries=args.queries, warmup=2,
                budget_s=args.query_budget_s, timeout_s=args.timeout_s))
            probes = recovery.probe_queries(plan.sum_meter, workload.customer_ids[0],
                                            workload.now_ms)
            row["recovery"] = recovery.kill_and_restart(server, shards, probes,
                                                        start_timeout_s=args.timeout_s)
            return row
        finally:
            server.stop(kill=True)


def run_sweep(args: argparse.Namespace, workload: Workload, plan: query_latency.QueryPlan,
              floors: list[float]) -> list[dict[str, Any]]:
    """Rounds over the whole grid, so noise on a shared machine hits every point alike.

    Round 1 also keeps the server at ``--query-in-flight`` for queries, memory and
    recovery; later rounds (``--repeats``) only ingest. Before each shard count of
    each round the floor runs again (appended to ``floors``); each run's ratio is to
    that floor. A point's events/s, ack latencies and ratio are medians over its
    rounds; ``runs`` holds each round's figures.
    """
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for round_index in range(args.repeats):
        for shards in args.shards:
            # The floor again, right before this group: its ratio compares runs made under
            # the same load, where a floor from the start of a long run would not.
            floor = ingest.run_floor(workload, timeout_s=args.timeout_s,
                                     tmp_root=args.tmpdir)["events_per_s"]
            floors.append(floor)
            for in_flight in args.in_flight:
                keep = round_index == 0 and in_flight == args.query_in_flight
                result = sweep_one(args, workload, plan, shards, in_flight, keep)
                row = rows.setdefault((shards, in_flight), {"runs": []})
                run = {k: result.pop(k) for k in (
                    "events_per_s", "ack_p50_ms", "ack_p99_ms", "elapsed_s", "server_start_s")}
                run["floor_events_per_s"] = floor
                run["ratio_to_floor"] = run["events_per_s"] / floor
                row["runs"].append(run)
                row.update(result)
                line = (f"  round {round_index + 1} shards {shards:>2} in-flight {in_flight:>2}: "
                        f"{row['runs'][-1]['events_per_s']:>9,.0f} events/s, ack p50 "
                        f"{row['runs'][-1]['ack_p50_ms']:.1f} p99 "
                        f"{row['runs'][-1]['ack_p99_ms']:.1f} ms")
                if keep:
                    q = row["queries"]
                    line += ("; queries p99 " + " / ".join(f"{q[k]['p99_ms']:.1f}"
                                                            for k in query_latency.KINDS)
                             + f" ms; ready after kill {row['recovery']['ready_s']:.2f} s; "
                             f"{row['state']['anon_bytes_per_series']:.0f} B/series")
                _log(line)
    for row in rows.values():
        for name in ("events_per_s", "ack_p50_ms", "ack_p99_ms", "ratio_to_floor"):
            row[name] = statistics.median(run[name] for run in row["runs"])
    return list(rows.values())


def run_alerts(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for shards in args.shards:
        alert_args = alert_latency.parse_args([
            "--batches", str(args.alert_batches), "--batch-size", str(args.alert_batch_size),
            "--in-flight", "1", "--repeats", "1", "--shards", str(shards),
            "--timeout-s", str(args.timeout_s),
        ])
        [result] = alert_latency.run(alert_args)["results"]
        result.pop("runs", None)
        rows.append({"shards": shards, **result})
        _log(f"  alerts shards {shards:>2}: ack→alert p50 {result['ack_to_alert']['p50_ms']:.2f}"
             f" p99 {result['ack_to_alert']['p99_ms']:.2f} ms, send→alert p99 "
             f"{result['send_to_alert']['p99_ms']:.2f} ms ({result['timed_alerts']} alerts)")
    return rows


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    memory_args = argparse.Namespace(
        memory_events=args.memory_events, batch_size=args.batch_size, seed=args.seed,
        customers=args.customers, meters=args.meters, aggregations=list(AGGREGATIONS_MIXED),
        shards=args.recovery_shards)
    results = ingest.measure_memory(memory_args)
    for row in results.values():
        row["bytes_per_series"] = row["net_bytes"] / max(row["series_count"], 1)
    return results


def run_peers(args: argparse.Namespace) -> dict[str, Any]:
    """The one call site of the peer comparison (Redis, PostgreSQL, DuckDB, SQLite)."""
    if args.no_peers:
        return {"status": "not run (--no-peers)"}
    if not PEERS_FILE.exists():
        return {"status": "not run (benchmarks/peers.py absent)"}
    try:
        peers = importlib.import_module("benchmarks.peers")
        peer_argv = ["--quick"] if args.quick else []
        result = peers.run(peers.parse_args(peer_argv))
    except Exception as exc:  # a peer failing must not lose the engine's figures
        traceback.print_exc()
        return {"status": f"failed: {type(exc).__name__}: {exc}"}
    return {"status": "run", "result": result}


# ------------------------------------------------------------------- report


def _versions() -> dict[str, str]:
    out = {}
    for name in ("trio", "msgspec", "lmdb", "sortedcontainers", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _fmt_int(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:,.0f}"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _sweep_rows(report: dict[str, Any], keep_only: bool = False) -> list[dict[str, Any]]:
    return [r for r in report["sweep"] if not keep_only or "queries" in r]


def sizing(report: dict[str, Any]) -> dict[str, Any]:
    """The per-shard-count figures a user sizes with, and a recommendation derived from them."""
    per_shard: dict[int, dict[str, Any]] = {}
    for row in report["sweep"]:
        entry = per_shard.setdefault(row["shards"], {"best_events_per_s": 0.0,
                                                     "best_ratio_to_floor": 0.0})
        if row["events_per_s"] > entry["best_events_per_s"]:
            entry.update(best_events_per_s=row["events_per_s"], best_in_flight=row["in_flight"],
                         best_ack_p99_ms=row["ack_p99_ms"])
        entry["best_ratio_to_floor"] = max(entry["best_ratio_to_floor"], row["ratio_to_floor"])
        if "queries" in row:
            entry["query_p99_ms"] = {k: v["p99_ms"] for k, v in row["queries"].items()}
            entry["anon_bytes_per_series"] = row["state"]["anon_bytes_per_series"]
            entry["anon_bytes_per_event"] = row["state"]["anon_bytes_per_event"]
            entry["series"] = row["state"]["series"]
            entry["ready_s"] = row["recovery"]["ready_s"]
    for row in report.get("alerts", []):
        per_shard.setdefault(row["shards"], {})["alert_p99_ms"] = row["ack_to_alert"]["p99_ms"]
    best = max((e.get("best_events_per_s", 0) for e in per_shard.values()), default=0)
    best_ratio = max((e.get("best_ratio_to_floor", 0) for e in per_shard.values()), default=0)
    # Recommended: the lowest worst-query p99 among shard counts within 10% of the best
    # throughput, compared as ratios to the floor measured beside them (so a burst of load
    # from other processes during one shard count does not decide); ties go to fewer shards.
    candidates = [(max(e["query_p99_ms"].values()), s) for s, e in per_shard.items()
                  if "query_p99_ms" in e
                  and e.get("best_ratio_to_floor", 0) >= 0.9 * best_ratio]
    recommended = min(candidates)[1] if candidates else None
    return {"per_shard": per_shard, "best_events_per_s": best, "best_ratio_to_floor": best_ratio,
            "recommended": recommended}


def render_markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    p = report["parameters"]
    m = report["machine"]
    w = report["workload"]
    lines: list[str] = []
    add = lines.append
    kind = "quick" if p["quick"] else "full"
    add("## Results (generated)")
    add("")
    add(f"**{kind.capitalize()} suite, {m['date'][:10]}, commit {m['git_commit']}"
        + (" (with uncommitted changes)" if m.get("git_dirty") else "") + ".** "
        f"Generated by `benchmarks/suite.py{' --quick' if p['quick'] else ''}` in "
        f"{report['total_s'] / 60:.1f} min. Machine: {m['platform']}, {m['cpu_model']}, "
        f"{m['cpu_count']} cores, {m['memory_gb']:.0f} GB; {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ". "
        f"Date {m['date']}, commit {m['git_commit']}.")
    add("")
    add(f"**This is a {m['cpu_count']}-core machine, shared with other work while this ran: "
        "figures are noisy, compare within this run.** The server is one Python process: "
        "its shards are trio tasks that share one thread and one GIL, so more shards do not "
        "add CPU; the load generator is a second process on the same cores.")
    add("")
    add("### What ran, at which size")
    add("")
    add(f"- Workload (seed {p['seed']}): {w['events']:,} events in batches of "
        f"{p['batch_size']:,}, Zipf customers (universe {w['customers']:,}, s = 1.1; "
        f"{w['customers_with_events']:,} have events), {w['meters']} meters "
        f"({', '.join(w['aggregations'])}), 0-3 dimensions, {w['duplicates']:,} duplicates "
        f"({w['duplicates'] / w['events']:.1%}), ~5% late events (up to 30 days), timestamps "
        f"over 30 days ending at the run's current minute; generated in "
        f"{w['generation_s']:.1f} s.")
    add(f"- Floor: {p['floor_repeats']} run(s) on the same batches at the start, in process, "
        "and one more before each shard count of each sweep round.")
    add(f"- Ingest sweep: shard counts {p['shards']} x batches in flight {p['in_flight']} "
        "(one TCP connection); each point a fresh `meter serve` subprocess (LMDB, fsync on) "
        f"receiving the whole workload once; {p['repeats']} round(s) over the whole grid, "
        "medians reported, each round's events/s in brackets.")
    add(f"- At {p['query_in_flight']} in flight the server is kept: memory (RSS minus "
        "file-backed pages, after ingest minus before), queries (each shape: "
        f"up to {p['queries']} timed queries or {p['query_budget_s']:g} s, after 2 untimed, "
        "one at a time over one connection; the first answer of every distinct query checked "
        "against a model of the events), then SIGKILL and restart on its directory "
        f"(recovery of {w['events']:,} events, state and answers checked).")
    add(f"- Alerts: `alert_latency.py` at each shard count, {p['alert_batches']} batches of "
        f"{p['alert_batch_size']:,} events, 1 in flight, one subscriber.")
    rec = report.get("recovery_at_scale")
    if rec and "error" not in rec:
        add(f"- Recovery at scale: {rec['events']:,} events streamed into one server at "
            f"{rec['shards']} shards ({rec['in_flight']} in flight, generated while sending), "
            + ("the three query shapes timed on that state (as above), " if rec.get("queries")
               else "")
            + "SIGKILL, restart; only at this one shard count.")
    elif p["recovery_events"]:
        add(f"- Recovery at scale: {p['recovery_events']:,} events at "
            f"{p['recovery_shards']} shards: FAILED ({(rec or {}).get('error')}).")
    else:
        add("- Recovery at scale: not run (--recovery-events 0).")
    add(f"- Memory (tracemalloc, in process, {p['recovery_shards']} shards): "
        f"{p['memory_events']:,} events per shape." if p["memory_events"] else
        "- Memory (tracemalloc): not run.")
    add(f"- Peers: {report['peers']['status']}.")
    add("")

    floor = report["floor"]
    add("### Ingest over TCP against shard count")
    add("")
    add(f"Floor in the same run (decode + one fsynced LMDB put per batch + one dict increment "
        f"per event, in process): **{_fmt_int(floor['events_per_s'])} events/s** "
        f"(median of {len(floor['events_per_s_runs'])} runs at the start: "
        f"{', '.join(_fmt_int(r) for r in floor['events_per_s_runs'])})"
        + (f"; run again before each shard count of each round: "
           f"{_fmt_int(min(floor['sweep_events_per_s_runs']))} to "
           f"{_fmt_int(max(floor['sweep_events_per_s_runs']))} events/s"
           if floor.get("sweep_events_per_s_runs") else "")
        + ". Engine / floor: each run divided by the floor run just before its shard count "
        "(same load), then the median.")
    add("")
    add("| shards | in flight | events/s | ack p50 ms | ack p99 ms | engine / floor |")
    add("|---:|---:|---:|---:|---:|---:|")
    for r in report["sweep"]:
        per_round = (" (" + ", ".join(f"{run['events_per_s'] / 1000:,.0f}k" for run in r["runs"])
                     + ")") if len(r["runs"]) > 1 else ""
        add(f"| {r['shards']} | {r['in_flight']} | {_fmt_int(r['events_per_s'])}{per_round} | "
            f"{_ms(r['ack_p50_ms'])} | {_ms(r['ack_p99_ms'])} | "
            f"{r['ratio_to_floor']:.2f} |")
    add("")
    if "throughput" in plots:
        add(f"![ingest events/s against shard count]({plots['throughput']})")
        add("")

    add(f"### Query latency over TCP ({w['customers']:,}-customer universe, "
        f"{w['events']:,} events)")
    add("")
    add(f"(a) `customer_month_by_day`: one customer (rotating over Zipf ranks "
        f"{', '.join(str(r) for r in w['sample_ranks'])} and the least active), meter "
        f"`{w['sum_meter']}`, 30 UTC days by day; (b) `top100_customers_month`: the same "
        f"meter, 30 days, grouped by customer, top 100; (c) `meter_by_dimension`: meter "
        f"`{w['dimension_meter']}`, 30 days by day, grouped by `region`. Every answer checked "
        "as described above.")
    add("")
    add("| shards | series | (a) p50 / p99 ms | (b) p50 / p99 ms | (c) p50 / p99 ms | "
        "queries timed (a/b/c) |")
    add("|---:|---:|---:|---:|---:|---:|")
    for r in _sweep_rows(report, keep_only=True):
        q = r["queries"]
        add(f"| {r['shards']} | {r['state']['series']:,} | "
            + " | ".join(f"{_ms(q[k]['p50_ms'])} / {_ms(q[k]['p99_ms'])}"
                         for k in query_latency.KINDS)
            + " | " + "/".join(str(q[k]["queries"]) for k in query_latency.KINDS) + " |")
    rec = report.get("recovery_at_scale") or {}
    at_scale = rec.get("queries") if "error" not in rec else None
    if at_scale:
        q = at_scale["results"]
        add(f"| {rec['shards']}, at scale | {rec['series_count']:,} | "
            + " | ".join(f"{_ms(q[k]['p50_ms'])} / {_ms(q[k]['p99_ms'])}"
                         for k in query_latency.KINDS)
            + " | " + "/".join(str(q[k]["queries"]) for k in query_latency.KINDS) + " |")
        add("")
        add(f"The last row: the recovery-at-scale state ({rec['events']:,} events, "
            f"{at_scale['customers_with_events']:,} of the {w['customers']:,} customers with "
            f"events, sample ranks {', '.join(str(r) for r in at_scale['sample_ranks'])} and "
            "the least active), queried before the kill, answers checked against a model "
            "built from the batches as they were sent.")
    add("")
    if "latency" in plots:
        add(f"![ack and query latency against shard count]({plots['latency']})")
        add("")

    add("### Alert latency against shard count")
    add("")
    add("| shards | alerts timed | pushed before the ack | ack → alert p50 / p99 / max ms | "
        "send → alert p50 / p99 ms | events/s |")
    add("|---:|---:|---:|---:|---:|---:|")
    for r in report.get("alerts", []):
        a, s = r["ack_to_alert"], r["send_to_alert"]
        add(f"| {r['shards']} | {r['timed_alerts']:,} | {r['pushed_before_ack']:,} | "
            f"{a['p50_ms']:.2f} / {a['p99_ms']:.2f} / {a['max_ms']:.2f} | "
            f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f} | {_fmt_int(r['events_per_s'])} |")
    add("")
    add("Negative: the alert reached the subscriber before the ingesting client got its ack "
        "(alerts are published when the batch is applied, before the ack is sent).")
    add("")

    add("### Recovery after SIGKILL (start → ready)")
    add("")
    add("Start → ready: from spawning `python -m engine serve` on the killed server's "
        "directory to its \"listening\" line (printed after recovery; includes interpreter "
        "start and imports). Engine recovery: the engine's own figure (latest snapshot + "
        "write-ahead-log tail). Server MB: resident memory not backed by files, of the "
        "killed server just before the kill and of the new one once recovered.")
    add("")
    add("| shards | events ingested | series | snapshots before kill | WAL tail MB replayed | "
        "engine recovery ms | start → ready s | first query ms | server MB before kill / "
        "after recovery |")
    add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rec_rows = [(r["shards"], w["events"], r["recovery"]) for r in _sweep_rows(report, True)]
    if rec and "error" not in rec:
        rec_rows.append((rec["shards"], rec["events"], rec))
    for shards, events, r in rec_rows:
        add(f"| {shards} | {events:,} | {r['series_count']:,} | {r['snapshots_before_kill']} | "
            f"{(r['wal_bytes_replayed'] or 0) / 1e6:.1f} | {_fmt_int(r['recovery_ms'])} | "
            f"{r['ready_s']:.2f} | {r['first_query_ms']:.1f} | "
            f"{r['anon_before_kill_bytes'] / 1e6:,.0f} / "
            f"{r['anon_after_recovery_bytes'] / 1e6:,.0f} |")
    if rec and "error" not in rec:
        add("")
        add(f"The last row is the recovery-at-scale run: ingest of {rec['events']:,} events "
            f"ran at {_fmt_int(rec['ingest']['events_per_s'])} events/s with the generator "
            "producing batches in the sending process, so it is not an ingest figure.")
    add("")
    if "recovery" in plots:
        add(f"![recovery and memory against shard count]({plots['recovery']})")
        add("")

    add("### Memory")
    add("")
    add("Server RSS not backed by files (`rss - shared`, so LMDB's mapped pages are not "
        "counted), after the ingest minus before, divided by the engine's series and "
        "(series, bucket) counts; it includes the dedup index (every event here has a "
        "unique id) and allocator slack.")
    add("")
    add("| shards | series | buckets | MB after ingest | bytes per series | "
        "bytes per (series, bucket) | bytes per event |")
    add("|---:|---:|---:|---:|---:|---:|---:|")
    for r in _sweep_rows(report, True):
        st = r["state"]
        add(f"| {r['shards']} | {st['series']:,} | {st['buckets']:,} | "
            f"{(st['anon_bytes'] - st['anon_idle_bytes']) / 1e6:.1f} | "
            f"{st['anon_bytes_per_series']:,.0f} | {st['anon_bytes_per_bucket']:,.0f} | "
            f"{st['anon_bytes_per_event']:,.0f} |")
    add("")
    mem = report.get("memory") or {}
    if mem:
        add("tracemalloc, in process (what the engine retains, net of the WAL record bytes):")
        add("")
        add("| shape | events | series | buckets | buckets/series | bytes per series | "
            "bytes per (series, bucket) | bytes per event |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in mem.items():
            add(f"| {name} | {r['events']:,} | {r['series_count']:,} | {r['bucket_count']:,} | "
                f"{r['buckets_per_series']:.1f} | {r['bytes_per_series']:,.0f} | "
                f"{r['bytes_per_bucket']:,.1f} | {r['bytes_per_event']:,.1f} |")
        add("")

    add("### Peers")
    add("")
    add(f"peers: {report['peers']['status']}.")
    add("")
    peer_report = report["peers"].get("result")
    if peer_report:
        from benchmarks import peers  # present: it produced this report

        params = peer_report["parameters"]
        add(f"Same sum workload for every system ({params['events']:,} events, "
            f"{params['customers']:,} customers, batches of {params['batch_size']:,}, "
            f"{params['writers']} writer(s), engine at {params['shards']} shards over TCP); "
            "each peer's answers were checked equal to the engine's before its times count "
            "(`benchmarks/peers.py`, run alone with `make bench-peers`).")
        add("")
        add(peers.format_table(peer_report))
        add("")
        add("How each system was set up (durability, dedup, query path):")
        add("")
        add(peers.format_configs(peer_report))
        add("")

    size = report["sizing"]
    add("### Choosing a shard count")
    add("")
    add("Derived from the measurements above (same run, same machine). Sustained events/s: "
        "the best median of the in-flight levels measured at that shard count over one "
        "connection (with its ack p99); query and memory figures: the state of "
        f"{w['events']:,} events, {w['customers_with_events']:,} customers with events "
        f"(universe {w['customers']:,}) and the series count in the query table; recovery: "
        "start → ready for that state after SIGKILL. To size: pick a row whose sustained "
        "events/s is at least twice your peak, whose query p99 suits you, and multiply your "
        "series count by its bytes per series.")
    add("")
    add("| shards | sustained events/s | at in flight | ack p99 ms there | best engine / floor "
        "| query p99 ms (a) / (b) / (c) | alert p99 ms | bytes per series | bytes per event | "
        "ready after SIGKILL s |")
    add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shards in sorted(size["per_shard"]):
        e = size["per_shard"][shards]
        qp = e.get("query_p99_ms")
        cells = [
            f"{shards}{' (recommended)' if shards == size['recommended'] else ''}",
            _fmt_int(e.get("best_events_per_s", math.nan)),
            str(e.get("best_in_flight", "")),
            _ms(e["best_ack_p99_ms"]) if "best_ack_p99_ms" in e else "",
            f"{e['best_ratio_to_floor']:.2f}" if "best_ratio_to_floor" in e else "",
            " / ".join(_ms(qp[k]) for k in query_latency.KINDS) if qp else "",
            _ms(e["alert_p99_ms"]) if "alert_p99_ms" in e else "",
            _fmt_int(e.get("anon_bytes_per_series", math.nan)),
            _fmt_int(e.get("anon_bytes_per_event", math.nan)),
            f"{e['ready_s']:.2f}" if "ready_s" in e else "",
        ]
        add("| " + " | ".join(cells) + " |")
    add("")
    add(_rule_of_thumb(report))
    add("")
    return "\n".join(lines)


def _rule_of_thumb(report: dict[str, Any]) -> str:
    size = report["sizing"]
    per = size["per_shard"]
    rates = {s: e["best_events_per_s"] for s, e in per.items() if e.get("best_events_per_s")}
    if not rates:
        return "No ingest figures: no rule of thumb."
    low, high = min(rates.values()), max(rates.values())
    fastest = max(rates, key=lambda s: rates[s])
    w = report["workload"]
    with_memory = [e for e in per.values() if "anon_bytes_per_series" in e]
    bytes_per_series = statistics.median(e["anon_bytes_per_series"] for e in with_memory) \
        if with_memory else math.nan
    series_per_customer = (statistics.median(e["series"] for e in with_memory)
                           / max(w["customers_with_events"], 1)) if with_memory else math.nan
    text = [
        "**Rule of thumb (this machine, this workload).** "
        f"Sustained ingest ranged from {_fmt_int(low)} to {_fmt_int(high)} events/s across "
        f"shard counts {sorted(rates)} (best at {fastest}): shards are tasks in one process "
        "sharing one GIL, so the shard count does not multiply throughput; plan for one "
        f"server per ~{_fmt_int(high / 2)} events/s of peak load (half the best measured, "
        "for headroom) and scale out with more server processes (customers split between "
        "them), not more shards."
    ]
    if size["recommended"] is not None:
        text.append(
            f" Among shard counts within 10% of the best throughput (as a ratio to the floor "
            f"measured beside it), {size['recommended']} had the lowest worst-case query p99 "
            "here: start there.")
    bytes_per_event = statistics.median(e["anon_bytes_per_event"] for e in with_memory) \
        if with_memory else math.nan
    rec = report.get("recovery_at_scale")
    if not math.isnan(bytes_per_series):
        text.append(
            f" Memory: at {w['events']:,} events the server held about "
            f"{_fmt_int(bytes_per_event)} bytes per event ingested, "
            f"{_fmt_int(bytes_per_series)} per series (medians over shard counts; "
            f"{series_per_customer:.1f} series per active customer in this workload).")
    if rec and "error" not in rec:
        per_event = rec["anon_before_kill_bytes"] / rec["events"]
        text.append(
            f" At {rec['events']:,} events ({rec['shards']} shards) it held "
            f"{rec['anon_before_kill_bytes'] / 1e9:.1f} GB for {rec['series_count']:,} series: "
            f"{per_event:,.0f} bytes per event, and a restart after SIGKILL was ready in "
            f"{rec['ready_s']:.1f} s.")
        if rec.get("queries"):
            q = rec["queries"]["results"]
            text.append(" Query p99 on that state: " + " / ".join(
                f"({letter}) {_ms(q[k]['p99_ms'])} ms"
                for letter, k in zip("abc", query_latency.KINDS, strict=True)) + ".")
    else:
        per_event = bytes_per_event
    if not math.isnan(per_event):
        text.append(
            " Every event here carries a unique id, and accepted ids are remembered for "
            "deduplication for ever, so memory grows with the events ingested, not only with "
            "the series (the tracemalloc table shows the split: a (series, bucket) without ids "
            f"is tens of bytes). Budget about {_fmt_int(per_event)} bytes per event with a "
            f"unique id: e.g. 100M events ≈ {100e6 * per_event / 1e9:.0f} GB (an estimate "
            "from the measured ratio, not a measurement).")
    return "".join(text)


def replace_generated(document: str, generated: str) -> str:
    """Put ``generated`` between the markers; append the markers if the document has none."""
    block = f"{BEGIN}\n\n{generated.rstrip()}\n\n{END}\n"
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + block + tail.lstrip("\n")
    return document.rstrip("\n") + "\n\n" + block


def write_outputs(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, str]:
    out = Path(args.out)
    bench_dir = out / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    if not args.no_plots:
        try:
            from benchmarks import plots as plotting
            plots = plotting.write_plots(report, bench_dir)
        except Exception:  # plots are a convenience; the tables carry the figures
            traceback.print_exc()
            report["plots_error"] = traceback.format_exc(limit=1)
    relative = {name: f"bench/{Path(path).name}" for name, path in plots.items()}
    generated = render_markdown(report, relative)
    source = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    target = out / "benchmarks.md"
    target.write_text(replace_generated(source, generated))
    blob = json.dumps(report, indent=2, default=str)
    (bench_dir / "results.json").write_text(blob + "\n")
    if args.json:
        Path(args.json).write_text(blob + "\n")
    return {"markdown": str(target), "json": str(bench_dir / "results.json"),
            **{name: str(path) for name, path in plots.items()}}


# --------------------------------------------------------------------- main


def _phase(name: str, report: dict[str, Any], fn: Callable[[], Any]) -> Any:
    _log(f"{name} ...")
    started = time.perf_counter()
    value = fn()
    report["phase_s"][name] = time.perf_counter() - started
    _log(f"{name} done in {report['phase_s'][name]:.1f} s")
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    facts = machine_facts()
    facts.update(cpu_model=_cpu_model(), versions=_versions(),
                 memory_gb=_total_memory_bytes() / 1e9, pid=os.getpid())
    report: dict[str, Any] = {"benchmark": "suite", "machine": facts, "phase_s": {}}
    _log("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))

    now_ms = query_latency.current_minute_ms()
    workload = _phase("workload", report, lambda: generate(
        args.seed, customers=args.customers, meters=args.meters, events=args.events,
        batch_size=args.batch_size, now_ms=now_ms, aggregations=AGGREGATIONS_MIXED))
    plan = query_latency.plan_queries(workload)
    report["workload"] = {
        "events": workload.event_count, "duplicates": workload.expected_duplicates,
        "customers": args.customers, "meters": args.meters,
        "aggregations": [m.aggregation for m in workload.meters],
        "customers_with_events": plan.customers_with_events,
        "generation_s": report["phase_s"]["workload"], "now_ms": now_ms,
        "sum_meter": plan.sum_meter, "dimension_meter": plan.dimension_meter,
        "sample_ranks": plan.sample_ranks,
    }
    report["parameters"] = {k: getattr(args, k) for k in (
        "quick", "shards", "in_flight", "query_in_flight", "events", "customers", "meters",
        "floor_repeats", "repeats", "queries", "query_budget_s", "alert_batches",
        "alert_batch_size", "recovery_events", "recovery_shards", "memory_events", "seed",
        "batch_size", "no_peers")}

    def floor() -> dict[str, Any]:
        runs = [ingest.run_floor(workload, timeout_s=args.timeout_s, tmp_root=args.tmpdir)
                for _ in range(args.floor_repeats)]
        rates = [r["events_per_s"] for r in runs]
        _log(f"  floor {', '.join(f'{r:,.0f}' for r in rates)} events/s")
        return {"events_per_s": statistics.median(rates), "events_per_s_runs": rates}

    report["floor"] = _phase("floor", report, floor)
    sweep_floors: list[float] = []
    report["sweep"] = _phase("sweep", report,
                             lambda: run_sweep(args, workload, plan, sweep_floors))
    report["floor"]["sweep_events_per_s_runs"] = sweep_floors
    # The sweep workload is not needed any more: free it before the larger phases.
    workload.batches.clear()
    workload.encoded.clear()
    report["alerts"] = _phase("alerts", report, lambda: run_alerts(args))
    if args.recovery_events:
        def at_scale() -> dict[str, Any]:
            try:
                result = recovery.measure_recovery(
                    shards=args.recovery_shards, events=args.recovery_events,
                    customers=args.customers, meters=args.meters, seed=args.seed + 100,
                    in_flight=4, timeout_s=args.timeout_s, tmp_root=args.tmpdir,
                    start_timeout_s=args.timeout_s,
                    progress=lambda n, s: _log(f"  {n:,} events acknowledged in {s:.0f} s"),
                    queries=args.queries, query_budget_s=args.query_budget_s)
            except (BenchmarkFailure, trio.TooSlowError) as exc:
                _log(f"  recovery at scale FAILED: {exc!r}")
                return {"error": repr(exc)}
            _log(f"  recovery at scale: {result['events']:,} events, ready after "
                 f"{result['ready_s']:.2f} s (engine {result['recovery_ms']} ms)")
            return result
        report["recovery_at_scale"] = _phase("recovery_at_scale", report, at_scale)
    report["memory"] = (_phase("memory", report, lambda: run_memory(args))
                        if args.memory_events else {})
    report["peers"] = _phase("peers", report, lambda: run_peers(args))
    report["sizing"] = sizing(report)
    report["total_s"] = time.perf_counter() - started
    report["outputs"] = write_outputs(args, report)
    _log(f"wrote {report['outputs']['markdown']} and {report['outputs']['json']} "
         f"in {report['total_s'] / 60:.1f} min in all")
    return report


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
