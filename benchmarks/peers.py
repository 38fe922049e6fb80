"""The engine beside its peers on one workload: Redis, PostgreSQL, DuckDB, SQLite.

Benchmark script (not collected by pytest; ``tests/test_peers_smoke.py`` runs
its pure parts with SQLite and DuckDB, which need no server). It installs and
starts the servers it needs itself (``benchmarks/services.py``: ``apt-get
install`` when missing, private processes on free loopback ports, stopped
afterwards, also on error and Ctrl-C).

    python benchmarks/peers.py --quick            # ~1 minute: 100k events, 10k customers
    python benchmarks/peers.py                    # 1M events, 100k customers, a few minutes
    python benchmarks/peers.py --peers sqlite,duckdb --json out.json

The workload is ``benchmarks/workload.py`` with **sum meters only** (4 meters
carrying 0 to 3 of the dimensions region, plan, endpoint; Zipf customers; ~1%
exact retries with the same unique id; ~5% late events), generated once and
fed to every system in the same batches. Every system is sent one batch at a
time by one client (``--writers N`` gives the engine N batches in flight on
its connection and PostgreSQL N connections), and each batch is durable in
that system's own sense (below) before the next is sent.

Systems and how each is set up:

- ``engine``: ``python -m engine serve`` subprocess (``benchmarks/serve.py``'s
  ``ServerProcess``), LMDB write-ahead log fsynced per group commit, over TCP
  with ``engine.client``. Dedup: by (meter, customer, unique id), exact, forever.
  Its answers are the reference every peer is checked against. Most of the load
  is older than the hot window, so it arrives as late events; after the load the
  engine is left idle until its background compaction has merged them into
  blocks and written them (``stats``: ``delta_buckets`` and ``blocks_unwritten``
  0), timed as ``prepare_s`` like the peers' ANALYZE (``--no-engine-settle``:
  query at once).
- ``sqlite``: file database, ``journal_mode=WAL``, ``synchronous=FULL`` (the WAL
  is fsynced at every commit, as the engine's is), one transaction per batch,
  ``INSERT OR IGNORE`` into a ``WITHOUT ROWID`` table keyed by (meter,
  customer, unique id): the key is the dedup. Queries: GROUP BY over events.
- ``duckdb``: file database, one transaction per batch (DuckDB writes and syncs
  its WAL at commit), ``INSERT OR IGNORE`` from column arrays into a table
  with PRIMARY KEY (meter, customer, unique id). Queries: GROUP BY over events.
- ``postgres_copy``: private PostgreSQL cluster, ``fsync=on``,
  ``synchronous_commit=on``; per batch one transaction: COPY into a temporary
  staging table, then ``INSERT INTO events SELECT ... ON CONFLICT DO NOTHING``
  (PRIMARY KEY (meter, customer, unique id) is the dedup). ANALYZE after the
  load (timed separately as ``prepare_s``). Queries: GROUP BY over events.
- ``postgres_rollup``: same cluster settings; per batch one transaction: COPY
  into staging, insert the unique ids into a ``seen`` table ``ON CONFLICT DO
  NOTHING RETURNING`` (the dedup), and upsert only those events into a daily
  rollup ``INSERT ... ON CONFLICT DO UPDATE SET value = value + excluded.value``
  keyed by (meter, customer, UTC day, region, plan, endpoint), batched per
  bucket with GROUP BY. Queries: GROUP BY over the rollup.
- ``redis``: private ``redis-server``, append-only file with ``appendfsync
  everysec`` (up to a second of acknowledged writes can be lost on a crash:
  weaker than the others). One Lua script per event, pipelined per batch:
  ``SADD`` the unique id to a per-(meter, customer) set (the dedup) and only
  when new, ``HINCRBY`` the (meter, customer) hash field of the UTC day,
  ``ZINCRBY`` the customer in the (meter, day) sorted set, and ``HINCRBY`` one
  field per dimension value in the (meter, day) hash: exactly the rollups the
  three queries need. Queries: HGETALL; ZUNIONSTORE + ZREVRANGE (ties broken
  client side like the engine); pipelined HGETALL per day.

Work measured, per system: ingest events/s (wall time from the first batch
sent to the last committed) and per-batch latency; then query latency p50/p99
(client side, one query at a time) of three query kinds over the last 31 UTC
days (``start_ms`` .. ``end_ms``, day-aligned):

- ``customer_month``: one customer, one meter, by UTC day;
- ``top_customers``: the top 100 customers of one meter over the range (ties by
  customer id, as the engine breaks them);
- ``by_dimension``: one meter grouped by one dimension, by UTC day.

Customers are picked by activity (a random event's customer), meters and
dimensions cycle. Each kind runs up to ``--queries`` queries or until
``--query-budget-s`` is spent (after a checked, untimed warm-up query); peers
run exactly the queries the engine ran. **Every answer of every peer is
compared with the engine's, exactly (integers)**; one mismatch and the peer is
reported FAILED with the first difference, not with times. A peer that cannot
be installed, started or imported is reported SKIPPED with the reason.
``--repeats N`` runs every system N times, each on a fresh store (repeats of the
engine run the first run's queries and must give the same answers), and
reports medians; the default is one run, to keep the full size within minutes.

``run(args) -> dict`` (``args`` from ``parse_args(argv)``; another script can
call ``run(parse_args(["--quick"]))`` or ``run_peers(["--quick"], json=None)``,
which takes the same options as keywords) returns::

    {
      "benchmark": "peers",
      "machine": {...machine_facts(), "duckdb": ..., "redis_py": ..., "psycopg": ...,
                  "sqlite": ...},
      "parameters": {"events", "customers", "meters", "aggregation": "sum", "batch_size",
                     "seed", "writers", "shards", "repeats", "queries", "query_budget_s",
                     "top_n", "start_ms", "end_ms", "range", "duplicates", "accepted",
                     "peers": [...]},
      "systems": {                     # in run order; "engine" first
        "<name>": {
          "status": "ok" | "failed" | "skipped",
          "reason": str | None,        # why failed / skipped
          "config": {...},             # durability and dedup settings, server version
          "ingest": {"events_per_s", "elapsed_s", "batch_p50_ms", "batch_p99_ms",
                     "accepted", "prepare_s"} | None,      # medians over the repeats
          "queries": {"customer_month" | "top_customers" | "by_dimension":
                      {"count", "p50_ms", "p99_ms", "checked_equal": true}} | None,
          "engine_speedup": {          # > 1: the engine is faster; absent for the engine
            "ingest": engine events/s / peer events/s,
            "<kind>_p50": peer p50 / engine p50, "<kind>_p99": peer p99 / engine p99},
          "runs": [{"ingest": {...}, "queries": {...}}, ...]   # one per repeat
        }
      }
    }

Figures of ``failed`` and ``skipped`` systems are ``None``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks.common import BenchmarkFailure, machine_facts, percentile
from benchmarks.services import PostgresServer, RedisServer, ServiceUnavailable
from benchmarks.workload import DAY_MS, DIMENSION_SETS, Workload, generate
from engine import Event, Query, Take
from engine.client import open_client

KINDS = ("customer_month", "top_customers", "by_dimension")
PEERS = ("sqlite", "duckdb", "postgres_copy", "postgres_rollup", "redis")
TOP_N = 100
RANGE_DAYS = 31
DIM_KEYS: tuple[str, ...] = tuple(sorted({key for keys in DIMENSION_SETS for key in keys}))
QUICK = {"events": 100_000, "customers": 10_000, "queries": 50, "query_budget_s": 3.0}
FULL = {"events": 1_000_000, "customers": 100_000, "queries": 100, "query_budget_s": 5.0}

Answer = list[tuple[int, tuple[str | None, ...], int | Decimal]]


class AnswerMismatch(BenchmarkFailure):
    """A peer's answer differs from the engine's."""


# ------------------------------------------------------------------ arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The engine beside Redis, PostgreSQL, DuckDB and SQLite on one workload.")
    parser.add_argument("--quick", action="store_true",
                        help="100k events, 10k customers, short query budgets (~1 minute)")
    parser.add_argument("--events", type=int, help="events (full: 1M, quick: 100k)")
    parser.add_argument("--customers", type=int, help="customers (full: 100k, quick: 10k)")
    parser.add_argument("--meters", type=int, default=4, help="sum meters (default 4)")
    parser.add_argument("--batch-size", type=int, default=1000, dest="batch_size")
    parser.add_argument("--seed", type=int, default=20250615)
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma list of peers to run beside the engine (default all: "
                             f"{','.join(PEERS)})")
    parser.add_argument("--writers", type=int, default=1,
                        help="engine batches in flight / PostgreSQL connections (default 1)")
    parser.add_argument("--shards", type=int, default=8, help="engine shards (default 8)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every system, each on a fresh store; medians (default 1)")
    parser.add_argument("--queries", type=int, help="queries per kind at most (full: 100)")
    parser.add_argument("--query-budget-s", type=float, dest="query_budget_s",
                        help="time per query kind and system at most (full: 5 s)")
    parser.add_argument("--timeout-s", type=float, default=900.0, dest="timeout_s",
                        help="time budget of one system's ingest (default 900 s)")
    parser.add_argument("--no-engine-settle", action="store_false", dest="engine_settle",
                        help="query the engine right after the load, not once its "
                             "background compaction has settled")
    parser.add_argument("--no-install", action="store_false", dest="install",
                        help="do not apt-get install missing servers (skip those peers)")
    parser.add_argument("--tmpdir", help="where the SQLite and DuckDB files go")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON results here")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {','.join(PEERS)}")
    if min(args.events, args.customers, args.meters, args.batch_size, args.writers,
           args.queries, args.repeats) < 1:
        parser.error("--events, --customers, --meters, --batch-size, --writers, --queries "
                     "and --repeats must be positive")
    return args


# --------------------------------------------------------------------- queries


@dataclass(frozen=True)
class QuerySpec:
    kind: str
    meter: str
    start_ms: int
    end_ms: int
    customer: str | None = None
    dimension: str | None = None

    def to_query(self) -> Query:
        if self.kind == "customer_month":
            assert self.customer is not None
            return Query(meter_api_name=self.meter, start_ms=self.start_ms, end_ms=self.end_ms,
                         window="day", timezone="UTC", filter={"customer_id": [self.customer]})
        if self.kind == "top_customers":
            return Query(meter_api_name=self.meter, start_ms=self.start_ms, end_ms=self.end_ms,
                         group_by=["customer_id"], take=Take(limit=TOP_N))
        assert self.kind == "by_dimension" and self.dimension is not None
        return Query(meter_api_name=self.meter, start_ms=self.start_ms, end_ms=self.end_ms,
                     window="day", timezone="UTC", group_by=[self.dimension])


def query_range(now_ms: int) -> tuple[int, int]:
    """The last ``RANGE_DAYS`` UTC days, today included: day-aligned ``[start, end)``."""
    end_ms = now_ms - now_ms % DAY_MS + DAY_MS
    return end_ms - RANGE_DAYS * DAY_MS, end_ms


def query_specs(workload: Workload, count: int, seed: int) -> dict[str, list[QuerySpec]]:
    """``count`` queries of each kind, a pure function of the workload and the seed."""
    rng = random.Random(seed)
    start_ms, end_ms = query_range(workload.now_ms)
    meters = [m.name for m in workload.meters]
    dims_of: dict[str, set[str]] = {name: set() for name in meters}
    for batch in workload.batches:
        for event in batch:
            dims_of[event.meter_api_name].update(event.dimensions)
    pairs = [(meter, key) for meter in meters for key in sorted(dims_of[meter])]
    specs: dict[str, list[QuerySpec]] = {kind: [] for kind in KINDS}
    for index in range(count):
        batch = workload.batches[rng.randrange(len(workload.batches))]
        event = batch[rng.randrange(len(batch))]
        specs["customer_month"].append(QuerySpec("customer_month", event.meter_api_name,
                                                 start_ms, end_ms, customer=event.customer_id))
        specs["top_customers"].append(QuerySpec("top_customers", meters[index % len(meters)],
                                                start_ms, end_ms))
        if pairs:
            meter, key = pairs[index % len(pairs)]
            specs["by_dimension"].append(QuerySpec("by_dimension", meter, start_ms, end_ms,
                                                   dimension=key))
    return specs


def exact(value: Any) -> int | Decimal:
    """An exact number: ints stay ints, integral decimals become ints."""
    if isinstance(value, bool):
        raise TypeError(f"boolean value {value!r}")
    if isinstance(value, int):
        return value
    number = value if isinstance(value, Decimal) else Decimal(str(value))
    return int(number) if number == number.to_integral_value() else number


def engine_answer(spec: QuerySpec, rows: Sequence[Any]) -> Answer:
    """The engine's rows (``Row`` objects) in the comparable form every peer produces."""
    keys = spec.to_query().group_by
    return [(row.window_start_ms, tuple(row.group.get(k) for k in keys), exact(row.value))
            for row in rows]


def compare(name: str, spec: QuerySpec, expected: Answer, actual: Answer) -> None:
    if actual == expected:
        return
    position = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False))
                     if a != b), min(len(expected), len(actual)))
    want = expected[position] if position < len(expected) else "(no row)"
    got = actual[position] if position < len(actual) else "(no row)"
    raise AnswerMismatch(
        f"{name}: answer differs from the engine's for {spec}: {len(actual)} rows, expected "
        f"{len(expected)}; first difference at row {position}: got {got}, expected {want}")


def timed_queries(name: str, specs: dict[str, list[QuerySpec]],
                  answer: Callable[[QuerySpec], Answer],
                  reference: dict[str, list[Answer]] | None,
                  budget_s: float) -> tuple[dict[str, list[Answer]], dict[str, Any]]:
    """Run each kind's queries (bounded by count and ``budget_s``); check against ``reference``.

    With a reference, only the queries the reference answered run. Returns the
    answers and the per-kind figures.
    """
    answers: dict[str, list[Answer]] = {}
    figures: dict[str, Any] = {}
    for kind in KINDS:
        todo = specs[kind] if reference is None else specs[kind][: len(reference[kind])]
        answers[kind] = []
        if not todo:
            continue
        warm = answer(todo[0])  # untimed warm-up, checked all the same
        if reference is not None:
            compare(name, todo[0], reference[kind][0], warm)
        latencies: list[float] = []
        started = time.perf_counter()
        for index, spec in enumerate(todo):
            sent = time.perf_counter()
            result = answer(spec)
            latencies.append(time.perf_counter() - sent)
            if reference is not None:
                compare(name, spec, reference[kind][index], result)
            answers[kind].append(result)
            if reference is None and time.perf_counter() - started > budget_s and index >= 2:
                break
        latencies.sort()
        figures[kind] = {"count": len(latencies),
                         "p50_ms": 1000 * percentile(latencies, 0.5),
                         "p99_ms": 1000 * percentile(latencies, 0.99),
                         "checked_equal": reference is not None}
    return answers, figures


# ---------------------------------------------------------------------- engine


def run_engine(workload: Workload, specs: dict[str, list[QuerySpec]],
               args: argparse.Namespace, counts: dict[str, int] | None = None,
               ) -> tuple[dict[str, Any], dict[str, list[Answer]]]:
    """One engine run: a fresh ``meter serve``, the load, then the queries.

    ``counts`` (queries per kind) replaces the time budget, so that repeats
    run the same queries as the first run.
    """
    from benchmarks.serve import ServerProcess
    from benchmarks.tcp_ingest import send_workload

    server = ServerProcess(args.shards)
    try:
        loaded = trio.run(send_workload, server.port, workload, 1, args.writers, args.timeout_s)
        prepared = time.perf_counter()
        if args.engine_settle:
            trio.run(_engine_settle, server.port, args.timeout_s)
        prepare_s = time.perf_counter() - prepared
        answers, figures = trio.run(_engine_queries, server.port, specs, args.query_budget_s,
                                    counts)
    finally:
        server.stop()
    ingest = {"events_per_s": loaded["events_per_s"], "elapsed_s": loaded["elapsed_s"],
              "batch_p50_ms": loaded["ack_p50_ms"], "batch_p99_ms": loaded["ack_p99_ms"],
              "accepted": workload.expected_accepted, "prepare_s": prepare_s}
    return {"ingest": ingest, "queries": figures}, answers


async def _engine_settle(port: int, timeout_s: float) -> None:
    """Wait until the engine's background compaction has merged the load's late events
    (most of this workload lies before the hot window) into blocks and a checkpoint
    has written them: the engine's counterpart of the peers' ``prepare`` (ANALYZE),
    timed as ``prepare_s``. Only statistics are asked for meanwhile: a query would
    postpone the idle compaction it waits for."""
    with trio.fail_after(timeout_s):
        async with open_client("127.0.0.1", port) as client:
            while True:
                stats = await client.stats()
                if not stats["delta_buckets"] and not stats["blocks_unwritten"]:
                    return
                await trio.sleep(0.1)


async def _engine_queries(port: int, specs: dict[str, list[QuerySpec]], budget_s: float,
                          counts: dict[str, int] | None,
                          ) -> tuple[dict[str, list[Answer]], dict[str, Any]]:
    async with open_client("127.0.0.1", port) as client:
        answers: dict[str, list[Answer]] = {}
        figures: dict[str, Any] = {}
        for kind in KINDS:
            answers[kind] = []
            if not specs[kind]:
                continue
            await client.query(specs[kind][0].to_query())  # warm-up
            latencies: list[float] = []
            started = time.perf_counter()
            todo = specs[kind] if counts is None else specs[kind][: counts[kind]]
            for index, spec in enumerate(todo):
                query = spec.to_query()
                sent = time.perf_counter()
                result = await client.query(query)
                latencies.append(time.perf_counter() - sent)
                answers[kind].append(engine_answer(spec, result.rows))
                if (counts is None and time.perf_counter() - started > budget_s
                        and index >= 2):
                    break
            latencies.sort()
            figures[kind] = {"count": len(latencies),
                             "p50_ms": 1000 * percentile(latencies, 0.5),
                             "p99_ms": 1000 * percentile(latencies, 0.99),
                             "checked_equal": True}  # the reference
    return answers, figures


# ----------------------------------------------------------------------- peers


def event_row(event: Event) -> tuple[Any, ...]:
    """(meter, customer, uid, ts, value, *dimension values in DIM_KEYS order)."""
    value = event.meter_value
    if isinstance(value, bool) or not isinstance(value, int):
        raise BenchmarkFailure(f"the peer tables hold integers; got value {value!r}")
    if event.unique_id is None:
        raise BenchmarkFailure("the peers deduplicate by unique id; an event has none")
    dims = event.dimensions
    return (event.meter_api_name, event.customer_id, event.unique_id,
            event.meter_time_in_millis, value, *(dims.get(k) for k in DIM_KEYS))


class Peer:
    """One system under test. Subclasses load batches and answer ``QuerySpec``s."""

    name = "peer"
    config: dict[str, Any]

    def ingest_batch(self, batch: list[Event]) -> None:
        raise NotImplementedError

    def ingest(self, batches: list[list[Event]], writers: int, deadline: float) -> list[float]:
        """Load every batch, one at a time; the latency of each."""
        latencies = []
        for batch in batches:
            sent = time.perf_counter()
            self.ingest_batch(batch)
            latencies.append(time.perf_counter() - sent)
            if time.perf_counter() > deadline:
                raise BenchmarkFailure(f"{self.name}: ingest exceeded its time budget")
        return latencies

    def prepare(self) -> None:
        """After the load, before queries (statistics); timed as ``prepare_s``."""

    def accepted(self) -> int:
        raise NotImplementedError

    def answer(self, spec: QuerySpec) -> Answer:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SqlPeer(Peer):
    """Events in one table; the three queries are GROUP BYs. Dialects differ in details."""

    param = "?"
    day_expr = "ts - ts % 86400000"
    time_col = "ts"
    table = "events"

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _dimension(self, key: str) -> str:
        if key not in DIM_KEYS:
            raise BenchmarkFailure(f"unknown dimension {key!r}")
        return key

    def answer(self, spec: QuerySpec) -> Answer:
        p, day, t, table = self.param, self.day_expr, self.time_col, self.table
        span = (spec.start_ms, spec.end_ms)
        if spec.kind == "customer_month":
            rows = self._rows(
                f"SELECT {day} AS day, SUM(value) FROM {table} WHERE meter = {p} AND "
                f"customer = {p} AND {t} >= {p} AND {t} < {p} GROUP BY 1 ORDER BY 1",
                (spec.meter, spec.customer, *span))
            return [(int(d), (), exact(v)) for d, v in rows]
        if spec.kind == "top_customers":
            rows = self._rows(
                f"SELECT customer, SUM(value) AS total FROM {table} WHERE meter = {p} AND "
                f"{t} >= {p} AND {t} < {p} GROUP BY customer ORDER BY total DESC, customer "
                f"LIMIT {TOP_N}", (spec.meter, *span))
            return [(spec.start_ms, (c,), exact(v)) for c, v in rows]
        assert spec.dimension is not None
        column = self._dimension(spec.dimension)
        rows = self._rows(
            f"SELECT {day} AS day, {column} AS g, SUM(value) FROM {table} WHERE meter = {p} "
            f"AND {t} >= {p} AND {t} < {p} GROUP BY 1, 2 ORDER BY 1, 2 NULLS FIRST",
            (spec.meter, *span))
        return [(int(d), (g,), exact(v)) for d, g, v in rows]

    def accepted(self) -> int:
        return int(self._rows(f"SELECT COUNT(*) FROM {self.table}", ())[0][0])


EVENT_COLUMNS = ("meter", "customer", "uid", "ts", "value", *DIM_KEYS)
_SQL_EVENTS_TABLE = (
    "CREATE TABLE events (meter TEXT NOT NULL, customer TEXT NOT NULL, uid TEXT NOT NULL, "
    "ts BIGINT NOT NULL, value BIGINT NOT NULL, "
    + ", ".join(f"{k} TEXT" for k in DIM_KEYS)
    + ", PRIMARY KEY (meter, customer, uid))"
)


class SqlitePeer(SqlPeer):
    name = "sqlite"

    def __init__(self, directory: str, synchronous: str = "FULL") -> None:
        self.path = Path(directory) / "events.sqlite"
        self.con = sqlite3.connect(self.path, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(f"PRAGMA synchronous={synchronous}")
        self.con.execute(_SQL_EVENTS_TABLE + " WITHOUT ROWID")
        marks = ", ".join("?" * len(EVENT_COLUMNS))
        self._insert = f"INSERT OR IGNORE INTO events VALUES ({marks})"
        self.config = {
            "transport": "in process (no network hop)",
            "storage": "file database", "journal_mode": "WAL", "synchronous": synchronous,
            "transaction": "one per batch", "version": sqlite3.sqlite_version,
            "dedup": "INSERT OR IGNORE on PRIMARY KEY (meter, customer, unique id)",
            "query": "GROUP BY over the events table",
        }

    def ingest_batch(self, batch: list[Event]) -> None:
        self.con.execute("BEGIN")
        self.con.executemany(self._insert, [event_row(e) for e in batch])
        self.con.execute("COMMIT")

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.con.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        self.con.close()


class DuckdbPeer(SqlPeer):
    name = "duckdb"
    day_expr = "ts - ts % 86400000"

    def __init__(self, directory: str) -> None:
        import duckdb
        import numpy

        self._numpy = numpy
        self.path = Path(directory) / "events.duckdb"
        self.con = duckdb.connect(str(self.path))
        self.con.execute(_SQL_EVENTS_TABLE.replace("TEXT", "VARCHAR"))
        self.config = {
            "transport": "in process (no network hop)",
            "storage": "file database", "transaction": "one per batch (WAL synced at commit)",
            "version": duckdb.__version__,
            "dedup": "INSERT OR IGNORE on PRIMARY KEY (meter, customer, unique id)",
            "load": "column arrays (numpy) per batch",
            "query": "GROUP BY over the events table",
        }

    def ingest_batch(self, batch: list[Event]) -> None:
        np = self._numpy
        rows = [event_row(e) for e in batch]
        columns = list(zip(*rows, strict=True))
        frame = {
            name: (np.array(column, dtype=np.int64) if name in ("ts", "value")
                   else np.array(column, dtype=object))
            for name, column in zip(EVENT_COLUMNS, columns, strict=True)
        }
        self.con.begin()
        self.con.register("batch_frame", frame)
        try:
            self.con.execute("INSERT OR IGNORE INTO events SELECT * FROM batch_frame")
        finally:
            self.con.unregister("batch_frame")
        self.con.commit()

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.con.execute(sql, list(params)).fetchall()

    def close(self) -> None:
        self.con.close()


class PostgresPeer(SqlPeer):
    """``mode="copy"``: events table; ``mode="rollup"``: daily upsert rollup."""

    param = "%s"
    day_expr = "ts - ts %% 86400000"

    def __init__(self, server: PostgresServer, mode: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self.mode = mode
        self.name = f"postgres_{mode}"
        self.server = server
        self.dbname = f"bench_{mode}"
        with psycopg.connect(server.conninfo, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {self.dbname}")
            admin.execute(f"CREATE DATABASE {self.dbname}")
        self.conninfo = f"{server.conninfo.rsplit(' dbname=', 1)[0]} dbname={self.dbname}"
        self.con = psycopg.connect(self.conninfo, autocommit=True)
        if mode == "copy":
            self.con.execute(_SQL_EVENTS_TABLE)
        else:
            self.table = "rollup"
            self.time_col = "day"
            self.day_expr = "day"
            self.con.execute("CREATE TABLE seen (meter TEXT NOT NULL, customer TEXT NOT NULL, "
                             "uid TEXT NOT NULL, PRIMARY KEY (meter, customer, uid))")
            dims = ", ".join(f"{k} TEXT NOT NULL" for k in DIM_KEYS)
            self.con.execute(
                f"CREATE TABLE rollup (meter TEXT NOT NULL, customer TEXT NOT NULL, "
                f"day BIGINT NOT NULL, {dims}, value BIGINT NOT NULL, "
                f"PRIMARY KEY (meter, customer, day, {', '.join(DIM_KEYS)}))")
        settings = {
            row[0]: row[1] for row in self.con.execute(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name IN ('fsync', "
                "'synchronous_commit', 'full_page_writes', 'wal_sync_method', "
                "'shared_buffers', 'server_version')").fetchall()
        }
        self.config = {
            "transport": "loopback TCP", "settings": settings, "transaction": "one per batch",
            "load": "COPY into staging", "writers": "one connection each",
            "dedup": ("INSERT ... ON CONFLICT DO NOTHING on PRIMARY KEY (meter, customer, "
                      "unique id)" if mode == "copy" else
                      "unique ids INSERT ... ON CONFLICT DO NOTHING RETURNING into a seen table"),
            "query": ("GROUP BY over the events table" if mode == "copy" else
                      "GROUP BY over a daily rollup upserted with INSERT ... ON CONFLICT DO "
                      "UPDATE, keyed by (meter, customer, UTC day, dimensions)"),
        }
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()

    def _writer(self) -> Any:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._psycopg.connect(self.conninfo)
            con.execute("CREATE TEMP TABLE stage (meter TEXT, customer TEXT, uid TEXT, "
                        "ts BIGINT, value BIGINT, "
                        + ", ".join(f"{k} TEXT" for k in DIM_KEYS) + ") ON COMMIT DELETE ROWS")
            con.commit()
            self._local.con = con
            with self._lock:
                self._connections.append(con)
        return con

    _COPY_INSERT = ("INSERT INTO events SELECT * FROM stage ORDER BY meter, customer, uid "
                    "ON CONFLICT DO NOTHING")
    _ROLLUP_UPSERT = (
        "WITH fresh AS (INSERT INTO seen (meter, customer, uid) "
        "SELECT DISTINCT meter, customer, uid FROM stage ORDER BY 1, 2, 3 "
        "ON CONFLICT DO NOTHING RETURNING meter, customer, uid), "
        "batch AS (SELECT DISTINCT ON (meter, customer, uid) * FROM stage) "
        "INSERT INTO rollup SELECT b.meter, b.customer, b.ts - b.ts % 86400000, "
        + ", ".join(f"COALESCE(b.{k}, '')" for k in DIM_KEYS)
        + ", SUM(b.value) FROM batch b JOIN fresh USING (meter, customer, uid) "
        "GROUP BY 1, 2, 3, " + ", ".join(str(4 + i) for i in range(len(DIM_KEYS)))
        + " ORDER BY 1, 2, 3, " + ", ".join(str(4 + i) for i in range(len(DIM_KEYS)))
        + " ON CONFLICT (meter, customer, day, " + ", ".join(DIM_KEYS) + ") "
        "DO UPDATE SET value = rollup.value + EXCLUDED.value"
    )

    def ingest_batch(self, batch: list[Event]) -> None:
        con = self._writer()
        for attempt in range(5):  # concurrent writers may deadlock on shared keys: retry
            try:
                with con.cursor() as cur:
                    with cur.copy(f"COPY stage ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
                        for event in batch:
                            copy.write_row(event_row(event))
                    cur.execute(self._COPY_INSERT if self.mode == "copy"
                                else self._ROLLUP_UPSERT)
                con.commit()
                return
            except (self._psycopg.errors.DeadlockDetected,
                    self._psycopg.errors.SerializationFailure):
                con.rollback()
                if attempt == 4:
                    raise

    def ingest(self, batches: list[list[Event]], writers: int, deadline: float) -> list[float]:
        if writers == 1:
            return super().ingest(batches, writers, deadline)
        queue = list(reversed(batches))
        latencies: list[float] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                while time.perf_counter() < deadline:
                    with self._lock:
                        if not queue or errors:
                            return
                        batch = queue.pop()
                    sent = time.perf_counter()
                    self.ingest_batch(batch)
                    with self._lock:
                        latencies.append(time.perf_counter() - sent)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, daemon=True) for _ in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.perf_counter()) + 60)
        if errors:
            raise errors[0]
        if queue or any(t.is_alive() for t in threads):
            raise BenchmarkFailure(f"{self.name}: ingest exceeded its time budget")
        return latencies

    def prepare(self) -> None:
        self.con.execute(f"ANALYZE {self.table}")

    def accepted(self) -> int:
        if self.mode == "copy":
            return super().accepted()
        return int(self._rows("SELECT COUNT(*) FROM seen", ())[0][0])

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.con.execute(sql, tuple(params)).fetchall()

    def _dimension(self, key: str) -> str:
        return super()._dimension(key) if self.mode == "copy" else f"NULLIF({key}, '')"

    def close(self) -> None:
        for con in self._connections:
            con.close()
        self.con.close()
        with contextlib.suppress(Exception), self._psycopg.connect(
                self.server.conninfo, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {self.dbname}")


_REDIS_SCRIPT = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZINCRBY', KEYS[3], ARGV[2], ARGV[4])
for i = 5, #ARGV do redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[2]) end
return 1
"""
_SEP = "\x1f"


class RedisPeer(Peer):
    name = "redis"

    def __init__(self, server: RedisServer) -> None:
        import redis

        self.client = redis.Redis(host=server.host, port=server.port, decode_responses=True)
        self.client.flushall()  # a fresh keyspace for every run
        self.script = self.client.register_script(_REDIS_SCRIPT)
        self.accepted_events = 0
        self.config = {
            "transport": "loopback TCP", **server.config, "version": server.version,
            "write": "one Lua script per event, pipelined per batch",
            "dedup": "SADD of the unique id to a set per (meter, customer); counted only if new",
            "layout": "hash per (meter, customer): field UTC day; sorted set per (meter, day): "
                      "customer; hash per (meter, day): field per dimension value",
        }

    def ingest_batch(self, batch: list[Event]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for event in batch:
            meter, customer, uid, ts, value, *dims = event_row(event)
            day = ts - ts % DAY_MS
            args = [uid, value, day, customer,
                    *(f"{k}{_SEP}{v}" for k, v in zip(DIM_KEYS, dims, strict=True)
                      if v is not None)]
            self.script(keys=[f"s:{meter}:{customer}", f"c:{meter}:{customer}",
                              f"z:{meter}:{day}", f"d:{meter}:{day}"], args=args, client=pipe)
        self.accepted_events += sum(int(r) for r in pipe.execute())

    def accepted(self) -> int:
        return self.accepted_events

    def _days(self, spec: QuerySpec) -> range:
        return range(spec.start_ms, spec.end_ms, DAY_MS)

    def answer(self, spec: QuerySpec) -> Answer:
        if spec.kind == "customer_month":
            fields = self.client.hgetall(f"c:{spec.meter}:{spec.customer}")
            return sorted((int(day), (), int(v)) for day, v in fields.items()
                          if spec.start_ms <= int(day) < spec.end_ms)
        if spec.kind == "top_customers":
            return self._top(spec)
        pipe = self.client.pipeline(transaction=False)
        days = self._days(spec)
        for day in days:
            pipe.hgetall(f"d:{spec.meter}:{day}")
        prefix = f"{spec.dimension}{_SEP}"
        rows: Answer = []
        for day, fields in zip(days, pipe.execute(), strict=True):
            rows.extend(sorted((day, (f[len(prefix):],), int(v)) for f, v in fields.items()
                               if f.startswith(prefix)))
        return rows

    def _top(self, spec: QuerySpec) -> Answer:
        scratch = f"tmp:{uuid.uuid4().hex}"
        pipe = self.client.pipeline(transaction=False)
        pipe.zunionstore(scratch, [f"z:{spec.meter}:{day}" for day in self._days(spec)])
        pipe.zrevrange(scratch, 0, TOP_N - 1, withscores=True)
        _, top = pipe.execute()
        if len(top) == TOP_N:  # ties at the cut: take them in customer order, as the engine
            cut = top[-1][1]
            tied = self.client.zrangebyscore(scratch, cut, cut)
            above = [(m, s) for m, s in top if s > cut]
            top = sorted(above, key=lambda p: (-p[1], p[0])) + [
                (m, cut) for m in sorted(tied)][: TOP_N - len(above)]
        else:
            top = sorted(top, key=lambda p: (-p[1], p[0]))
        self.client.delete(scratch)
        return [(spec.start_ms, (member,), exact(int(score))) for member, score in top]

    def close(self) -> None:
        self.client.close()


# ----------------------------------------------------------------- the runner


def measure_peer(peer: Peer, workload: Workload, specs: dict[str, list[QuerySpec]],
                 reference: dict[str, list[Answer]], args: argparse.Namespace,
                 ) -> dict[str, Any]:
    started = time.perf_counter()
    latencies = peer.ingest(workload.batches, args.writers, started + args.timeout_s)
    elapsed_s = time.perf_counter() - started
    prepared = time.perf_counter()
    peer.prepare()
    prepare_s = time.perf_counter() - prepared
    accepted = peer.accepted()
    if accepted != workload.expected_accepted:
        raise BenchmarkFailure(f"{peer.name}: {accepted} events kept, expected "
                               f"{workload.expected_accepted} (dedup by unique id)")
    latencies.sort()
    ingest = {"events_per_s": workload.event_count / elapsed_s, "elapsed_s": elapsed_s,
              "batch_p50_ms": 1000 * percentile(latencies, 0.5),
              "batch_p99_ms": 1000 * percentile(latencies, 0.99),
              "accepted": accepted, "prepare_s": prepare_s}
    _, figures = timed_queries(peer.name, specs, peer.answer, reference, args.query_budget_s)
    return {"ingest": ingest, "queries": figures}


def _speedup(engine: dict[str, Any], peer: dict[str, Any]) -> dict[str, float]:
    ratios = {"ingest": engine["ingest"]["events_per_s"] / peer["ingest"]["events_per_s"]}
    for kind in KINDS:
        mine, theirs = engine["queries"].get(kind), peer["queries"].get(kind)
        if mine and theirs:
            for q in ("p50", "p99"):
                ratios[f"{kind}_{q}"] = theirs[f"{q}_ms"] / mine[f"{q}_ms"]
    return ratios


def _empty(status: str, reason: str | None, config: dict[str, Any] | None = None,
           ) -> dict[str, Any]:
    return {"status": status, "reason": reason, "config": config or {}, "ingest": None,
            "queries": None}


@contextlib.contextmanager
def _service(factory: Callable[[], Any]) -> Iterator[Any]:
    """A started server, or the ``ServiceUnavailable`` that says why there is none."""
    try:
        server = factory().start()
    except ServiceUnavailable as exc:
        yield exc
        return
    except Exception as exc:  # anything else that keeps the server from starting
        yield ServiceUnavailable(f"{type(exc).__name__}: {exc}")
        return
    try:
        yield server
    finally:
        server.stop()


def _open_peer(name: str, tmpdir: str, servers: dict[str, Any]) -> Peer:
    if name == "sqlite":
        return SqlitePeer(tmpdir)
    if name == "duckdb":
        return DuckdbPeer(tmpdir)
    if name.startswith("postgres_"):
        return PostgresPeer(servers["postgres"], name.removeprefix("postgres_"))
    return RedisPeer(servers["redis"])


def _server_for(name: str) -> str | None:
    if name.startswith("postgres_"):
        return "postgres"
    return "redis" if name == "redis" else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the workload, run the engine then each peer, check and time them all."""
    now_ms = time.time_ns() // 1_000_000
    workload = generate(args.seed, customers=args.customers, meters=args.meters,
                        events=args.events, batch_size=args.batch_size, now_ms=now_ms,
                        aggregations=("sum",))
    specs = query_specs(workload, args.queries, args.seed)
    start_ms, end_ms = query_range(workload.now_ms)
    systems: dict[str, Any] = {}
    engine_config = {
        "transport": "loopback TCP",
        "server": "python -m engine serve (subprocess), engine.client",
        "durability": "LMDB write-ahead log, fsync per group commit, ack after fsync",
        "dedup": "by (meter, customer, unique id), exact, forever",
        "shards": args.shards, "batches_in_flight": args.writers,
    }
    engine_runs: list[dict[str, Any]] = []
    reference: dict[str, list[Answer]] = {}
    try:
        for repeat in range(args.repeats):
            counts = {k: len(v) for k, v in reference.items()} if repeat else None
            figures, answers = run_engine(workload, specs, args, counts)
            if repeat and answers != reference:
                raise BenchmarkFailure("the engine's answers differ between repeats")
            reference = answers
            engine_runs.append(figures)
    except Exception as exc:
        systems["engine"] = _empty("failed", f"{type(exc).__name__}: {exc}", engine_config)
        for name in args.peers:
            systems[name] = _empty("failed", "no reference answers: the engine run failed")
        return _report(args, workload, systems, start_ms, end_ms)
    engine = median_figures(engine_runs)
    systems["engine"] = {"status": "ok", "reason": None, "config": engine_config, **engine,
                         "runs": engine_runs}

    with tempfile.TemporaryDirectory(prefix="meter-bench-peers-", dir=args.tmpdir) as tmpdir:
        for server_name, group in itertools.groupby(args.peers, key=_server_for):
            names = list(group)
            factory = {"postgres": lambda: PostgresServer(install=args.install),
                       "redis": lambda: RedisServer(install=args.install)}.get(server_name or "")
            with contextlib.ExitStack() as stack:
                servers: dict[str, Any] = {}
                if factory is not None:
                    server = stack.enter_context(_service(factory))
                    if isinstance(server, ServiceUnavailable):
                        for name in names:
                            systems[name] = _empty("skipped", f"{server_name}: {server}")
                        continue
                    servers[server_name or ""] = server
                for name in names:
                    systems[name] = _run_one(name, tmpdir, servers, workload, specs,
                                             reference, args, engine)
    return _report(args, workload, systems, start_ms, end_ms)


def run_peers(argv: Sequence[str] = (), **overrides: Any) -> dict[str, Any]:
    """``run(parse_args(argv))`` with attributes overridden, for other scripts.

    ``run_peers(["--quick"], json=None, tmpdir="/var/tmp")``; the keys of
    ``overrides`` are ``parse_args`` destinations (``events``, ``peers`` as a
    list, ``repeats``, ``query_budget_s``, ...).
    """
    args = parse_args(list(argv))
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise TypeError(f"unknown peers option {name!r}")
        setattr(args, name, value)
    return run(args)


def _run_one(name: str, tmpdir: str, servers: dict[str, Any], workload: Workload,
             specs: dict[str, list[QuerySpec]], reference: dict[str, list[Answer]],
             args: argparse.Namespace, engine: dict[str, Any]) -> dict[str, Any]:
    """``args.repeats`` runs of one peer, each on a fresh database; medians."""
    runs: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    for repeat in range(args.repeats):
        directory = Path(tmpdir) / f"{name}-{repeat}"
        directory.mkdir()
        try:
            peer = _open_peer(name, str(directory), servers)
        except ImportError as exc:
            return _empty("skipped", f"client library missing ({exc}); "
                                     f"pip install -e '.[bench]'")
        except Exception as exc:
            return _empty("skipped", f"could not open: {type(exc).__name__}: {exc}")
        config = peer.config
        try:
            runs.append(measure_peer(peer, workload, specs, reference, args))
        except Exception as exc:
            return _empty("failed", f"{type(exc).__name__}: {exc}", config)
        finally:
            with contextlib.suppress(Exception):
                peer.close()
            shutil.rmtree(directory, ignore_errors=True)
    figures = median_figures(runs)
    return {"status": "ok", "reason": None, "config": config, **figures,
            "engine_speedup": _speedup(engine, figures), "runs": runs}


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over the repeats (counts and checks from the first)."""
    ingest = {key: statistics.median(run["ingest"][key] for run in runs)
              for key in runs[0]["ingest"]}
    queries = {}
    for kind, first in runs[0]["queries"].items():
        queries[kind] = {
            **first,
            "p50_ms": statistics.median(run["queries"][kind]["p50_ms"] for run in runs),
            "p99_ms": statistics.median(run["queries"][kind]["p99_ms"] for run in runs),
        }
    return {"ingest": ingest, "queries": queries}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _report(args: argparse.Namespace, workload: Workload, systems: dict[str, Any],
            start_ms: int, end_ms: int) -> dict[str, Any]:
    report = {
        "benchmark": "peers",
        "machine": {**machine_facts(), "duckdb": _version("duckdb"),
                    "redis_py": _version("redis"), "psycopg": _version("psycopg"),
                    "sqlite": sqlite3.sqlite_version},
        "parameters": {
            "events": workload.event_count, "customers": args.customers,
            "meters": args.meters, "aggregation": "sum", "batch_size": args.batch_size,
            "seed": args.seed, "writers": args.writers, "shards": args.shards,
            "repeats": args.repeats,
            "queries": args.queries, "query_budget_s": args.query_budget_s, "top_n": TOP_N,
            "start_ms": start_ms, "end_ms": end_ms, "range": f"last {RANGE_DAYS} UTC days",
            "duplicates": workload.expected_duplicates,
            "accepted": workload.expected_accepted, "peers": list(args.peers),
        },
        "systems": systems,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


def format_table(report: dict[str, Any]) -> str:
    """Markdown table; "x eng": how many times faster the engine is (> 1: engine faster)."""
    head = ["system", "ingest ev/s", "x eng", "prepare s"]
    for kind in KINDS:
        head += [f"{kind} p50 ms", "p99 ms", "x eng"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, system in report["systems"].items():
        if system["status"] != "ok":
            lines.append(f"| {name} | {system['status'].upper()}: {system['reason']} |")
            continue
        ratios = system.get("engine_speedup", {})
        cells = [name, f"{system['ingest']['events_per_s']:,.0f}",
                 f"{ratios['ingest']:.2f}" if ratios else "1",
                 f"{system['ingest'].get('prepare_s', 0.0):.1f}"]
        for kind in KINDS:
            q = system["queries"].get(kind)
            if q is None:
                cells += ["-", "-", "-"]
                continue
            ratio = ratios.get(f"{kind}_p50")
            cells += [f"{q['p50_ms']:.2f}", f"{q['p99_ms']:.2f}",
                      f"{ratio:.2f}" if ratio is not None else "1"]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {k: v["count"] for k, v in report["systems"]["engine"].get("queries", {}).items()} \
        if report["systems"]["engine"]["status"] == "ok" else {}
    lines.append(f"\nqueries per kind: {counts}; every peer answer checked equal to the "
                 f"engine's; 'x eng' = peer time / engine time (> 1: the engine is faster)")
    return "\n".join(lines)


def format_configs(report: dict[str, Any]) -> str:
    """One line per system: how it was set up (durability, dedup, query path)."""
    lines = []
    for name, system in report["systems"].items():
        config = {k: v for k, v in system["config"].items() if k not in ("query",)}
        lines.append(f"- {name}: " + "; ".join(f"{k}={v}" for k, v in config.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on SIGTERM too
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("interrupted; the servers were stopped and the temporary files removed",
              file=sys.stderr)
        return 130
    print(json.dumps(report["machine"], indent=2))
    print(json.dumps(report["parameters"]))
    print(format_table(report))
    print(format_configs(report))
    print(json.dumps(report, default=str))
    return 0 if all(s["status"] != "failed" for s in report["systems"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
