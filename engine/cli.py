"""The ``meter`` command line.

Shell layer: argparse, the terminal, the runtime, the server and the client.
Commands (docs/cli.md is the reference):

- ``meter serve``: run the TCP server on a data directory (``make run``).
- ``meter ingest FILE|-``: send NDJSON or CSV events in Amberflo's shape.
- ``meter query``: query usage; a table, or ``--json``.
- ``meter meters define|list``, ``meter limits add|list|remove``, ``meter watch``,
  ``meter customers add|list|show``, ``meter export`` (their own modules).
- ``meter stats``: server and engine statistics.
- ``meter backup DEST``: have a running server copy its data directory to DEST.
- ``meter demo``: embed the engine, ingest synthetic traffic, print a usage table.

Every command exits 0 on success and otherwise prints one line, ``meter COMMAND:
reason``, to stderr: status 1 for a failure, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
import time
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, TextIO

import trio

from engine import Event, Meter, MeteringError, Query, Take, open_engine
from engine.auth import AuthConfigError
from engine.cli_common import UsageError, add_command
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


def add_parsers(commands: Any) -> None:
    demo = add_command(commands, "demo", run=run_demo,
                       help="embed the engine, ingest synthetic traffic, print usage",
                       example="meter demo --data-dir ./data-demo --events 100000")
    demo.add_argument("--data-dir", default="./data", help="data directory (default ./data)")
    demo.add_argument("--shards", type=int, default=8)
    demo.add_argument("--events", type=int, default=500_000)
    demo.add_argument("--batch-size", type=int, default=2_000)
    demo.add_argument("--customers", type=int, default=10_000)
    demo.add_argument("--seed", type=int, default=1)


# The command modules, in the order ``meter --help`` lists them: each has
# ``add_parsers(commands)`` (engine.cli_common). A new command module is one line here.
COMMAND_MODULES = (
    "engine.cli_serve",
    "engine.cli_client",
    "engine.cli_meters",
    "engine.cli_limits",
    "engine.cli_customers",
    "engine.cli_export",
    "engine.cli_pricing",
    "engine.cli_corrections",
    "engine.cli",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter", description="metering-engine command line (docs/cli.md)",
        epilog="example:\n  meter serve &\n  meter meters define api_calls --aggregation sum\n"
               "  meter ingest events.ndjson\n  meter query api_calls --group-by customer_id",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{command}")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parsers(commands)
    return parser


# What a command may fail with and report in one line: the engine's and the server's
# errors, the key file's, the network's and the filesystem's, and bad arguments.
REPORTED = (MeteringError, AuthConfigError, OSError, ValueError, trio.TooSlowError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = " ".join(part for part in (args.command, *_subcommands(args)) if part)
    try:
        code: int = trio.run(args.run, args, sys.stdout)
        return code
    except KeyboardInterrupt:
        print(f"meter {name}: interrupted", file=sys.stderr)
        return 130
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not all(isinstance(leaf, REPORTED) for leaf in leaves):
            raise
        return _report(name, leaves[0])
    except REPORTED as exc:
        return _report(name, exc)


def _subcommands(args: argparse.Namespace) -> list[str]:
    return [value for key, value in vars(args).items()
            if key.endswith("_command") and isinstance(value, str)]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def _report(name: str, exc: BaseException) -> int:
    if isinstance(exc, trio.TooSlowError):
        reason = "timed out (is the server running, and at that address?)"
    else:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    print(f"meter {name}: {reason}", file=sys.stderr)
    return 2 if isinstance(exc, UsageError) else 1
