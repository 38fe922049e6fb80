"""``meter serve``: the TCP server on an embedded engine, with a live status line.

Shell layer. SIGINT and SIGTERM shut down cleanly: stop accepting, let
requests in flight finish and be acknowledged (up to the drain timeout), then
close the engine, which drains the WAL writer and writes a snapshot.
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any, TextIO

import trio

from engine import open_engine
from engine.auth import load_keys
from engine.server import DEFAULT_HOST, DEFAULT_PORT, MeterServer, ServerConfig


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the TCP server")
    serve.add_argument("--data-dir", default="./data", help="data directory (default ./data)")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    serve.add_argument("--shards", type=int, default=8)
    serve.add_argument("--keys", help="API key file (JSON); default $METER_API_KEYS, else no keys")
    serve.add_argument("--allow-insecure-bind", action="store_true",
                       help="listen on a non-loopback address without API keys")
    serve.add_argument("--status", choices=["auto", "on", "off"], default="auto",
                       help="live status line (auto: when stdout is a terminal)")


async def run_serve(args: argparse.Namespace, out: TextIO) -> int:
    keys = load_keys(args.keys)
    config = ServerConfig(host=args.host, port=args.port, keys=keys,
                          allow_insecure_bind=args.allow_insecure_bind)
    async with open_engine(args.data_dir, shards=args.shards) as eng:
        server = MeterServer(eng, config)
        stats = eng.statistics()
        print(f"metering-engine: data in {args.data_dir!r}, {args.shards} shards, recovered "
              f"{stats.series_count:,} series (lsn {stats.last_lsn}) in {stats.recovery_ms} ms",
              file=out, flush=True)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            print(f"listening on {args.host}:{port} "
                  f"({'API keys required' if keys.enabled else 'no API keys configured'})\n"
                  "connect from Python:\n"
                  "    from engine.client import open_client\n"
                  f"    async with open_client({args.host!r}, {port}) as client: ...\n"
                  f"or: meter stats --port {port}    meter ingest events.ndjson --port {port}\n"
                  "Ctrl-C or SIGTERM to stop.", file=out, flush=True)
            live = args.status == "on" or (args.status == "auto" and out.isatty())
            if live:
                nursery.start_soon(_status_line, server, out)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    print(f"\n{signal.Signals(signum).name}: shutting down (in-flight requests "
                          "finish first)", file=out, flush=True)
                    break
            server.shutdown()
        print("stopped accepting; closing the engine (writing a snapshot)", file=out, flush=True)
    print("stopped cleanly", file=out, flush=True)
    return 0


async def _status_line(server: MeterServer, out: TextIO) -> None:
    last_events, last_time = server.stats.events_ingested, time.perf_counter()
    while True:
        await trio.sleep(1)
        now = time.perf_counter()
        events = server.stats.events_ingested
        rate = (events - last_events) / (now - last_time)
        last_events, last_time = events, now
        stats = server.engine.statistics()
        out.write(f"\r{rate:>10,.0f} events/s  {server.stats.connections:>5} connections  "
                  f"{stats.series_count:>10,} series  {stats.bucket_count:>12,} buckets  "
                  f"lsn {stats.last_lsn}   ")
        out.flush()
