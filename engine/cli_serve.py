"""``meter serve``: the TCP server (and, with ``--http-port``, the HTTP server) on an
embedded engine, with a live status line.

Shell layer. The HTTP listener binds before recovery (``/healthz`` answers, every
other route 503 until the engine is open), the TCP listener after it. Both share
one server-wide budget of request bytes. With ``--tls-cert``/``--tls-key`` both
ports speak TLS (the files are loaded before anything binds, so a bad file stops
the start with its error). SIGINT and SIGTERM shut down cleanly:
stop accepting, let requests in flight finish and be acknowledged (up to the
drain timeout), then close the engine, which drains the WAL writer and writes a
snapshot.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import trio

from engine import open_engine
from engine.auth import load_keys
from engine.budget import ByteBudget
from engine.cli_common import add_command, env_port
from engine.domain.limits import LimitError, check_webhook_url
from engine.http import HttpConfig, HttpServer
from engine.http.webhooks import DEFAULT_RETRY_FOR_S, WebhookDispatcher, WebhookSettings
from engine.server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MeterServer,
    ServerConfig,
    check_bind,
    server_ssl_context,
)

log = logging.getLogger(__name__)
DEFAULTS = ServerConfig()
# Descriptors the process needs besides client sockets: listeners, LMDB, stdio, signals.
SPARE_DESCRIPTORS = 64


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def add_parsers(commands: Any) -> None:
    serve = add_command(commands, "serve", help="run the TCP server (and the HTTP server)",
                        run=run_serve,
                        example="meter serve --data-dir ./data --http-port 7434")
    serve.add_argument("--data-dir", default="./data", help="data directory (default ./data)")
    serve.add_argument("--host", default=os.environ.get("METER_HOST") or DEFAULT_HOST,
                       help=f"default $METER_HOST, else {DEFAULT_HOST}")
    serve.add_argument("--port", type=int, default=None,
                       help=f"TCP port, default $METER_PORT, else {DEFAULT_PORT} (0: a free "
                            "port, printed)")
    serve.add_argument("--http-port", type=int, default=None, metavar="PORT",
                       help="also serve HTTP (docs/http.md) on --host:PORT; 0 picks a free "
                            "port (default: no HTTP)")
    serve.add_argument("--shards", type=int, default=8)
    serve.add_argument("--keys", help="API key file (JSON); default $METER_API_KEYS, else no keys")
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="serve both ports over TLS with this PEM certificate chain "
                            "(needs --tls-key); clients connect with TLS (docs/protocol.md)")
    serve.add_argument("--tls-key", metavar="FILE",
                       help="the PEM private key of --tls-cert")
    serve.add_argument("--allow-insecure-bind", action="store_true",
                       help="listen on a non-loopback address without API keys or without "
                            "TLS (keys and data then cross the network in clear)")
    serve.add_argument("--status", choices=["auto", "on", "off"], default="auto",
                       help="live status line (auto: when stdout is a terminal)")
    _add_webhook_arguments(serve)
    limits = serve.add_argument_group("connection limits and timeouts (docs/protocol.md §12)")
    limits.add_argument("--max-connections", type=_positive_int, metavar="N",
                        default=DEFAULTS.max_connections,
                        help="beyond this, new connections get `busy` (default %(default)s)")
    limits.add_argument("--max-in-flight", type=_positive_int, metavar="N",
                        default=DEFAULTS.max_in_flight,
                        help="requests per connection run concurrently (default %(default)s)")
    limits.add_argument("--max-request-bytes", type=_positive_int, metavar="BYTES",
                        default=DEFAULTS.max_request_bytes_in_flight,
                        help="server-wide memory for requests read but not answered (4x "
                             "their wire size) and replies not yet sent; beyond it reading "
                             "waits (default %(default)s)")
    limits.add_argument("--handshake-timeout", type=_positive_seconds, metavar="SECONDS",
                        default=DEFAULTS.handshake_timeout_s,
                        help="the hello must arrive within this (default %(default)s)")
    limits.add_argument("--frame-timeout", type=_positive_seconds, metavar="SECONDS",
                        default=DEFAULTS.frame_timeout_s,
                        help="a started frame must complete within this (default %(default)s)")
    limits.add_argument("--idle-timeout", type=_positive_seconds, metavar="SECONDS",
                        default=DEFAULTS.idle_timeout_s,
                        help="close a connection silent this long with nothing in flight "
                             "(default %(default)s)")
    limits.add_argument("--send-timeout", type=_positive_seconds, metavar="SECONDS",
                        default=DEFAULTS.send_timeout_s,
                        help="disconnect a client that reads nothing for this long "
                             "(default %(default)s)")
    limits.add_argument("--drain-timeout", type=_positive_seconds, metavar="SECONDS",
                        default=DEFAULTS.drain_timeout_s,
                        help="on shutdown, how long requests in flight may take "
                             "(default %(default)s)")


def raise_open_files_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE so that ``max_connections`` sockets fit (up to the hard
    limit); returns the soft limit in force. Beyond it ``accept`` fails with EMFILE, which
    the server survives (it retries) but which stalls every new connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        soft = new_soft
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open-files limit %d is below the %d that %d connections need",
                    soft, wanted, max_connections)
    return soft


async def run_serve(args: argparse.Namespace, out: TextIO) -> int:
    if args.port is None:
        args.port = env_port()
    keys = load_keys(args.keys)
    if (args.tls_cert is None) != (args.tls_key is None):
        print("meter serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls = args.tls_cert is not None
    # Refuse an insecure bind before loading anything or binding either port.
    check_bind(args.host, keys_enabled=keys.enabled, tls=tls,
               allow_insecure_bind=args.allow_insecure_bind)
    ssl_context = server_ssl_context(args.tls_cert, args.tls_key) if tls else None
    config = ServerConfig(host=args.host, port=args.port, keys=keys,
                          allow_insecure_bind=args.allow_insecure_bind,
                          ssl_context=ssl_context,
                          max_connections=args.max_connections,
                          max_in_flight=args.max_in_flight,
                          max_request_bytes_in_flight=args.max_request_bytes,
                          handshake_timeout_s=args.handshake_timeout,
                          frame_timeout_s=args.frame_timeout,
                          idle_timeout_s=args.idle_timeout,
                          send_timeout_s=args.send_timeout,
                          drain_timeout_s=args.drain_timeout)
    raise_open_files_limit(config.max_connections)
    try:
        args.webhooks = webhook_settings(args)
    except ValueError as exc:
        print(f"meter serve: {exc}", file=sys.stderr)
        return 2
    budget = ByteBudget(config.max_request_bytes_in_flight)
    async with trio.open_nursery() as http_nursery:
        http: HttpServer | None = None
        if args.http_port is not None:
            http = HttpServer(None, HttpConfig(
                host=args.host, port=args.http_port, keys=keys,
                allow_insecure_bind=args.allow_insecure_bind, request_budget=budget,
                tls_cert_file=args.tls_cert, tls_key_file=args.tls_key,
                tls_handshake_timeout_s=args.handshake_timeout,
                drain_timeout_s=args.drain_timeout))
            await http_nursery.start(http.serve)
            print(f"HTTP listening on {_http_url(args, http.port)} (recovering)",
                  file=out, flush=True)
        try:
            await _serve_engine(args, config, budget, http, out)
        finally:
            if http is not None:
                http.shutdown()
    print("stopped cleanly", file=out, flush=True)
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _http_url(args: argparse.Namespace, port: int | None) -> str:
    scheme = "https" if args.tls_cert is not None else "http"
    return f"{scheme}://{_url_host(args.host)}:{port}/"


async def _serve_engine(args: argparse.Namespace, config: ServerConfig, budget: ByteBudget,
                        http: HttpServer | None, out: TextIO) -> None:
    keys = config.keys
    async with open_engine(args.data_dir, shards=args.shards) as eng:
        server = MeterServer(eng, config, request_budget=budget)
        stats = eng.statistics()
        print(f"metering-engine: data in {args.data_dir!r}, {args.shards} shards, recovered "
              f"{stats.series_count:,} series (lsn {stats.last_lsn}) in {stats.recovery_ms} ms",
              file=out, flush=True)
        first_alert_seq = eng.next_alert_seq()  # before anyone can raise one
        if http is not None:
            http.attach(eng)
            http.attach_tcp(server)
            url = _http_url(args, http.port)
            print(f"HTTP ready on {url} (for example: curl {url}meters)", file=out, flush=True)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            # The first line's "listening on HOST:PORT" is what launchers parse.
            tls = config.ssl_context is not None
            auth = "API keys required" if keys.enabled else "no API keys configured"
            tls_argument = ", ssl_context=ssl.create_default_context(cafile=CA)" if tls else ""
            tls_flag = " --tls-ca CA" if tls else ""
            print(f"listening on {args.host}:{port} ({'TLS, ' if tls else ''}{auth})\n"
                  "connect from Python:\n"
                  "    from engine.client import open_client\n"
                  f"    async with open_client({args.host!r}, {port}{tls_argument}) as client:"
                  " ...\n"
                  f"or: meter stats --port {port}{tls_flag}    "
                  f"meter ingest events.ndjson --port {port}{tls_flag}\n"
                  "Ctrl-C or SIGTERM to stop.", file=out, flush=True)
            dispatcher = None
            if args.webhooks is not None:
                dispatcher = WebhookDispatcher(eng, args.webhooks, start_seq=first_alert_seq)
                await nursery.start(dispatcher.run)
                if http is not None:
                    http.attach_webhooks(dispatcher)
            live = args.status == "on" or (args.status == "auto" and out.isatty())
            if live:
                nursery.start_soon(_status_line, server, out)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    print(f"\n{signal.Signals(signum).name}: shutting down (in-flight requests "
                          "finish first)", file=out, flush=True)
                    break
            server.shutdown()
            if http is not None:
                http.shutdown()
            if dispatcher is not None:
                dispatcher.shutdown()
        print("stopped accepting; closing the engine (writing a snapshot)", file=out, flush=True)


async def _status_line(server: MeterServer, out: TextIO) -> None:
    last_events, last_time = server.statistics().events_ingested, time.perf_counter()
    while True:
        await trio.sleep(1)
        now = time.perf_counter()
        served = server.statistics()
        events = served.events_ingested
        rate = (events - last_events) / (now - last_time)
        last_events, last_time = events, now
        stats = server.engine.statistics()
        out.write(f"\r{rate:>10,.0f} events/s  {served.connections:>5} connections  "
                  f"{stats.series_count:>10,} series  {stats.bucket_count:>12,} buckets  "
                  f"lsn {stats.last_lsn}   ")
        out.flush()


# ------------------------------------------------------------------- webhooks


def _add_webhook_arguments(serve: Any) -> None:
    hooks = serve.add_argument_group("alert webhooks (docs/http.md, Webhooks)")
    hooks.add_argument("--webhook-url", metavar="URL",
                       help="POST every alert here too (each limit's webhookUrl gets its own)")
    hooks.add_argument("--webhook-secret-file", metavar="FILE",
                       help="the secret alerts are signed with (default "
                            "$METER_WEBHOOK_SECRET); webhooks are delivered only with one")
    hooks.add_argument("--webhook-retry-hours", type=_positive_seconds, metavar="HOURS",
                       default=DEFAULT_RETRY_FOR_S / 3600,
                       help="retry a failing delivery this long, then park it "
                            "(default %(default)s)")


def webhook_settings(args: argparse.Namespace) -> WebhookSettings | None:
    """The dispatcher's settings, or None without a secret; ``ValueError`` if unusable."""
    secret = os.environ.get("METER_WEBHOOK_SECRET", "").encode()
    if args.webhook_secret_file is not None:
        try:
            secret = Path(args.webhook_secret_file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --webhook-secret-file: {exc}") from None
        if not secret:
            raise ValueError(f"--webhook-secret-file {args.webhook_secret_file!r} is empty")
    if not secret:
        if args.webhook_url is not None:
            raise ValueError("--webhook-url needs a secret to sign with: "
                             "--webhook-secret-file or $METER_WEBHOOK_SECRET")
        return None
    if args.webhook_url is not None:
        try:
            check_webhook_url(args.webhook_url)
        except LimitError as exc:
            raise ValueError(f"--webhook-url: {exc}") from None
    return WebhookSettings(secret=secret, default_url=args.webhook_url,
                           retry_for_s=args.webhook_retry_hours * 3600,
                           state_path=Path(args.data_dir) / "webhooks.json")
