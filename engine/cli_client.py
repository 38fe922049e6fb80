"""``meter ingest``, ``meter query``, ``meter stats`` and ``meter backup``: the client
side of the CLI.

Shell layer: argparse, files, the terminal and ``engine.client``.

``meter ingest`` reads NDJSON (one Amberflo-shaped JSON object per line) or
CSV (a header row with ``meterApiName, customerId, meterValue,
meterTimeInMillis, uniqueId`` and any ``dimensions.KEY`` columns). A batch the
server refuses because of bad events is resent without them (nothing of a
refused batch was applied), so good events are never held back by bad ones;
every refused event is reported with its line number and reason.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any, TextIO

import msgspec
import trio

from engine.cli_common import (
    UsageError,
    add_command,
    add_connection_options,
    connect,
    filters,
    print_one,
)
from engine.client import Client
from engine.domain.windows import WindowError, resolve_timezone
from engine.errors import BatchRejected
from engine.schema import Event, Query, QueryResult, Take

MINUTE_MS = 60_000
DAY_MS = 86_400_000


def add_parsers(commands: Any) -> None:
    ingest = add_command(
        commands, "ingest", help="send events from an NDJSON or CSV file", run=run_ingest,
        example="meter ingest events.ndjson\n"
                "meter export api_calls --events --start 2026-12-01 | meter ingest -")
    ingest.add_argument("file", help="path, or - for standard input")
    ingest.add_argument("--format", choices=["auto", "ndjson", "csv"], default="auto")
    ingest.add_argument("--batch-size", type=int, default=2000)
    ingest.add_argument("--in-flight", type=int, default=4, help="batches in flight at once")
    add_connection_options(ingest)

    query = add_command(
        commands, "query", help="query usage", run=run_query,
        example="meter query api_calls --window day --group-by customer_id --take 10")
    add_query_options(query)
    query.add_argument("--json", action="store_true", help="print the result as JSON")
    add_connection_options(query)

    stats = add_command(commands, "stats", help="server and engine statistics", run=run_stats,
                        example="meter stats --json")
    stats.add_argument("--json", action="store_true")
    add_connection_options(stats)

    backup = add_command(
        commands, "backup", run=run_backup,
        help="have a running server copy its data directory to DEST, while serving",
        example="meter backup /var/backups/meter-2026-12-02",
        description="Ask a running server (--host/--port) to write a consistent copy of its "
                    "data directory to DEST. DEST is a path on the server's machine, written "
                    "by the server process (a relative one is relative to the server's "
                    "working directory: prefer an absolute path); it must not exist or be "
                    "an empty directory, and its parent must exist. Needs an admin key. "
                    "Restore: start `meter serve --data-dir DEST`.")
    backup.add_argument("dest", help="the new data directory, on the server's machine")
    backup.add_argument("--json", action="store_true", help="print the result as JSON")
    add_connection_options(backup)


def add_query_options(parser: argparse.ArgumentParser, meter_required: bool = True) -> None:
    """The options of a usage query (``meter query``, ``meter export``)."""
    parser.add_argument("meter", help="meter name", nargs=None if meter_required else "?")
    parser.add_argument("--start", help="ms since epoch or ISO 8601 (default: 24 h before --end)")
    parser.add_argument("--end", help="ms since epoch or ISO 8601 (default: now, next minute)")
    parser.add_argument("--window", choices=["minute", "hour", "day", "week", "month"])
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--group-by", default="",
                        help="comma-separated keys, e.g. customer_id,region")
    parser.add_argument("--filter", action="append", default=[],
                        help="KEY=V1,V2 (repeatable), e.g. customer_id=acme")
    parser.add_argument("--take", type=int, help="top N groups by value")
    parser.add_argument("--ascending", action="store_true", help="with --take: bottom N")


# -------------------------------------------------------------------- ingest

_event_decoder = msgspec.json.Decoder(Event)


def read_events(stream: TextIO, file_format: str) -> Iterator[tuple[int, Event | str]]:
    """(line number, event or the reason the line is not an event)."""
    if file_format == "auto":
        first = stream.readline()
        file_format = "ndjson" if first.lstrip().startswith("{") else "csv"
        stream = _Prepend(first, stream)  # type: ignore[assignment]
    if file_format == "ndjson":
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                yield number, _event_decoder.decode(line)
            except msgspec.DecodeError as exc:
                yield number, f"not an event: {exc}"
        return
    reader = csv.DictReader(stream)
    for row in reader:
        number = reader.line_num
        try:
            yield number, _event_from_csv(row)
        except (KeyError, ValueError) as exc:
            yield number, f"not an event: {exc}"


class _Prepend(io.TextIOBase):
    """A text stream with one line put back in front."""

    def __init__(self, first: str, rest: TextIO) -> None:
        self._first: str | None = first
        self._rest = rest

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        if self._first is not None:
            line, self._first = self._first, None
            return line
        return self._rest.readline()

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        while line := self.readline():
            yield line


def _event_from_csv(row: dict[str, str]) -> Event:
    dimensions = {key[len("dimensions."):]: value for key, value in row.items()
                  if key and key.startswith("dimensions.") and value}
    if row.get("dimensions"):
        dimensions.update(json.loads(row["dimensions"]))
    try:
        timestamp = int(row["meterTimeInMillis"])
    except ValueError:
        raise ValueError(
            f"meterTimeInMillis {row['meterTimeInMillis']!r} is not an integer"
        ) from None
    return Event(
        meter_api_name=row["meterApiName"],
        customer_id=row["customerId"],
        meter_value=(Decimal(row["meterValue"]) if "." in row["meterValue"]
                     else int(row["meterValue"])),
        meter_time_in_millis=timestamp,
        dimensions=dimensions,
        unique_id=row.get("uniqueId") or None,
    )


class _IngestTally:
    def __init__(self) -> None:
        self.read = self.accepted = self.duplicates = 0
        self.rejected: list[tuple[int, str]] = []


async def _send_batch(client: Client, batch: list[tuple[int, Event]], tally: _IngestTally) -> None:
    while batch:
        try:
            ack = await client.ingest([event for _, event in batch])
        except BatchRejected as exc:
            bad = {problem.index: problem.reason for problem in exc.problems}
            tally.rejected.extend((batch[i][0], reason) for i, reason in sorted(bad.items()))
            batch = [item for i, item in enumerate(batch) if i not in bad]
            continue
        tally.accepted += ack.accepted
        tally.duplicates += ack.duplicates
        return


async def run_ingest(args: argparse.Namespace, out: TextIO) -> int:
    err = sys.stderr
    live = err.isatty()
    tally = _IngestTally()
    started = time.perf_counter()
    source: TextIO = sys.stdin if args.file == "-" else open(args.file, newline="")
    try:
        async with connect(args, "meter ingest") as client:
            slots = trio.Semaphore(max(1, args.in_flight))

            async def send(batch: list[tuple[int, Event]]) -> None:
                try:
                    await _send_batch(client, batch, tally)
                finally:
                    slots.release()

            async with trio.open_nursery() as nursery:
                batch: list[tuple[int, Event]] = []
                next_report = 0.0
                for number, item in read_events(source, args.format):
                    tally.read += 1
                    if isinstance(item, str):
                        tally.rejected.append((number, item))
                        continue
                    batch.append((number, item))
                    if len(batch) >= args.batch_size:
                        await slots.acquire()  # bounded memory: wait for a free slot
                        nursery.start_soon(send, batch)
                        batch = []
                    if time.perf_counter() >= next_report:
                        _ingest_progress(err, tally, started, live)
                        next_report = time.perf_counter() + (0.2 if live else 2.0)
                if batch:
                    await slots.acquire()
                    nursery.start_soon(send, batch)
    finally:
        if source is not sys.stdin:
            source.close()
    _ingest_progress(err, tally, started, live)
    if live:
        err.write("\n")
    print(f"read {tally.read:,} events: accepted {tally.accepted:,}, duplicates "
          f"{tally.duplicates:,}, rejected {len(tally.rejected):,}", file=out)
    for number, reason in sorted(tally.rejected)[:50]:
        print(f"  line {number}: {reason}", file=out)
    if len(tally.rejected) > 50:
        print(f"  ... and {len(tally.rejected) - 50:,} more", file=out)
    return 1 if tally.rejected else 0


def _ingest_progress(err: TextIO, tally: _IngestTally, started: float, live: bool) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    line = (f"read {tally.read:>10,}  accepted {tally.accepted:>10,}  duplicates "
            f"{tally.duplicates:>8,}  rejected {len(tally.rejected):>6,}  "
            f"{tally.accepted / elapsed:>9,.0f} ev/s")
    err.write(("\r" + line) if live else (line + "\n"))
    err.flush()


# --------------------------------------------------------------------- query


def parse_time_ms(text: str, timezone: str) -> int:
    """Milliseconds since the epoch, or ISO 8601 (naive times are in ``timezone``)."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r} is neither milliseconds nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=resolve_timezone(timezone))
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def time_range(args: argparse.Namespace, now_ms: int) -> tuple[int, int]:
    """``[--start, --end)`` in ms: the end defaults to the next minute, the start to 24 h
    before the end."""
    try:
        end_ms = (parse_time_ms(args.end, args.timezone) if args.end
                  else (now_ms // MINUTE_MS + 1) * MINUTE_MS)
        start_ms = parse_time_ms(args.start, args.timezone) if args.start else end_ms - DAY_MS
    except WindowError as exc:
        raise UsageError(str(exc)) from None
    return start_ms, end_ms


def build_query(args: argparse.Namespace, now_ms: int) -> Query:
    start_ms, end_ms = time_range(args, now_ms)
    return Query(
        meter_api_name=args.meter, start_ms=start_ms, end_ms=end_ms, window=args.window,
        timezone=args.timezone, group_by=[k for k in args.group_by.split(",") if k],
        filter=filters(args.filter),
        take=Take(limit=args.take, ascending=args.ascending) if args.take else None,
    )


def result_rows(query: Query, result: QueryResult) -> tuple[list[str], list[list[str]]]:
    """A result as text cells: the header (window start, the group keys, value), then
    one list per row (the window start in ISO 8601, in the query's time zone)."""
    tz = resolve_timezone(query.timezone)
    headers = ["window_start", *query.group_by, "value"]
    rows = [
        [datetime.fromtimestamp(row.window_start_ms // 1000, tz).isoformat(),
         *("" if row.group[k] is None else str(row.group[k]) for k in query.group_by),
         str(row.value)]
        for row in result.rows
    ]
    return headers, rows


async def run_query(args: argparse.Namespace, out: TextIO) -> int:
    query = build_query(args, time.time_ns() // 1_000_000)
    async with connect(args, "meter query") as client:
        result = await client.query(query)
    if args.json:
        out.write(msgspec.json.encode(result).decode() + "\n")
        return 0
    headers, rows = result_rows(query, result)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), file=out)
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        print("  ".join([*cells, row[-1].rjust(widths[-1])]), file=out)
    print(f"({len(rows)} rows, {result.aggregation} of {result.meter_api_name})", file=out)
    return 0


# --------------------------------------------------------------------- stats


async def run_stats(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(args, "meter stats") as client:
        stats = await client.stats()
    if args.json:
        out.write(json.dumps(stats, sort_keys=True) + "\n")
    else:
        width = max(len(k) for k in stats)
        for key in sorted(stats):
            print(f"{key:<{width}}  {stats[key]}", file=out)
    return 0


# -------------------------------------------------------------------- backup


async def run_backup(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(args, "meter backup") as client:
        backup = await client.backup(args.dest)
    return print_one(args, out, backup,
                     f"backup written to {backup.path}: the write-ahead log up to lsn "
                     f"{backup.lsn}, {backup.size_bytes / 2**20:,.1f} MiB "
                     f"({backup.size_bytes:,} bytes)")

