"""Pricing's costs: an invoice preview, and ingest with cost limits beside ingest without.

Two figures (docs/benchmarks.md, "Pricing"):

1. **Invoice preview**: ``Engine.invoice`` for one customer on a plan of 10 charges
   (every charge model, some on a dimension filter), on an engine holding the
   workload's state; median and p99 of ``--previews`` calls (goal: under 5 ms).
2. **Ingest with cost limits**, side by side in one run: three engines fed the same
   batches in interleaved rounds (so machine noise hits all three alike): no cost
   limit; one cost limit with ``customer_id=None``; one cost limit per customer
   (``--customers``, 10,000 by default). Each is reported as events/s and as a ratio
   to the first (goal: within 10 %). Each engine has its own LMDB data directory
   in a temporary folder (fsync on, as served), 8 shards; ``--store memory`` runs
   them on the in-memory store instead, with the events' unique ids dropped (the
   fake's dedup index is not made for millions of ids), to compare the engines'
   own work without disk.

    .venv/bin/python benchmarks/pricing.py            # the figures in docs/benchmarks.md
    .venv/bin/python benchmarks/pricing.py --quick    # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import trio

if __package__ in (None, ""):  # run as a script: the repository's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_facts, percentile
from benchmarks.workload import AGGREGATIONS_MIXED, Workload, WorkloadStream, generate
from engine import Charge, Engine, Limit, Plan, Tier, open_engine
from engine.storage import MemoryStore


def ten_charges(meters: list[str]) -> Plan:
    """Ten charges over the workload's meters: every model, three dimension filters."""
    tiers = [Tier(up_to=1_000, unit_price="0.01"), Tier(up_to=100_000, unit_price="0.005"),
             Tier(unit_price="0.001", flat_fee="10")]
    models: list[dict[str, Any]] = [
        {"model": "per_unit", "unit_price": "0.002"},
        {"model": "graduated", "tiers": tiers},
        {"model": "volume", "tiers": tiers},
        {"model": "package", "package_size": 100, "package_price": "5", "free_units": 100},
    ]
    charges = []
    for index in range(10):
        meter = meters[index % len(meters)]
        dims = {"region": [["eu", "us", "ap"][index % 3]]} if index >= 7 else {}
        charges.append(Charge(meter_api_name=meter, id=f"charge-{index}", dimensions=dims,
                              min_amount="1" if index == 0 else None,
                              max_amount="5000" if index == 1 else None,
                              **models[index % len(models)]))
    return Plan(id="bench", currency="USD", fixed_fee="49", minimum="100", charges=charges)


async def prepared(stack: AsyncExitStack, workload: Workload, customers: list[str],
                   limits: str, clock: Callable[[], int], store: str = "lmdb") -> Engine:
    """An open engine with the plan, every customer on it and the cost limits ``limits``
    names: "none", "global" or "per-customer"."""
    if store == "memory":
        eng = await stack.enter_async_context(open_engine(store=MemoryStore(), shards=8,
                                                          clock_ms=clock))
    else:
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"pricing-{limits}-"))
        eng = await stack.enter_async_context(open_engine(data_dir, shards=8, clock_ms=clock,
                                                          snapshot_on_close=False))
    for meter in workload.meters:
        await eng.define_meter(meter)
    await eng.define_plan(ten_charges([m.name for m in workload.meters]))
    for customer in customers:
        await eng.assign_plan(customer, "bench", effective_from_ms=workload.now_ms)
    if limits == "global":
        await eng.add_limit(Limit(id="spend", meter_api_name=None, thresholds=[
            Decimal(10**9)], period="month", measure="cost"))
    elif limits == "per-customer":
        for customer in customers:
            await eng.add_limit(Limit(id=f"spend-{customer}", meter_api_name=None,
                                      customer_id=customer, thresholds=[Decimal(10**9)],
                                      period="month", measure="cost"))
    return eng


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    workload = generate(args.seed, customers=args.customers, meters=5, events=args.events,
                        batch_size=args.batch_size, duplicate_fraction=0.0,
                        late_fraction=0.0)
    if args.store == "memory":
        workload = dataclasses.replace(workload, batches=[
            [msgspec.structs.replace(e, unique_id=None) for e in batch]
            for batch in workload.batches])
    clock = lambda: workload.now_ms  # noqa: E731 - the workload's own now
    scenarios = ["none", "global", "per-customer"]
    async with AsyncExitStack() as stack:
        started = time.perf_counter()
        engines = {name: await prepared(stack, workload, workload.customer_ids, name, clock,
                                        args.store)
                   for name in scenarios}
        setup_s = time.perf_counter() - started
        return await _run(args, workload, engines, setup_s)


async def _run(args: argparse.Namespace, workload: Workload, engines: dict[str, Engine],
               setup_s: float) -> dict[str, Any]:
    scenarios = list(engines)
    rounds = max(1, len(workload.batches) // args.batches_per_round)
    seconds: dict[str, list[float]] = {name: [] for name in scenarios}
    events_per_round: list[int] = []
    if True:
        for round_index in range(rounds):
            batches = workload.batches[round_index * args.batches_per_round:
                                       (round_index + 1) * args.batches_per_round]
            events_per_round.append(sum(len(b) for b in batches))
            # The order rotates each round, so no scenario always runs first.
            order = scenarios[round_index % 3:] + scenarios[:round_index % 3]
            for name in order:
                eng = engines[name]
                began = time.perf_counter()
                for batch in batches:
                    await eng.ingest(batch)
                seconds[name].append(time.perf_counter() - began)
        # Invoice preview on the state ingested (the busiest customer and a median one).
        eng = engines["per-customer"]
        preview_ms: list[float] = []
        customers = [workload.customer_ids[0], workload.customer_ids[len(workload.customer_ids)
                                                                     // 2]]
        for index in range(args.previews):
            began = time.perf_counter()
            await eng.invoice(customers[index % 2], workload.now_ms)
            preview_ms.append((time.perf_counter() - began) * 1000)
        alerts = {name: engines[name].next_alert_seq() for name in scenarios}
    # Per round, each scenario's time over "none"'s: the median ratio is the figure.
    ratios = {name: statistics.median(s / n for s, n in zip(seconds[name], seconds["none"],
                                                            strict=True))
              for name in scenarios}
    total_events = sum(events_per_round)
    preview_ms.sort()
    return {
        "machine": machine_facts(),
        "parameters": {"events": total_events, "customers": args.customers,
                       "batch_size": args.batch_size, "rounds": rounds,
                       "charges": 10, "previews": args.previews, "store": args.store,
                       "shards": 8},
        "setup_s": round(setup_s, 1),
        "ingest_events_per_s": {name: round(total_events / sum(seconds[name]))
                                for name in scenarios},
        "ingest_time_ratio_to_none": {name: round(ratio, 3) for name, ratio in ratios.items()},
        # The whole run's time over "none"'s, and the slowest round's: the median hides
        # the rounds that hold a checkpoint or a full garbage collection.
        "ingest_total_time_ratio_to_none": {
            name: round(sum(seconds[name]) / sum(seconds["none"]), 3) for name in scenarios},
        "slowest_round_s": {name: round(max(seconds[name]), 3) for name in scenarios},
        "invoice_preview_ms": {"median": round(statistics.median(preview_ms), 3),
                               "p99": round(percentile(preview_ms, 0.99), 3)},
        "alerts": alerts,
    }


async def preview_at_state(args: argparse.Namespace) -> dict[str, Any]:
    """Invoice previews on one engine holding ``--preview-events`` events of the suite's
    recovery workload (``--preview-customers`` customers, ``--preview-meters`` meters of
    mixed aggregations: the 10M-event suite state by default), streamed in with
    ``--in-flight`` batches at a time. Every customer is on the plan of 10 charges."""
    stream = WorkloadStream(args.seed, customers=args.preview_customers,
                            meters=args.preview_meters, events=args.preview_events,
                            batch_size=args.batch_size, aggregations=AGGREGATIONS_MIXED)
    clock = lambda: stream.now_ms  # noqa: E731 - the workload's own now
    async with AsyncExitStack() as stack:
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pricing-state-"))
        eng = await stack.enter_async_context(open_engine(data_dir, shards=8, clock_ms=clock,
                                                          snapshot_on_close=False))
        for meter in stream.meters:
            await eng.define_meter(meter)
        await eng.define_plan(ten_charges([m.name for m in stream.meters]))

        async def assign(customers: list[str]) -> None:
            for customer in customers:
                await eng.assign_plan(customer, "bench", effective_from_ms=stream.now_ms)

        async with trio.open_nursery() as nursery:  # 64 at a time: shared group commits
            for lane in range(64):
                nursery.start_soon(assign, stream.customer_ids[lane::64])
        began = time.perf_counter()
        slots = trio.Semaphore(args.in_flight)

        async def one(batch: list[Any]) -> None:
            try:
                await eng.ingest(batch)
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for batch in stream.batches():
                await slots.acquire()
                nursery.start_soon(one, batch)
        ingest_s = time.perf_counter() - began
        customers = [stream.customer_ids[0], stream.customer_ids[len(stream.customer_ids) // 2]]
        preview_ms: list[float] = []
        for index in range(args.previews):
            began = time.perf_counter()
            await eng.invoice(customers[index % 2], stream.now_ms)
            preview_ms.append((time.perf_counter() - began) * 1000)
        preview_ms.sort()
        return {"machine": machine_facts(),
                "parameters": {"events": stream.produced, "customers": args.preview_customers,
                               "meters": args.preview_meters, "batch_size": args.batch_size,
                               "in_flight": args.in_flight, "charges": 10,
                               "previews": args.previews, "store": "lmdb", "shards": 8},
                "ingest_s": round(ingest_s, 1),
                "invoice_preview_ms": {"median": round(statistics.median(preview_ms), 3),
                                       "p99": round(percentile(preview_ms, 0.99), 3)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=2_000)
    parser.add_argument("--batches-per-round", type=int, default=25)
    parser.add_argument("--previews", type=int, default=400)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--store", choices=["lmdb", "memory"], default="lmdb")
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--preview-events", type=int, default=0,
                        help="only the invoice preview, at this many events of the suite's "
                             "recovery workload (10000000: the 10M-event suite state)")
    parser.add_argument("--preview-customers", type=int, default=100_000)
    parser.add_argument("--preview-meters", type=int, default=10)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args(argv)
    if args.preview_events:
        found = trio.run(preview_at_state, args)
        print(json.dumps(found, indent=2))
        if args.json:
            args.json.write_text(json.dumps(found, indent=2) + "\n")
        return 0
    if args.quick:
        args.events, args.customers, args.previews = 20_000, 300, 20
        args.batch_size, args.batches_per_round = 1_000, 5
    results = trio.run(measure, args)
    print(f"{'scenario':<16}{'events/s':>12}{'median round / none':>22}{'total / none':>14}"
          f"{'slowest round s':>17}")
    for name, rate in results["ingest_events_per_s"].items():
        print(f"{name:<16}{rate:>12,}{results['ingest_time_ratio_to_none'][name]:>22.3f}"
              f"{results['ingest_total_time_ratio_to_none'][name]:>14.3f}"
              f"{results['slowest_round_s'][name]:>17.3f}")
    preview = results["invoice_preview_ms"]
    print(f"invoice preview, 10 charges: median {preview['median']} ms, p99 {preview['p99']} ms")
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
