"""``meter customers add|list|show``: the customer registry from the shell.

Shell layer: argparse, the terminal and ``engine.client`` (through ``engine.cli_common``).
A customer known only by its usage (no name yet) is listed too; ``add`` fills it in.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import msgspec

from engine.cli_common import (
    add_command,
    add_connection_options,
    add_group,
    connect,
    key_values,
    print_list,
    print_one,
    utc_iso,
)
from engine.schema import Customer


def add_parsers(commands: Any) -> None:
    customers = add_group(commands, "customers", help="add, list and show customers",
                          example="meter customers add acme --name 'Acme Corp' --trait plan=pro\n"
                                  "meter customers show acme")
    add = add_command(
        customers, "add", run=run_add,
        help="add a customer (or name one known by its usage, or reinstate a deleted one)",
        example="meter customers add acme --name 'Acme Corp' --email billing@acme.example "
                "--trait plan=pro --trait region=eu")
    add.add_argument("id", help="the customer id its events carry (customerId)")
    add.add_argument("--name", help="display name")
    add.add_argument("--email")
    add.add_argument("--trait", action="append", default=[], metavar="KEY=VALUE",
                     help="a label such as plan=pro (repeatable)")
    add.add_argument("--disabled", action="store_true", help="store it as disabled")
    add.add_argument("--json", action="store_true", help="print the stored customer as JSON")
    add_connection_options(add)

    listing = add_command(customers, "list", help="every customer, by id", run=run_list,
                          example="meter customers list --json")
    listing.add_argument("--json", action="store_true", help="one JSON array of the customers")
    add_connection_options(listing)

    show = add_command(customers, "show", help="one customer's record", run=run_show,
                       example="meter customers show acme")
    show.add_argument("id", help="the customer id")
    show.add_argument("--json", action="store_true", help="print the customer as JSON")
    add_connection_options(show)


def summary(customer: Customer) -> str:
    name = customer.name if customer.name is not None else "(known by usage only)"
    traits = " ".join(f"{key}={value}" for key, value in sorted(customer.traits.items()))
    disabled = "" if customer.enabled else "  disabled"
    return f"{customer.id}  {name}{'  ' + traits if traits else ''}{disabled}"


def _details(customer: Customer) -> list[tuple[str, str]]:
    rows = [("id", customer.id), ("name", customer.name or ""), ("email", customer.email or ""),
            ("enabled", "yes" if customer.enabled else "no")]
    rows += [(f"trait {key}", value) for key, value in sorted(customer.traits.items())]
    rows += [(f"extra {key}", msgspec.json.encode(value).decode())
             for key, value in sorted(customer.extra.items())]
    for label, ms in (("created", customer.created_ms), ("updated", customer.updated_ms)):
        if ms:
            rows.append((label, utc_iso(ms)))
    return rows


async def run_add(args: argparse.Namespace, out: TextIO) -> int:
    customer = Customer(id=args.id, name=args.name, email=args.email,
                        traits=key_values(args.trait, "--trait"), enabled=not args.disabled)
    async with connect(args, "meter customers add") as client:
        stored = await client.add_customer(customer)
    return print_one(args, out, stored, f"added {summary(stored)}")


async def run_list(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(args, "meter customers list") as client:
        customers = await client.list_customers()
    return print_list(args, out, customers, summary, "customers")


async def run_show(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(args, "meter customers show") as client:
        customer = await client.get_customer(args.id)
    if customer is None:
        print(f"meter customers show: there is no customer {args.id!r}", file=sys.stderr)
        return 1
    if args.json:
        out.write(msgspec.json.encode(customer).decode() + "\n")
        return 0
    rows = _details(customer)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}", file=out)
    return 0
