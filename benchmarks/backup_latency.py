"""Ingest acknowledgement latency while ``Engine.backup`` copies a large store.

A plain script (not collected by pytest; tests/test_benchmarks_smoke.py runs it on
a tiny store). It opens an embedded engine on a fresh data directory (real LMDB,
fsync on), fills it to ``--store-mb`` of write-ahead log (batches of ``--fill-batch``
events with ~300-byte events; no snapshot, so the WAL is what the store holds),
then runs ``--ingesters`` tasks that each ingest batches of ``--batch-size`` events
one after another and time every ``ingest`` call (``time.perf_counter``):

- **baseline**: ``--baseline-s`` seconds with no backup;
- **backup**: from the start of ``Engine.backup`` to its return (the copy runs on
  a worker thread);
- **inline** (``--inline``, for comparison): the same copy called on the event-loop
  thread, as it would run without the worker thread.

Correctness is checked before a figure counts: the backup's lsn is at least the
last lsn acknowledged before it started, and the backup opens as an engine whose
last lsn is that lsn.

    python benchmarks/backup_latency.py --quick      # a few seconds, a small store
    python benchmarks/backup_latency.py              # a 300 MB store, about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkFailure, machine_facts, percentile
from engine import Engine, Event, Meter, open_engine

REGIONS = ["eu-west", "us-east", "ap-south", "sa-east"]
PATHS = [f"/api/v2/resource-{n:03d}/" + "segment/" * 8 for n in range(50)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small store")
    parser.add_argument("--store-mb", type=int, default=None, help="WAL to write first")
    parser.add_argument("--fill-batch", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=100, help="events per timed ingest")
    parser.add_argument("--ingesters", type=int, default=4, help="concurrent ingest loops")
    parser.add_argument("--baseline-s", type=float, default=None)
    parser.add_argument("--inline", action="store_true",
                        help="also time a copy on the event-loop thread, for comparison")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dir", help="where the data directory and backups go "
                                      "(default: a temporary directory)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.store_mb is None:
        args.store_mb = 8 if args.quick else 300
    if args.baseline_s is None:
        args.baseline_s = 1.0 if args.quick else 5.0
    return args


def make_batch(first: int, size: int, now_ms: int) -> list[Event]:
    return [
        Event(meter_api_name="requests", customer_id=f"customer-{index % 2_000:05d}",
              meter_value=1 + index % 7, meter_time_in_millis=now_ms - (index % 600) * 1_000,
              dimensions={"region": REGIONS[index % 4], "path": PATHS[index % 50]},
              unique_id=f"bench-{index:012d}-" + "u" * 100)
        for index in range(first, first + size)
    ]


class Ingesters:
    """``count`` loops ingesting small batches; every call's (start, end) is recorded."""

    def __init__(self, engine: Engine, batch_size: int, first_index: int) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.next_index = first_index
        self.calls: list[tuple[float, float]] = []
        self.last_lsn = 0
        self.stop = trio.Event()

    async def loop(self) -> None:
        while not self.stop.is_set():
            first, self.next_index = self.next_index, self.next_index + self.batch_size
            batch = make_batch(first, self.batch_size, time.time_ns() // 1_000_000)
            started = time.perf_counter()
            ack = await self.engine.ingest(batch)
            self.calls.append((started, time.perf_counter()))
            self.last_lsn = max(self.last_lsn, ack.lsn)

    async def during(self, action: Callable[[], Awaitable[Any]]
                     ) -> tuple[Any, dict[str, Any]]:
        """Run ``action``; the latencies of the ingests that overlapped it (an ingest
        held up by it counts, even if it ended after it)."""
        started = time.perf_counter()
        result = await action()
        ended = time.perf_counter()
        await trio.sleep(0.2)  # let ingests held up by the action finish
        latencies = sorted(end - start for start, end in self.calls
                           if start < ended and end > started)
        return result, {**summary(latencies), "seconds": round(ended - started, 2)}


def summary(sorted_latencies_s: list[float]) -> dict[str, Any]:
    values = sorted_latencies_s
    if not values:
        return {"acks": 0}
    return {"acks": len(values),
            "p50_ms": round(percentile(values, 0.50) * 1000, 2),
            "p99_ms": round(percentile(values, 0.99) * 1000, 2),
            "max_ms": round(values[-1] * 1000, 2)}


async def run_async(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine_facts(), "parameters": {
        k: v for k, v in vars(args).items() if k not in ("json", "dir")}}
    data = root / "data"
    async with open_engine(data, shards=args.shards, snapshot_every_bytes=1 << 40,
                           snapshot_on_close=False) as engine:
        await engine.define_meter(Meter(name="requests", aggregation="sum"))
        fill_started = time.perf_counter()
        index = 0
        wal_bytes = 0
        while wal_bytes < args.store_mb << 20:
            await engine.ingest(make_batch(index, args.fill_batch, time.time_ns() // 1_000_000))
            index += args.fill_batch
            wal_bytes = engine.statistics().wal_bytes_since_snapshot
        report["fill"] = {"events": index, "wal_bytes": wal_bytes,
                          "seconds": round(time.perf_counter() - fill_started, 1)}

        ingesters = Ingesters(engine, args.batch_size, index)
        async with trio.open_nursery() as nursery:
            for _ in range(args.ingesters):
                nursery.start_soon(ingesters.loop)
            await trio.sleep(0.2)  # warm up

            _, report["baseline"] = await ingesters.during(
                lambda: trio.sleep(args.baseline_s))

            acked_before = ingesters.last_lsn
            backup, report["backup"] = await ingesters.during(
                lambda: engine.backup(root / "backup"))
            if backup.lsn < acked_before:
                raise BenchmarkFailure(f"backup lsn {backup.lsn} < lsn {acked_before} "
                                       "acknowledged before it started")
            report["backup"].update(lsn=backup.lsn, acked_before_lsn=acked_before,
                                    size_bytes=backup.size_bytes)

            if args.inline:
                store = engine._store

                async def inline() -> None:
                    store.backup(root / "backup-inline")  # blocks the event loop
                    await trio.sleep(0)

                _, report["inline"] = await ingesters.during(inline)
            ingesters.stop.set()

    async with open_engine(root / "backup", shards=args.shards,
                           snapshot_on_close=False) as copy:
        if copy.statistics().last_lsn != report["backup"]["lsn"]:
            raise BenchmarkFailure(f"the backup opens at lsn {copy.statistics().last_lsn}, "
                                   f"not {report['backup']['lsn']}")
        report["backup"]["recovery_ms"] = copy.statistics().recovery_ms
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.dir:
        root = Path(args.dir)
        root.mkdir(parents=True, exist_ok=True)
        return trio.run(run_async, args, Path(tempfile.mkdtemp(prefix="backup-bench-", dir=root)))
    with tempfile.TemporaryDirectory(prefix="backup-bench-") as tmp:
        return trio.run(run_async, args, Path(tmp))


def format_table(report: dict[str, Any]) -> str:
    lines = ["| phase | acks | p50 ms | p99 ms | max ms | seconds |", "|---|---|---|---|---|---|"]
    for phase in ("baseline", "backup", "inline"):
        row = report.get(phase)
        if row is None:
            continue
        lines.append(f"| {phase} | {row['acks']} | {row.get('p50_ms', '-')} | "
                     f"{row.get('p99_ms', '-')} | {row.get('max_ms', '-')} | "
                     f"{row['seconds']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    machine = report["machine"]
    print(f"# backup latency, {machine['date']}, commit {machine['git_commit']}, "
          f"{machine['python']}, lmdb {machine['lmdb']}, {machine['cpu_count']} CPUs")
    fill, backup = report["fill"], report["backup"]
    print(f"store: {fill['events']:,} events, {fill['wal_bytes'] / 2**20:,.0f} MiB of WAL "
          f"(filled in {fill['seconds']} s); backup: {backup['size_bytes'] / 2**20:,.0f} MiB "
          f"at lsn {backup['lsn']} in {backup['seconds']} s; {args.ingesters} ingesters of "
          f"{args.batch_size} events")
    print(format_table(report))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
