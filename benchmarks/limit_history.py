"""Ingest time per batch as a month's history grows, with a month unique_count limit.

A plain script (not collected by pytest; tests/test_benchmarks_smoke.py runs it on
a tiny workload). It uses only the public API (``open_engine`` over the in-memory
store, one shard, a clock it sets), so the same file measures any checkout: run
it with that checkout's interpreter, from outside the repository, and it imports
that checkout's ``engine`` (printed as ``engine_path``).

Simulated time starts at a month's first midnight (UTC). Every simulated hour one
batch of ``--batch-size`` events arrives for a ``unique_count`` meter: random
customers of ``--customers``, random users of ``--users``, two regions, times
spread over that hour. The same workload runs twice in one process: without
limits (the floor) and with a month limit on the meter that never fires (so the
figure is the cost of evaluating it). Reported per run: the median batch time on
day 1, 10, 20 and 30, and day 30 over day 1.

    python benchmarks/limit_history.py --quick    # a few seconds
    python benchmarks/limit_history.py            # 30 days
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

import engine
from engine import Event, Limit, Meter, open_engine
from engine.storage import MemoryStore

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
START_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC


async def run(days: int, batch_size: int, customers: int, users: int, with_limit: bool,
              seed: int) -> dict[int, list[float]]:
    """Seconds per batch, by day (1-based)."""
    rng = random.Random(seed)
    clock = [START_MS]
    per_day: dict[int, list[float]] = {}
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: clock[0],
                           snapshot_on_close=False) as eng:
        await eng.define_meter(Meter(name="users", aggregation="unique_count",
                                     unique_dimension="user"))
        if with_limit:
            await eng.add_limit(Limit(id="monthly-users", meter_api_name="users",
                                      thresholds=[10**9], period="month"))
        for hour in range(days * 24):
            hour_start = START_MS + hour * HOUR_MS
            batch = [
                Event(meter_api_name="users", customer_id=f"c{rng.randrange(customers)}",
                      meter_value=1, meter_time_in_millis=hour_start + rng.randrange(HOUR_MS),
                      dimensions={"user": f"u{rng.randrange(users)}",
                                  "region": rng.choice(("eu", "us"))})
                for _ in range(batch_size)
            ]
            clock[0] = hour_start + HOUR_MS
            started = time.perf_counter()
            await eng.ingest(batch)
            per_day.setdefault(hour // 24 + 1, []).append(time.perf_counter() - started)
    return per_day


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--customers", type=int, default=20)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 days, small batches")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if args.quick:
        args.days, args.batch_size = 2, 50
    report_days = sorted({1, *(d for d in (10, 20, 30) if d <= args.days), args.days})
    result: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(),
        "engine_path": engine.__file__, "days": args.days, "batch_size": args.batch_size,
        "customers": args.customers, "users": args.users, "runs": {},
    }
    for name, with_limit in (("no limit", False), ("month unique_count limit", True)):
        per_day = trio.run(run, args.days, args.batch_size, args.customers, args.users,
                           with_limit, args.seed)
        medians = {day: statistics.median(per_day[day]) * 1000 for day in report_days}
        result["runs"][name] = {
            "median_batch_ms_by_day": medians,
            "last_over_first": medians[args.days] / medians[1],
        }
    if args.json:
        print(json.dumps(result))
        return result
    print(f"engine {result['engine_path']}  python {result['python']}  {result['machine']}")
    print(f"{args.days} days, one batch of {args.batch_size} events per hour, "
          f"{args.customers} customers, {args.users} users")
    print("run".ljust(28) + "".join(f"day {d:>2} ms".rjust(12) for d in report_days)
          + "  last/first")
    for name, run_result in result["runs"].items():
        medians = run_result["median_batch_ms_by_day"]
        print(name.ljust(28) + "".join(f"{medians[d]:12.2f}" for d in report_days)
              + f"  {run_result['last_over_first']:9.1f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
