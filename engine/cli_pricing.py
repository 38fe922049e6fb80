"""``meter invoice`` and ``meter plans``: pricing from the command line, over TCP.

Shell layer: argparse, the terminal and the client (``engine.client``), like
``engine.cli_client`` (whose connection options it shares). Commands:

- ``meter invoice CUSTOMER [--period YYYY-MM | --at-ms MS] [--json | --csv]``: the
  invoice of that billing month (default: now), as a table, JSON or CSV.
- ``meter plans list``, ``meter plans show ID [--version N]``,
  ``meter plans define FILE|-`` (a plan as JSON, docs/pricing.md),
  ``meter plans assign CUSTOMER PLAN [--from YYYY-MM | --from-ms MS]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import msgspec

from engine import Invoice, Plan
from engine.cli_common import add_command, add_connection_options, add_group, connect
from engine.errors import InvalidRequest


def month_ms(text: str) -> int:
    """A moment inside the month ``YYYY-MM`` in every time zone: the 15th, noon UTC."""
    try:
        year, month = (int(part) for part in text.split("-"))
        return int(datetime(year, month, 15, 12, tzinfo=UTC).timestamp()) * 1000
    except ValueError:
        raise InvalidRequest(f"a period is YYYY-MM, got {text!r}") from None


def add_parsers(commands: Any) -> None:
    invoice = add_command(
        commands, "invoice", help="a customer's invoice for a billing month", run=run_invoice,
        example="meter invoice acme --period 2026-11\nmeter invoice acme --csv > acme.csv")
    invoice.add_argument("customer")
    when = invoice.add_mutually_exclusive_group()
    when.add_argument("--period", help="the billing month, YYYY-MM (default: now)")
    when.add_argument("--at-ms", type=int, help="a time inside the billing period (ms)")
    shape = invoice.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true")
    shape.add_argument("--csv", action="store_true")
    add_connection_options(invoice)

    plans = add_group(commands, "plans", help="list, show, define and assign price plans",
                      example="meter plans define pro.json\nmeter plans assign acme pro")
    listing = add_command(plans, "list", help="the latest version of every plan",
                          run=run_plans, example="meter plans list --json")
    listing.add_argument("--json", action="store_true")
    show = add_command(plans, "show", help="one plan as JSON", run=run_plans,
                       example="meter plans show pro --version 2")
    show.add_argument("plan_id")
    show.add_argument("--version", type=int)
    define = add_command(plans, "define", help="define a plan from JSON (a file or -)",
                         run=run_plans, example="meter plans define pro.json")
    define.add_argument("file")
    assign = add_command(plans, "assign", help="bill a customer on a plan", run=run_plans,
                         example="meter plans assign acme pro --from 2026-12")
    assign.add_argument("customer")
    assign.add_argument("plan_id")
    start = assign.add_mutually_exclusive_group()
    start.add_argument("--from", dest="from_period", help="from this month, YYYY-MM")
    start.add_argument("--from-ms", type=int, help="from the first period start at or after")
    for parser in (listing, show, define, assign):
        add_connection_options(parser)


async def run_invoice(args: argparse.Namespace, out: TextIO) -> int:
    at_ms = (month_ms(args.period) if args.period else
             args.at_ms if args.at_ms is not None else time.time_ns() // 1_000_000)
    async with connect(args, "meter invoice") as client:
        invoice = await client.invoice(args.customer, at_ms)
    if args.json:
        out.write(msgspec.json.encode(invoice).decode() + "\n")
    elif args.csv:
        out.write(invoice.csv())
    else:
        write_table(invoice, out)
    return 0


def write_table(invoice: Invoice, out: TextIO) -> None:
    start = datetime.fromtimestamp(invoice.period_start_ms / 1000, UTC).isoformat()
    end = datetime.fromtimestamp(invoice.period_end_ms / 1000, UTC).isoformat()
    print(f"invoice for {invoice.customer_id}: plan {invoice.plan_id} version "
          f"{invoice.plan_version}, [{start}, {end}), {invoice.status}", file=out)
    rows = [[line.kind, line.charge_id or "", str(line.quantity), str(line.amount)]
            for line in invoice.lines]
    headers = ["kind", "charge", "quantity", f"amount ({invoice.currency})"]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), file=out)
    for row in rows:
        print("  ".join([*(c.ljust(w) for c, w in zip(row[:2], widths, strict=False)),
                         row[2].rjust(widths[2]), row[3].rjust(widths[3])]), file=out)
    print(f"total {invoice.total} {invoice.currency}", file=out)


async def run_plans(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(args, "meter plans") as client:
        command = args.plans_command
        if command == "list":
            plans = await client.plans()
            if args.json:
                out.write(msgspec.json.encode(plans).decode() + "\n")
            for plan in [] if args.json else plans:
                print(f"{plan.id}  version {plan.version}  {plan.currency}  "
                      f"{len(plan.charges)} charges  {plan.timezone}", file=out)
            return 0
        if command == "show":
            found = await client.get_plan(args.plan_id, args.version)
            if found is None:
                print(f"meter plans: no plan {args.plan_id!r}", file=sys.stderr)
                return 1
            out.write(msgspec.json.encode(found).decode() + "\n")
            return 0
        if command == "define":
            raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
            try:
                plan = msgspec.json.decode(raw, type=Plan)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                raise InvalidRequest(f"not a plan: {exc}") from None
            stored = await client.define_plan(plan)
            print(f"plan {stored.id} version {stored.version}", file=out)
            return 0
        from_ms = (month_ms(args.from_period) if args.from_period else
                   args.from_ms if args.from_ms is not None else time.time_ns() // 1_000_000)
        assignment = await client.assign_plan(args.customer, args.plan_id,
                                              effective_from_ms=from_ms)
        print(f"{assignment.customer_id} on {assignment.plan_id} from "
              f"{datetime.fromtimestamp(assignment.starts_ms / 1000, UTC).isoformat()}",
              file=out)
        return 0

