"""The ``meter`` command line.

Shell layer: argparse, the terminal, the runtime, the server and the client.
Commands:

- ``meter serve``: run the TCP server on a data directory (``make run``).
- ``meter ingest FILE|-``: send NDJSON or CSV events in Amberflo's shape.
- ``meter query``: query usage; a table, or ``--json``.
- ``meter stats``: server and engine statistics.
- ``meter backup DEST``: have a running server copy its data directory to DEST.
- ``meter demo``: embed the engine, ingest synthetic traffic, print a usage table.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import TextIO

import trio

from engine import Event, Meter, MeteringError, Query, Take, open_engine
from engine.auth import AuthConfigError
from engine.cli_client import CLIENT_COMMANDS, add_client_parsers
from engine.cli_pricing import PRICING_COMMANDS, add_pricing_parsers
from engine.cli_serve import add_serve_parser, run_serve
from engine.runtime.engine import wall_clock_ms

DEMO_METERS = [
    Meter(name="api_calls", aggregation="count", description="requests served"),
    Meter(name="gb_transferred", aggregation="sum", description="egress in GB"),
    Meter(name="active_users", aggregation="unique_count", unique_dimension="user_id"),
]
REGIONS = ["eu-west", "us-east", "ap-south"]


def demo_batch(rng: random.Random, run_id: str, first_index: int, size: int, now_ms: int,
               customers: int) -> list[Event]:
    """Synthetic traffic: a few big customers, a long tail, three meters, some late events."""
    events = []
    for offset in range(size):
        index = first_index + offset
        customer = f"customer-{min(int(rng.paretovariate(1.2)), customers) - 1:05d}"
        meter = DEMO_METERS[index % 3]
        late_ms = rng.randint(0, 6 * 86_400_000) if rng.random() < 0.05 else rng.randint(0, 60_000)
        value: int | Decimal = 1
        if meter.name == "gb_transferred":
            value = Decimal(rng.randint(1, 5000)) / 1000
        events.append(Event(
            meter_api_name=meter.name,
            customer_id=customer,
            meter_value=value,
            meter_time_in_millis=now_ms - late_ms,
            dimensions={"region": rng.choice(REGIONS), "user_id": f"u{rng.randint(1, 300)}"},
            unique_id=f"{run_id}-{index}",
        ))
    return events


def _progress(out: TextIO, done: int, total: int, started: float, live: bool) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    width = 30
    filled = width * done // max(total, 1)
    line = (f"ingesting [{'#' * filled}{'.' * (width - filled)}] {done:>9,}/{total:,} events "
            f"{done / elapsed:>10,.0f} ev/s")
    if live:
        out.write("\r" + line)
    else:
        out.write(line + "\n")
    out.flush()


async def run_demo(args: argparse.Namespace, out: TextIO) -> int:
    live = out.isatty()
    rng = random.Random(args.seed)
    run_id = uuid.uuid4().hex[:8]
    print(f"metering-engine demo: data in {args.data_dir!r}, {args.shards} shards", file=out)
    async with open_engine(args.data_dir, shards=args.shards) as eng:
        stats = eng.statistics()
        print(f"recovered {stats.series_count:,} series up to lsn {stats.last_lsn} "
              f"in {stats.recovery_ms} ms", file=out)
        for meter in DEMO_METERS:
            await eng.define_meter(meter)
        started = time.perf_counter()
        accepted = duplicates = sent = 0
        next_report = 0.0
        while sent < args.events:
            size = min(args.batch_size, args.events - sent)
            batch = demo_batch(rng, run_id, sent, size, wall_clock_ms(), args.customers)
            if rng.random() < 0.1:
                batch += batch[: max(1, size // 100)]  # a client retrying part of a batch
            ack = await eng.ingest(batch)
            accepted += ack.accepted
            duplicates += ack.duplicates
            sent += size
            if time.perf_counter() >= next_report or sent == args.events:
                _progress(out, sent, args.events, started, live)
                next_report = time.perf_counter() + (0.1 if live else 1.0)
        if live:
            out.write("\n")
        elapsed = time.perf_counter() - started
        print(f"accepted {accepted:,} events, {duplicates:,} retried duplicates counted once, "
              f"{accepted / elapsed:,.0f} events/s durable", file=out)
        now = wall_clock_ms()
        day = 86_400_000
        usage: dict[str, dict[str, object]] = {}
        for meter in DEMO_METERS:
            result = await eng.query(Query(
                meter_api_name=meter.name, start_ms=now - 7 * day, end_ms=now + 60_000,
                group_by=["customer_id"], take=Take(limit=10) if meter is DEMO_METERS[0] else None,
            ))
            for row in result.rows:
                customer = str(row.group["customer_id"])
                usage.setdefault(customer, {})[meter.name] = row.value
        top = list(usage)[:10]
        print("\nusage over the last 7 days, top 10 customers by api_calls:", file=out)
        print(f"{'customer':<16}{'api_calls':>12}{'gb_transferred':>18}{'active_users':>14}",
              file=out)
        for customer in top:
            values = usage[customer]
            print(f"{customer:<16}{values.get('api_calls', 0):>12,}"
                  f"{values.get('gb_transferred', 0):>18}{values.get('active_users', 0):>14}",
                  file=out)
        stats = eng.statistics()
        print(f"\n{stats.series_count:,} series, {stats.bucket_count:,} one-minute buckets, "
              f"{stats.group_commits:,} group commits for {stats.batches:,} batches", file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meter", description="metering-engine command line")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_client_parsers(commands)
    add_pricing_parsers(commands)
    demo = commands.add_parser("demo", help="embed the engine, ingest synthetic traffic, "
                                             "print usage")
    demo.add_argument("--data-dir", default="./data", help="data directory (default ./data)")
    demo.add_argument("--shards", type=int, default=8)
    demo.add_argument("--events", type=int, default=500_000)
    demo.add_argument("--batch-size", type=int, default=2_000)
    demo.add_argument("--customers", type=int, default=10_000)
    demo.add_argument("--seed", type=int, default=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return trio.run(run_demo, args, sys.stdout)
        if args.command == "serve":
            return trio.run(run_serve, args, sys.stdout)
        return trio.run({**CLIENT_COMMANDS, **PRICING_COMMANDS}[args.command], args, sys.stdout)
    except (MeteringError, AuthConfigError, OSError) as exc:
        print(f"meter {args.command}: {exc}", file=sys.stderr)
        return 1
