"""Query latency over TCP, with every answer checked against a direct model.

A plain script (not collected by pytest; tests/test_benchmarks_smoke.py runs it
on a tiny workload). It starts a fresh ``meter serve`` subprocess
(``ServerProcess`` from ``serve.py``), ingests a seeded workload
(``benchmarks/workload.py``), then times three query shapes over one client
connection, one query at a time:

- **customer_month_by_day**: one customer, one sum meter, the last 30 UTC days
  by day (``filter={"customer_id": [c]}``, ``window="day"``); the customer
  rotates through a sample of Zipf ranks (1, 10, 100, ...) that have events.
- **top100_customers_month**: one sum meter, the same 30 days as one total,
  grouped by customer, ``take=Take(limit=100)``.
- **meter_by_dimension**: one meter with a ``region`` dimension, the same 30
  days by day, grouped by ``region``.

Before any figure counts, the first answer of every distinct query is compared
with a model computed directly from the generated events (duplicates counted
once): equal rows for the customer and dimension queries; for the top 100,
every returned value equals the model's total for that customer and the
returned values are the model's 100 largest. A wrong answer raises
``BenchmarkFailure``. Latency is the client's round trip (send to decoded
reply), after untimed warm-up queries; each shape stops after ``--queries``
samples or its time budget, whichever comes first.

    python benchmarks/query_latency.py --quick
    python benchmarks/query_latency.py --customers 100000 --events 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkFailure, machine_facts, percentile
from benchmarks.workload import (
    AGGREGATIONS_MIXED,
    DAY_MS,
    MINUTE_MS,
    Workload,
    generate,
    meter_dimension_keys,
)
from engine.client import open_client
from engine.schema import Event, Meter, Query, QueryResult, Take

KINDS = ("customer_month_by_day", "top100_customers_month", "meter_by_dimension")
TOP = 100
SAMPLE_RANKS = (1, 10, 100, 1_000, 10_000, 100_000)


def month_range(now_ms: int) -> tuple[int, int]:
    """The last 30 whole UTC days, including today: [midnight 29 days ago, next midnight)."""
    today = now_ms - now_ms % DAY_MS
    return today - 29 * DAY_MS, today + DAY_MS


def current_minute_ms() -> int:
    """Now, floored to the minute: a workload's ``now_ms`` that a live server accepts."""
    now = time.time_ns() // 1_000_000
    return now - now % MINUTE_MS


@dataclass
class QueryPlan:
    """The queries to time and the answers the model expects."""

    sum_meter: str
    dimension_meter: str
    start_ms: int
    end_ms: int
    sample_customers: list[str]
    per_customer_day: dict[str, dict[int, int]] = field(default_factory=dict)
    per_customer_total: dict[str, int] = field(default_factory=dict)
    per_day_region: dict[tuple[int, str], int] = field(default_factory=dict)
    customers_with_events: int = 0
    sample_ranks: list[int] = field(default_factory=list)

    def queries(self, kind: str) -> list[Query]:
        if kind == "customer_month_by_day":
            return [Query(meter_api_name=self.sum_meter, start_ms=self.start_ms,
                          end_ms=self.end_ms, window="day",
                          filter={"customer_id": [customer]})
                    for customer in self.sample_customers]
        if kind == "top100_customers_month":
            return [Query(meter_api_name=self.sum_meter, start_ms=self.start_ms,
                          end_ms=self.end_ms, group_by=["customer_id"], take=Take(limit=TOP))]
        if kind == "meter_by_dimension":
            return [Query(meter_api_name=self.dimension_meter, start_ms=self.start_ms,
                          end_ms=self.end_ms, window="day", group_by=["region"])]
        raise ValueError(kind)

    def check(self, kind: str, query: Query, result: QueryResult) -> None:
        """Raise ``BenchmarkFailure`` unless ``result`` is the model's answer."""
        if kind == "customer_month_by_day":
            customer = query.filter["customer_id"][0]
            got = {row.window_start_ms: row.value for row in result.rows}
            want = self.per_customer_day.get(customer, {})
            if got != want or len(result.rows) != len(want):
                raise BenchmarkFailure(f"{kind} for {customer}: {len(result.rows)} rows differ "
                                       f"from the model's {len(want)}")
        elif kind == "top100_customers_month":
            want_values = sorted(self.per_customer_total.values(), reverse=True)[:TOP]
            got_values = [row.value for row in result.rows]
            if got_values != want_values:
                raise BenchmarkFailure(f"{kind}: the values are not the model's top {TOP}")
            for row in result.rows:
                customer = row.group.get("customer_id")
                if customer is None or self.per_customer_total.get(customer) != row.value:
                    raise BenchmarkFailure(f"{kind}: {customer} = {row.value}, model "
                                           f"{self.per_customer_total.get(customer or '')}")
        elif kind == "meter_by_dimension":
            got = {(row.window_start_ms, row.group.get("region")): row.value
                   for row in result.rows}
            if got != self.per_day_region or len(result.rows) != len(self.per_day_region):
                raise BenchmarkFailure(f"{kind}: {len(result.rows)} rows differ from the "
                                       f"model's {len(self.per_day_region)}")


class QueryModel:
    """The model's answers, accumulated batch by batch straight from the generated events.

    ``add`` every batch that was sent (any order: duplicates are exact copies, so
    the first copy seen counts), then ``plan()``. Works on a streamed workload
    too, so the 10M-event state's answers are checked without holding it.
    """

    def __init__(self, meters: Sequence[Meter], max_dimensions: int, now_ms: int,
                 customer_ids: Sequence[str]) -> None:
        sums = [m.name for m in meters if m.aggregation in ("sum", "count")]
        if not sums:
            raise BenchmarkFailure("the workload has no sum or count meter to query")
        self.sum_meter = sums[0]
        self.dimension_meter = next(
            (m.name for index, m in enumerate(meters)
             if m.aggregation in ("sum", "count")
             and "region" in meter_dimension_keys(index, max_dimensions)), None)
        if self.dimension_meter is None:
            raise BenchmarkFailure("the workload has no sum or count meter with a region "
                                   "dimension")
        self.start_ms, self.end_ms = month_range(now_ms)
        self.customer_ids = customer_ids
        self._counts = {m.name: m.aggregation == "count" for m in meters}
        self._seen: set[tuple[str, str, str]] = set()
        self.totals: dict[str, int] = {}
        self.by_day: dict[str, dict[int, int]] = {}
        self.regions: dict[tuple[int, str], int] = {}
        self.customers_with_events: set[str] = set()

    @classmethod
    def for_workload(cls, workload: Workload) -> QueryModel:
        return cls(workload.meters, int(workload.parameters.get("max_dimensions", 3)),
                   workload.now_ms, workload.customer_ids)

    def add(self, batch: Sequence[Event]) -> None:
        sum_meter, dimension_meter = self.sum_meter, self.dimension_meter
        start_ms, end_ms = self.start_ms, self.end_ms
        seen, totals, by_day, regions = self._seen, self.totals, self.by_day, self.regions
        active = self.customers_with_events
        for event in batch:
            active.add(event.customer_id)
            meter = event.meter_api_name
            if meter != sum_meter and meter != dimension_meter:
                continue
            ts = event.meter_time_in_millis
            if not start_ms <= ts < end_ms:
                continue
            if event.unique_id is not None:
                key = (meter, event.customer_id, event.unique_id)
                if key in seen:
                    continue
                seen.add(key)
            value = 1 if self._counts[meter] else int(event.meter_value)
            day = ts - ts % DAY_MS
            if meter == sum_meter:
                totals[event.customer_id] = totals.get(event.customer_id, 0) + value
                days = by_day.setdefault(event.customer_id, {})
                days[day] = days.get(day, 0) + value
            if meter == dimension_meter:
                region_key = (day, event.dimensions["region"])
                regions[region_key] = regions.get(region_key, 0) + value

    def plan(self) -> QueryPlan:
        """The queries to time (sample customers by Zipf rank, and the least active)."""
        assert self.dimension_meter is not None
        plan = QueryPlan(sum_meter=self.sum_meter, dimension_meter=self.dimension_meter,
                         start_ms=self.start_ms, end_ms=self.end_ms, sample_customers=[],
                         per_customer_total=self.totals, per_day_region=self.regions,
                         customers_with_events=len(self.customers_with_events))
        for rank in SAMPLE_RANKS:
            if rank > len(self.customer_ids):
                break
            customer = self.customer_ids[rank - 1]
            if customer in self.by_day:
                plan.sample_customers.append(customer)
                plan.sample_ranks.append(rank)
        # The least active customer with events too: one row, the cheapest answer.
        if self.by_day:
            plan.sample_customers.append(min(self.by_day, key=lambda c: (self.totals[c], c)))
        plan.per_customer_day = {c: self.by_day[c] for c in plan.sample_customers}
        return plan


def plan_queries(workload: Workload) -> QueryPlan:
    """Pick the meters and sample customers; compute the model's answers from the events."""
    model = QueryModel.for_workload(workload)
    for batch in workload.batches:
        model.add(batch)
    return model.plan()


async def measure_queries(port: int, plan: QueryPlan, *, queries: int, warmup: int,
                          budget_s: float, timeout_s: float) -> dict[str, Any]:
    """Time each query shape; check the first answer of every distinct query."""
    results: dict[str, Any] = {}
    with trio.fail_after(timeout_s):
        async with open_client("127.0.0.1", port) as client:
            for kind in KINDS:
                shapes = plan.queries(kind)
                for query in shapes:
                    plan.check(kind, query, await client.query(query))
                for index in range(warmup):
                    await client.query(shapes[index % len(shapes)])
                samples: list[float] = []
                rows: list[int] = []
                deadline = time.perf_counter() + budget_s
                for index in range(queries):
                    query = shapes[index % len(shapes)]
                    sent = time.perf_counter()
                    result = await client.query(query)
                    samples.append(time.perf_counter() - sent)
                    rows.append(len(result.rows))
                    if time.perf_counter() > deadline and len(samples) >= 5:
                        break
                samples.sort()
                results[kind] = {
                    "queries": len(samples), "checked": len(shapes),
                    "p50_ms": 1000 * percentile(samples, 0.5),
                    "p99_ms": 1000 * percentile(samples, 0.99),
                    "max_ms": 1000 * samples[-1],
                    "rows_min": min(rows), "rows_max": max(rows),
                }
    return results


# ------------------------------------------------------------------ standalone


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workload, few queries")
    parser.add_argument("--events", type=int, default=None, help="default 200k (quick 20k)")
    parser.add_argument("--customers", type=int, default=None,
                        help="customer universe (Zipf), default 100k (quick 10k)")
    parser.add_argument("--meters", type=int, default=10)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--queries", type=int, default=None, help="per shape, default 50")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=20.0, help="per shape")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 20_000 if args.quick else 200_000
    if args.customers is None:
        args.customers = 10_000 if args.quick else 100_000
    if args.queries is None:
        args.queries = 10 if args.quick else 50
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.serve import ServerProcess
    from benchmarks.tcp_ingest import send_workload

    workload = generate(args.seed, customers=args.customers, meters=args.meters,
                        events=args.events, now_ms=current_minute_ms(),
                        aggregations=AGGREGATIONS_MIXED)
    plan = plan_queries(workload)
    server = ServerProcess(args.shards)
    try:
        trio.run(send_workload, server.port, workload, 1, 4, args.timeout_s)
        results = trio.run(lambda: measure_queries(
            server.port, plan, queries=args.queries, warmup=args.warmup,
            budget_s=args.budget_s, timeout_s=args.timeout_s))
    finally:
        server.stop(kill=True)
    report = {
        "machine": machine_facts(),
        "parameters": {"events": args.events, "customers": args.customers,
                       "customers_with_events": plan.customers_with_events,
                       "meters": args.meters, "shards": args.shards, "seed": args.seed,
                       "queries": args.queries, "sum_meter": plan.sum_meter,
                       "dimension_meter": plan.dimension_meter},
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = ["| query | queries | p50 ms | p99 ms | max ms | rows |",
             "|---|---:|---:|---:|---:|---|"]
    for kind, r in report["results"].items():
        lines.append(f"| {kind} | {r['queries']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                     f"| {r['max_ms']:.2f} | {r['rows_min']}-{r['rows_max']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report["machine"], indent=2))
    print(json.dumps(report["parameters"]))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
