"""``meter meters define`` and ``meter meters list``: the meter catalogue from the shell.

Shell layer: argparse, the terminal and ``engine.client`` (through ``engine.cli_common``).
Defining is idempotent, as ``define_meter`` is: the same definition again succeeds and
prints the stored one; another aggregation for a known name fails (``meter_conflict``).
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from engine.cli_common import (
    add_command,
    add_connection_options,
    add_group,
    connect,
    print_list,
    print_one,
)
from engine.schema import Meter

AGGREGATIONS = ["sum", "count", "max", "min", "avg", "latest", "unique_count"]


def add_parsers(commands: Any) -> None:
    meters = add_group(commands, "meters", help="define and list meters",
                       example="meter meters define api_calls --aggregation count\n"
                               "meter meters list")
    define = add_command(
        meters, "define", help="define a meter (idempotent)", run=run_define,
        example="meter meters define active_users --aggregation unique_count "
                "--unique-dimension user_id")
    define.add_argument("name", help="the meter's name, which events carry as meterApiName")
    define.add_argument("--aggregation", required=True, choices=AGGREGATIONS)
    define.add_argument("--unique-dimension", metavar="D",
                        help="for unique_count (required there): the dimension whose "
                             "distinct values are counted")
    define.add_argument("--description", default="", help="free text")
    define.add_argument("--json", action="store_true", help="print the stored meter as JSON")
    add_connection_options(define)

    listing = add_command(meters, "list", help="every defined meter", run=run_list,
                          example="meter meters list --json")
    listing.add_argument("--json", action="store_true", help="one JSON array of the meters")
    add_connection_options(listing)


def describe(meter: Meter) -> str:
    unique = f" of {meter.unique_dimension}" if meter.unique_dimension else ""
    description = f"  ({meter.description})" if meter.description else ""
    return f"{meter.name}: {meter.aggregation}{unique}{description}"


async def run_define(args: argparse.Namespace, out: TextIO) -> int:
    meter = Meter(name=args.name, aggregation=args.aggregation,
                  unique_dimension=args.unique_dimension, description=args.description)
    async with connect(args, "meter meters define") as client:
        stored = await client.define_meter(meter)
    return print_one(args, out, stored, f"defined {describe(stored)}")


async def run_list(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(args, "meter meters list") as client:
        meters = await client.list_meters()
    return print_list(args, out, meters, describe, "meters")
