"""``meter export``: a usage query as CSV or JSON, or the raw events of a range as NDJSON.

Shell layer: argparse, files and ``engine.client`` (through ``engine.cli_common``).

The raw events come from the server's raw-event log (``Client.iter_raw_events``, the
``read_events`` request of docs/protocol.md): the accepted events, duplicates left
out, in the order they were logged, one Amberflo-shaped JSON object per line, so
``meter ingest`` reads the file back as it is.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import msgspec

from engine.cli_client import add_query_options, build_query, result_rows, time_range
from engine.cli_common import UsageError, add_command, add_connection_options, connect


def add_parsers(commands: Any) -> None:
    export = add_command(
        commands, "export", run=run_export,
        help="export a query as CSV or JSON, or the raw events of a range as NDJSON",
        example="meter export api_calls --window day --group-by customer_id --format csv "
                "> usage.csv\n"
                "meter export api_calls --events --start 2026-11-01 --end 2026-12-01 "
                "> november.ndjson")
    add_query_options(export, meter_required=False)
    export.add_argument("--format", choices=["csv", "json", "ndjson"],
                        help="a query: csv (default) or json; raw events: ndjson (the only "
                             "one)")
    export.add_argument("--events", action="store_true",
                        help="the raw events with event time in [--start, --end) instead of "
                             "a query (METER optional: every meter)")
    export.add_argument("--customer", help="with --events: only this customer's events")
    export.add_argument("--output", "-o", metavar="FILE", help="write here (default stdout)")
    add_connection_options(export)


@contextmanager
def _output(args: argparse.Namespace, out: TextIO) -> Iterator[TextIO]:
    if args.output is None:
        yield out
        return
    with open(args.output, "w", newline="") as file:
        yield file


async def run_export(args: argparse.Namespace, out: TextIO) -> int:
    if args.events:
        return await _export_events(args, out)
    if args.meter is None:
        raise UsageError("a query export needs a METER (or --events for raw events)")
    if args.format == "ndjson":
        raise UsageError("--format ndjson is for --events; a query is csv or json")
    if args.customer is not None:
        raise UsageError("--customer goes with --events; filter a query with "
                         "--filter customer_id=ID")
    query = build_query(args, time.time_ns() // 1_000_000)
    async with connect(args, "meter export") as client:
        result = await client.query(query)
    with _output(args, out) as target:
        if args.format == "json":  # (else csv, the default)
            target.write(msgspec.json.encode(result).decode() + "\n")
            return 0
        headers, rows = result_rows(query, result)
        writer = csv.writer(target, lineterminator="\n")
        writer.writerow([headers[0], "window_start_ms", *headers[1:]])
        for row, source in zip(rows, result.rows, strict=True):
            writer.writerow([row[0], source.window_start_ms, *row[1:]])
    return 0


async def _export_events(args: argparse.Namespace, out: TextIO) -> int:
    shaping = (("--window", args.window), ("--group-by", args.group_by),
               ("--filter", args.filter), ("--take", args.take),
               (f"--format {args.format}", args.format not in (None, "ndjson")))
    refused = [flag for flag, value in shaping if value]
    if refused:
        raise UsageError(f"{', '.join(refused)} shape a query, not --events")
    start_ms, end_ms = time_range(args, time.time_ns() // 1_000_000)
    encoder = msgspec.json.Encoder()
    count = 0
    async with connect(args, "meter export") as client:
        with _output(args, out) as target:
            async for events in client.iter_raw_events(start_ms, end_ms,
                                                       meter_api_name=args.meter,
                                                       customer_id=args.customer):
                target.write(b"".join(encoder.encode(e) + b"\n" for e in events).decode())
                count += len(events)
    if args.output is not None:
        print(f"wrote {count:,} events to {args.output}", file=sys.stderr)
    return 0
