"""What paced acks wait for: growth's traffic, then a paced run with its work traced.

``benchmarks/growth.py`` says *how long* acks take at 10,000 events/s on a grown
state; this script says *what they wait behind*. It builds the same state in process
(``growth.Worker``: ``--days`` simulated days of the growth traffic, limits on unless
``--no-limits``), then runs growth's paced phase (``--pace-seconds`` at
``--pace-events-per-s``, one ``eng.snapshot()`` forced half-way) while timing the
writer's group commits and checkpoints, each shard's mailbox turns (sealing, group
apply, checkpoint encoding) and the block encoder's thread. For every ack over
``--slow-ms`` it lists the traced work that overlapped it.

It wraps private methods of the engine's runtime (``WalWriter``, ``ShardActor``,
``BlockCache``): a diagnostic, not a contract, and its figures are its own (the
wrappers cost a little). Run it on a quiet machine::

    .venv/bin/python benchmarks/paced_trace.py --days 8 --pace-seconds 60
    .venv/bin/python benchmarks/paced_trace.py --days 3 --customers 20 --pace-seconds 10 --json F
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks import growth
from benchmarks.common import machine_facts
from engine import open_engine
from engine.runtime import shards as shard_module
from engine.runtime import writer as writer_module
from engine.runtime.blocks import BlockCache
from engine.runtime.shards import ShardActor
from engine.runtime.writer import WalWriter
from engine.storage.lmdb_store import LmdbStore

Span = tuple[float, float, str]


class Tracer:
    """Spans (start, end, what) of the wrapped calls, perf_counter seconds."""

    def __init__(self, profile: bool = False) -> None:
        self.spans: list[Span] = []
        self.on = False
        # the store's commits: what each carried and where its time went
        self.commits: list[dict[str, Any]] = []
        # --profile: cProfile of the shards' sealing turns and checkpoint encoding
        self.profiles = {"shard: sealing turn": cProfile.Profile(),
                         "shard: checkpoint encoding": cProfile.Profile()} if profile else {}

    def wrap_async(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        spans = self.spans

        @functools.wraps(original)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                if self.on:
                    spans.append((started, time.perf_counter(), label))
        setattr(owner, name, timed)

    def wrap_sync(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        spans = self.spans

        profile = self.profiles.get(label)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            profiling = profile if self.on else None
            if profiling is not None:
                profiling.enable()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if profiling is not None:
                    profiling.disable()
                if self.on:
                    spans.append((started, time.perf_counter(), label))
        setattr(owner, name, timed)

    def install(self) -> None:
        self.wrap_async(WalWriter, "_commit_group", "writer: group commit")
        self.wrap_async(WalWriter, "_snapshot", "writer: checkpoint")
        self.wrap_async(WalWriter, "_index_slice", "writer: dedup index slice")
        self.wrap_async(WalWriter, "_expire_slice", "writer: expiry slice")
        self.wrap_sync(ShardActor, "_seal", "shard: sealing turn")
        self.wrap_sync(ShardActor, "_apply_group", "shard: apply group")
        self.wrap_sync(shard_module, "shard_checkpoint", "shard: checkpoint encoding")
        # The block encoder's thread: encode_block as the cache's module calls it.
        blocks_module = sys.modules[BlockCache.__module__]
        self.wrap_sync(blocks_module, "encode_block", "encoder: encode_block (thread)")
        # Every store call the writer makes (commit, checkpoint write, slices).
        original_call_store = writer_module.call_store

        async def call_store(function: Callable[..., Any], *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original_call_store(function, *args)
            finally:
                if self.on:
                    self.spans.append((started, time.perf_counter(),
                                       "store: " + getattr(function, "__name__", "?")))
        writer_module.call_store = call_store
        self._trace_commits()

    def _trace_commits(self) -> None:
        """Per store commit: its records, dedup-index slice and alerts, the time of its
        transaction's body and of the whole call (the rest is LMDB's commit: page
        writes and fsync), and how far the file's last page moved (pages LMDB could
        not take from its free list)."""
        original = LmdbStore.commit
        original_body = LmdbStore._commit_txn
        body_s: list[float] = []

        @functools.wraps(original_body)
        def body(store: Any, txn: Any, *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return original_body(store, txn, *args)
            finally:
                body_s.append(time.perf_counter() - started)

        @functools.wraps(original)
        def commit(store: Any, wal: Any, meta: Any, alerts: Any = None, ids: Any = None,
                   decisions: Any = None, run_slice: Any = None) -> Any:
            if not self.on:
                return original(store, wal, meta, alerts, ids, decisions, run_slice)
            body_s.clear()
            last_page = store.env.info()["last_pgno"]
            started = time.perf_counter()
            try:
                return original(store, wal, meta, alerts, ids, decisions, run_slice)
            finally:
                ended = time.perf_counter()
                self.commits.append({
                    "at": started, "ms": (ended - started) * 1000,
                    "body_ms": sum(body_s) * 1000,
                    "wal_records": len(wal), "wal_bytes": sum(len(r) for _, r in wal),
                    "meta": len(meta), "alerts": len(alerts or ()),
                    "slice_keys": len(run_slice.keys) if run_slice else 0,
                    "slice_deletes": run_slice.delete if run_slice else 0,
                    "new_pages": store.env.info()["last_pgno"] - last_page})

        LmdbStore._commit_txn = body  # type: ignore[method-assign]
        LmdbStore.commit = commit  # type: ignore[method-assign]

    def totals(self, since: float) -> dict[str, dict[str, float]]:
        table: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        for start, end, label in self.spans:
            if start < since:
                continue
            row = table[label]
            row[0] += 1
            row[1] += end - start
            row[2] = max(row[2], end - start)
        return {label: {"count": row[0], "total_ms": row[1] * 1000, "max_ms": row[2] * 1000}
                for label, row in sorted(table.items(), key=lambda item: -item[1][1])}

    def overlapping(self, start: float, end: float) -> dict[str, float]:
        over: dict[str, float] = defaultdict(float)
        for span_start, span_end, label in self.spans:
            if span_end > start and span_start < end:
                over[label] += (min(span_end, end) - max(span_start, start)) * 1000
        return dict(sorted(over.items(), key=lambda item: -item[1]))


async def run(args: argparse.Namespace, growth_args: argparse.Namespace,
              tracer: Tracer) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meter-paced-trace-") as tmp:
        worker = growth.Worker(growth_args, str(Path(tmp) / "data"))
        async with open_engine(str(Path(tmp) / "data"), shards=growth_args.shards,
                               clock_ms=worker.clock) as eng:
            for meter in worker.traffic.meters:
                await eng.define_meter(meter)
            if growth_args.limits:
                for limit in growth.meter_limits(worker.traffic):
                    await eng.add_limit(limit)
            build_started = time.perf_counter()
            ingest = await worker.ingest_until(eng, growth_args.days * growth.DAY_MINUTES)
            build_s = time.perf_counter() - build_started
            built_events = worker.accepted
            acks: list[tuple[float, float]] = []
            ingest_one = worker._ingest_one

            async def traced_one(eng_: Any, order: Any, index: int, batch: Any,
                                 latencies: Any, snapshot_latencies: Any,
                                 started_at: float | None = None) -> None:
                await ingest_one(eng_, order, index, batch, latencies, snapshot_latencies,
                                 started_at)
                if started_at is not None:
                    acks.append((started_at, time.perf_counter()))

            worker._ingest_one = traced_one  # type: ignore[method-assign,assignment]
            tracer.on = True
            paced_started = time.perf_counter()
            paced = await worker.paced(eng)
            tracer.on = False
    slow = sorted(((end - start, start, end) for start, end in acks
                   if (end - start) * 1000 > args.slow_ms), reverse=True)
    return {
        "machine": machine_facts(),
        "parameters": {"days": growth_args.days, "customers": growth_args.customers,
                       "limits": growth_args.limits, "pace_events_per_s":
                       growth_args.pace_events_per_s, "pace_seconds": growth_args.pace_seconds,
                       "slow_ms": args.slow_ms},
        "build": {"seconds": build_s, "events_accepted": built_events,
                  "events_per_s": ingest["events_per_s"]},
        "paced": {key: paced[key] for key in (
            "achieved_events_per_s", "ack_p50_ms", "ack_p99_ms", "ack_max_ms",
            "loop_stall_max_ms", "snapshot_call_s") if key in paced},
        "acks": len(acks), "acks_over_slow_ms": len(slow),
        "work": tracer.totals(paced_started),
        "slowest_acks": [{"ack_ms": latency * 1000, "at_s": start - paced_started,
                          "overlapping_ms": tracer.overlapping(start, end)}
                         for latency, start, end in slow[:args.show]],
        "slowest_commits": [{**commit, "at": commit["at"] - paced_started} for commit in
                            sorted(tracer.commits, key=lambda c: -c["ms"])[:args.show]],
    }


def report(result: dict[str, Any]) -> str:
    paced = result["paced"]
    lines = [f"state: {result['parameters']['days']} days, {result['build']['events_accepted']:,}"
             f" events accepted in {result['build']['seconds']:.0f} s",
             f"paced: {paced['achieved_events_per_s']:,.0f} events/s, ack p50 / p99 / max "
             f"{paced['ack_p50_ms']:.1f} / {paced['ack_p99_ms']:.1f} / {paced['ack_max_ms']:.0f}"
             f" ms, loop stall max {paced['loop_stall_max_ms']:.0f} ms",
             f"acks over {result['parameters']['slow_ms']} ms: {result['acks_over_slow_ms']}"
             f" of {result['acks']}", "",
             f"{'work':34s} {'count':>6s} {'total ms':>9s} {'max ms':>8s}"]
    for label, row in result["work"].items():
        lines.append(f"{label:34s} {row['count']:6.0f} {row['total_ms']:9.0f} "
                     f"{row['max_ms']:8.1f}")
    lines.append("")
    for ack in result["slowest_acks"]:
        over = ", ".join(f"{label} {ms:.0f}" for label, ms in
                         list(ack["overlapping_ms"].items())[:5])
        lines.append(f"ack {ack['ack_ms']:.0f} ms at {ack['at_s']:.1f} s: {over}")
    lines.append("")
    for commit in result["slowest_commits"]:
        lines.append(
            f"commit {commit['ms']:.0f} ms at {commit['at']:.1f} s (body {commit['body_ms']:.0f}"
            f" ms): {commit['wal_records']} records, {commit['wal_bytes']:,} B, "
            f"{commit['meta']} meta, {commit['alerts']} alerts, index slice "
            f"{commit['slice_keys']} keys / {commit['slice_deletes']} deletes, "
            f"{commit['new_pages']} new pages")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=8)
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument("--pace-seconds", type=float, default=60.0)
    parser.add_argument("--pace-events-per-s", type=int, default=10_000)
    parser.add_argument("--no-limits", action="store_true")
    parser.add_argument("--slow-ms", type=float, default=100.0)
    parser.add_argument("--show", type=int, default=8, help="slowest acks listed")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile's top functions of the sealing turns and the "
                             "shards' checkpoint encoding during the paced run")
    args = parser.parse_args(argv)
    growth_argv = ["--days", str(args.days), "--customers", str(args.customers),
                   "--checkpoint-days", str(args.days), "--pace-seconds", str(args.pace_seconds),
                   "--pace-events-per-s", str(args.pace_events_per_s)]
    if args.no_limits:
        growth_argv.append("--no-limits")
    growth_args = growth.parse_args(growth_argv)
    tracer = Tracer(args.profile)
    tracer.install()
    result = trio.run(run, args, growth_args, tracer)
    print(report(result))
    for label, profile in tracer.profiles.items():
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(20)
        print(f"\n===== {label}\n{out.getvalue()}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
