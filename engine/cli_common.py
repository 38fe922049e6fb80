"""What every ``meter`` subcommand shares: how it is registered, how it connects, how it
parses the small ``KEY=VALUE`` arguments.

Shell layer: argparse, the environment and ``engine.client``.

A command module has one function, ``add_parsers(commands)``, which adds its
subcommands with ``add_command`` and gives each a ``run`` coroutine
(``run(args, out) -> exit code``); ``engine.cli.COMMAND_MODULES`` lists the modules,
so a new module is one line there. Every command's ``--help`` ends with an example.

Connection defaults come from the environment: ``$METER_HOST``, ``$METER_PORT`` and
``$METER_API_KEY`` (the key goes in the protocol's ``hello``, docs/protocol.md §5).
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

import msgspec

from engine.client import Client, open_client
from engine.server import DEFAULT_HOST, DEFAULT_PORT

Run = Callable[[argparse.Namespace, TextIO], Awaitable[int]]


class UsageError(ValueError):
    """An argument the command cannot use; reported in one line, exit status 2."""


def add_command(commands: Any, name: str, *, help: str, example: str, run: Run,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with ``example`` (one or more command lines)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=description or help,
        epilog="example:\n" + "\n".join(f"  {line}" for line in example.splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run=run)
    return parser


def add_group(commands: Any, name: str, *, help: str, example: str) -> Any:
    """A command with subcommands of its own (``meter meters define``); returns the
    subparsers to ``add_command`` them to."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=help,
        epilog="example:\n" + "\n".join(f"  {line}" for line in example.splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.add_subparsers(dest=f"{name}_command", required=True,
                                 metavar="{" + name + " command}")


def env_port() -> int:
    """``$METER_PORT``, else the default port."""
    text = os.environ.get("METER_PORT")
    if not text:
        return DEFAULT_PORT
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"$METER_PORT must be a port number, got {text!r}") from None


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=os.environ.get("METER_HOST") or DEFAULT_HOST,
                        help=f"server address (default $METER_HOST, else {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None,
                        help=f"TCP port (default $METER_PORT, else {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=os.environ.get("METER_API_KEY"),
                        help="API key (default $METER_API_KEY)")
    parser.add_argument("--tls", action="store_true",
                        help="connect over TLS, trusting the system's certificate authorities")
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="connect over TLS, trusting the CA certificates in this PEM file")


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context ``--tls``/``--tls-ca`` ask for, else ``None`` (plain TCP)."""
    if args.tls_ca is not None:
        return ssl.create_default_context(cafile=args.tls_ca)
    return ssl.create_default_context() if args.tls else None


@asynccontextmanager
async def connect(args: argparse.Namespace, client_name: str) -> AsyncIterator[Client]:
    """A client to the server ``args`` name (host, port, key, TLS)."""
    port = args.port if args.port is not None else env_port()
    async with open_client(args.host, port, args.api_key, ssl_context=ssl_context(args),
                           client_name=client_name) as client:
        yield client


def key_values(items: list[str], option: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict."""
    found: dict[str, str] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not key or not equals:
            raise UsageError(f"{option} {item!r}: use KEY=VALUE")
        found[key] = value
    return found


def filters(items: list[str], option: str = "--filter") -> dict[str, list[str]]:
    """``KEY=V1,V2`` arguments (repeatable) as a query or limit filter."""
    found: dict[str, list[str]] = {}
    for item in items:
        key, _, values = item.partition("=")
        if not key or not values:
            raise UsageError(f"{option} {item!r}: use KEY=V1,V2")
        found.setdefault(key, []).extend(values.split(","))
    return found


def exact_number(text: str) -> int | Decimal:
    """A threshold or value as typed: an int, else an exact decimal (the engine refuses
    what is out of range or not finite)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return Decimal(text)
    except InvalidOperation:
        raise UsageError(f"{text!r} is not a number") from None


def utc_iso(ms: int) -> str:
    """An epoch-milliseconds time in ISO 8601, UTC, to the second."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def print_one(args: argparse.Namespace, out: TextIO, item: Any, line: str) -> int:
    """``item`` as JSON with ``--json``, else ``line``; exit status 0."""
    if args.json:
        out.write(msgspec.json.encode(item).decode() + "\n")
    else:
        print(line, file=out)
    return 0


def print_list(args: argparse.Namespace, out: TextIO, items: Sequence[Any],
               describe: Callable[[Any], str], noun: str) -> int:
    """``items`` as one JSON array with ``--json``, else a line each and their count."""
    if args.json:
        out.write(msgspec.json.encode(items).decode() + "\n")
        return 0
    for item in items:
        print(describe(item), file=out)
    print(f"({len(items)} {noun})", file=out)
    return 0
