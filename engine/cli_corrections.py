"""``meter cancel`` and ``meter amend``: corrections over TCP (docs/api.md "Corrections").

Shell layer: argparse, the terminal and ``engine.client`` (through ``engine.cli_common``).
The key needs the ``correct`` scope; its name is the correction's ``by``.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any, TextIO

from engine.cli_common import (
    UsageError,
    add_command,
    add_connection_options,
    connect,
    exact_number,
    filters,
    key_values,
)
from engine.schema import Event


def add_parsers(commands: Any) -> None:
    cancel = add_command(
        commands, "cancel", run=run_cancel,
        help="cancel events by unique id, or every event in a time range; aggregates "
             "follow at once",
        example="meter cancel api_calls --customer acme --id e-1 --id e-2\n"
                "meter cancel api_calls --all-customers --from 2025-10-01T00:00:00Z "
                "--to 2025-10-02T00:00:00Z --filter region=eu")
    cancel.add_argument("meter", help="the meter")
    cancel.add_argument("--customer", help="the customer whose events are cancelled")
    cancel.add_argument("--all-customers", action="store_true",
                        help="a time-range cancel over every customer")
    cancel.add_argument("--id", action="append", default=[], dest="ids",
                        help="a unique id to cancel (repeatable)")
    cancel.add_argument("--from", dest="start", help="event time from (ISO 8601 or ms)")
    cancel.add_argument("--to", dest="end", help="event time to, exclusive")
    cancel.add_argument("--received-from", help="ingest time from (ISO 8601 or ms)")
    cancel.add_argument("--received-to", help="ingest time to, exclusive")
    cancel.add_argument("--filter", action="append", default=[],
                        help="only matching events: KEY=V1,V2 (repeatable)")
    add_connection_options(cancel)

    amend = add_command(
        commands, "amend", run=run_amend,
        help="replace one event (by unique id) with a corrected one, atomically",
        example="meter amend api_calls --customer acme --id e-3 --value 12 "
                "--time 2025-10-01T12:00:00Z --dimension region=eu")
    amend.add_argument("meter", help="the meter")
    amend.add_argument("--customer", required=True)
    amend.add_argument("--id", required=True, help="the unique id of the event replaced")
    amend.add_argument("--value", required=True, help="the corrected value, exact")
    amend.add_argument("--time", required=True, help="the corrected event time (ISO or ms)")
    amend.add_argument("--dimension", action="append", default=[],
                       help="KEY=VALUE of the corrected event (repeatable)")
    add_connection_options(amend)


def time_ms(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError as exc:
        raise UsageError(f"{option} {text!r}: use ISO 8601 (2025-10-01T00:00:00Z) or ms") from exc


async def run_cancel(args: argparse.Namespace, out: TextIO) -> int:
    if args.customer and args.all_customers:
        raise UsageError("give --customer or --all-customers, not both")
    if args.ids:
        if not args.customer:
            raise UsageError("cancelling by --id needs --customer")
        async with connect(args, "meter cancel") as client:
            count = await client.cancel(args.meter, args.customer, unique_ids=args.ids)
    else:
        start, end = time_ms(args.start, "--from"), time_ms(args.end, "--to")
        if start is None or end is None:
            raise UsageError("give --id, or a range with --from and --to")
        if not args.customer and not args.all_customers:
            raise UsageError("give --customer, or --all-customers for every customer")
        async with connect(args, "meter cancel") as client:
            count = await client.cancel_where(
                args.meter, customer_id=args.customer, start_ms=start, end_ms=end,
                dimensions=filters(args.filter),
                received_start_ms=time_ms(args.received_from, "--received-from"),
                received_end_ms=time_ms(args.received_to, "--received-to"))
    print(f"cancelled {count} event{'s' if count != 1 else ''}", file=out)
    return 0


async def run_amend(args: argparse.Namespace, out: TextIO) -> int:
    ts = time_ms(args.time, "--time")
    assert ts is not None
    event = Event(meter_api_name=args.meter, customer_id=args.customer,
                  meter_value=exact_number(args.value), meter_time_in_millis=ts,
                  dimensions=key_values(args.dimension, "--dimension"), unique_id=args.id)
    async with connect(args, "meter amend") as client:
        ack = await client.amend(args.meter, args.customer, args.id, event)
    print(f"amended {args.id} (lsn {ack.lsn})", file=out)
    return 0
