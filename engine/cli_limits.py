"""``meter limits add|list|remove`` and ``meter watch``: limits and their alerts.

Shell layer: argparse, the terminal and ``engine.client`` (through ``engine.cli_common``).

``meter watch`` subscribes to the server's alert log (docs/limits.md): every alert has
a gap-free ``seq``, so a watcher that stopped resumes with ``--from-seq`` = the last
seq it printed + 1 and misses nothing and repeats nothing. Without ``--from-seq`` it
prints only alerts raised from now on. It pings the server every minute, so the
server's idle timeout never closes a quiet watch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from decimal import Decimal
from typing import Any, TextIO

import msgspec
import trio

from engine.cli_common import (
    UsageError,
    add_command,
    add_connection_options,
    add_group,
    connect,
    exact_number,
    filters,
    print_list,
    print_one,
    utc_iso,
)
from engine.client import Client
from engine.errors import ConnectionLost
from engine.schema import Alert, Limit

PERIODS = ["hour", "day", "week", "month", "total"]
PING_EVERY_S = 60.0  # well inside the server's 300 s idle timeout


def add_parsers(commands: Any) -> None:
    limits = add_group(commands, "limits", help="add, list and remove usage limits",
                       example="meter limits add acme-daily --meter api_calls --threshold 1000 "
                               "--customer acme\nmeter limits list\n"
                               "meter limits remove acme-daily")
    add = add_command(
        limits, "add", run=run_add,
        help="add a limit (or replace the one with the same id); alerts fire as usage "
             "crosses each threshold",
        example="meter limits add daily-calls --meter api_calls --threshold 80,100 "
                "--period day --timezone Europe/Berlin")
    add.add_argument("id", help="the limit's name; an existing limit with it is replaced")
    add.add_argument("--meter", required=True, help="the meter whose usage is limited")
    add.add_argument("--threshold", action="append", required=True, metavar="N[,N...]",
                     help="a threshold (repeatable, or comma-separated), exact: 100, 2.5")
    add.add_argument("--customer", help="only this customer (default: every customer, "
                                        "each separately)")
    add.add_argument("--period", choices=PERIODS, default="day")
    add.add_argument("--timezone", default="UTC", help="IANA zone of the period")
    add.add_argument("--filter", action="append", default=[],
                     help="count only matching usage: KEY=V1,V2 (repeatable)")
    add.add_argument("--webhook-url", help="`meter serve` POSTs this limit's alerts here")
    add.add_argument("--json", action="store_true", help="print the stored limit as JSON")
    add_connection_options(add)

    listing = add_command(limits, "list", help="the limits, in the order they were added",
                          run=run_list, example="meter limits list --json")
    listing.add_argument("--json", action="store_true", help="one JSON array of the limits")
    add_connection_options(listing)

    remove = add_command(limits, "remove", help="remove a limit (alerts already raised stay)",
                         run=run_remove, example="meter limits remove daily-calls")
    remove.add_argument("id", help="the limit's id")
    add_connection_options(remove)

    watch = add_command(
        commands, "watch", run=run_watch,
        help="print alerts as they are raised; resumable with --from-seq",
        example="meter watch                  # alerts from now on, until Ctrl-C\n"
                "meter watch --from-seq 0 --no-follow --json   # every stored alert, "
                "as NDJSON")
    watch.add_argument("--from-seq", type=int, metavar="SEQ",
                       help="start at this alert seq (0: every stored alert); to resume, the "
                            "last seq printed + 1 (default: only new alerts)")
    watch.add_argument("--json", action="store_true", help="one JSON object per alert")
    watch.add_argument("--count", type=int, metavar="N", help="exit after N alerts")
    watch.add_argument("--no-follow", action="store_true",
                       help="print the alerts stored so far, then exit (with a key bound to "
                            "a customer: at that customer's first later alert, since the "
                            "server does not say when it skipped the others)")
    add_connection_options(watch)


# ------------------------------------------------------------------- limits


def _thresholds(texts: list[str]) -> list[int | float | Decimal]:
    return [exact_number(part.strip()) for text in texts for part in text.split(",")
            if part.strip()]


def describe(limit: Limit) -> str:
    who = f"customer {limit.customer_id}" if limit.customer_id else "every customer"
    thresholds = ", ".join(str(t) for t in limit.thresholds)
    where = "".join(f", {key} in {','.join(values)}" for key, values in limit.filter.items())
    zone = "" if limit.timezone == "UTC" or limit.period == "total" else f" ({limit.timezone})"
    return (f"{limit.id}: {limit.meter_api_name} per {limit.period}{zone}, {who}{where}: "
            f"{thresholds}")


async def run_add(args: argparse.Namespace, out: TextIO) -> int:
    limit = Limit(id=args.id, meter_api_name=args.meter, thresholds=_thresholds(args.threshold),
                  customer_id=args.customer, period=args.period, timezone=args.timezone,
                  filter=filters(args.filter), webhook_url=args.webhook_url)
    async with connect(args, "meter limits add") as client:
        stored = await client.add_limit(limit)
    return print_one(args, out, stored, f"added {describe(stored)}")


async def run_list(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(args, "meter limits list") as client:
        limits = await client.list_limits()
    return print_list(args, out, limits, describe, "limits")


async def run_remove(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(args, "meter limits remove") as client:
        removed = await client.remove_limit(args.id)
    if not removed:
        print(f"meter limits remove: there is no limit {args.id!r}", file=sys.stderr)
        return 1
    print(f"removed {args.id}", file=out)
    return 0


# -------------------------------------------------------------------- watch


def alert_line(alert: Alert) -> str:
    period = "all time" if alert.period_start_ms == 0 else f"from {utc_iso(alert.period_start_ms)}"
    return (f"#{alert.seq}  {utc_iso(alert.crossed_at_ms)}  {alert.customer_id}  "
            f"{alert.limit_id}: {alert.meter_api_name} reached {alert.threshold} "
            f"(usage {alert.value}, period {period})")


async def _keep_alive(client: Client) -> None:
    with contextlib.suppress(ConnectionLost):  # the subscription reports a lost connection
        while True:
            await trio.sleep(PING_EVERY_S)
            await client.ping()


async def _first_new_seq(client: Client) -> int:
    """The seq the next alert will get (a subscription's reply says; it is closed again
    at once, before the stored alerts it would replay are read)."""
    async with client.subscribe(0) as probe:
        return probe.server_next_seq


async def run_watch(args: argparse.Namespace, out: TextIO) -> int:
    if args.from_seq is not None and args.from_seq < 0:
        raise UsageError("--from-seq must be 0 or more")
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    async with connect(args, "meter watch") as client:
        from_seq = args.from_seq
        if from_seq is None:
            from_seq = await _first_new_seq(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_keep_alive, client)
            try:
                return await _print_alerts(client, from_seq, args, out)
            finally:
                nursery.cancel_scope.cancel()


async def _print_alerts(client: Client, from_seq: int, args: argparse.Namespace,
                        out: TextIO) -> int:
    printed = 0
    async with client.subscribe(from_seq) as alerts:
        stored_until = alerts.server_next_seq
        try:
            while args.count is None or printed < args.count:
                if args.no_follow and alerts.next_seq >= stored_until:
                    break
                alert = await alerts.__anext__()
                if args.no_follow and alert.seq >= stored_until:
                    break  # a customer-bound key's seqs have gaps: this one is live
                line = msgspec.json.encode(alert).decode() if args.json else alert_line(alert)
                print(line, file=out, flush=True)
                printed += 1
        except ConnectionLost as exc:
            reason = str(exc).split("; resubscribe")[0]
            print(f"meter watch: {reason}; resume with --from-seq {alerts.next_seq}",
                  file=sys.stderr)
            return 1
    return 0
