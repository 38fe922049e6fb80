"""Benchmark: a large ``cancel_where`` and the acks of other customers meanwhile.

Ingests ``--events`` events of one customer (batches of 10,000, spread over a few
hours) into a real LMDB store, then runs ``cancel_where`` over all of them while a
second task ingests small batches for other customers, and reports how long the
cancel took and the ack latencies of the other customers' batches during it
(median, p99, max). Target (issue 15): 1M events in <= 10 s, other acks <= 100 ms.
With ``--sealed`` the events lie three days before the engine's clock, outside the
hot window: they arrive as late events, and the benchmark waits until background
compaction has merged them into sealed blocks and a checkpoint has written those
(``settle_s``) before the cancel, which then rewrites sealed days.

    .venv/bin/python -m benchmarks.corrections --events 1000000
    .venv/bin/python -m benchmarks.corrections --events 1000000 --sealed
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import trio

from engine import Event, Meter, Query, open_engine

START_MS = 1_760_000_000_000
BATCH = 10_000


SEALED_AGO_MS = 3 * 86_400_000
SETTLE_TIMEOUT_S = 300


async def _settle(eng: Any) -> None:
    """Until no late bucket waits for compaction and every block is written (only
    statistics are read meanwhile: a query would postpone idle compaction)."""
    with trio.fail_after(SETTLE_TIMEOUT_S):
        while True:
            stats = eng.statistics()
            if not stats.delta_buckets and not stats.blocks_unwritten:
                return
            await trio.sleep(0.1)


async def run(events: int, shards: int, sealed: bool = False) -> dict[str, Any]:
    now = [START_MS + 6 * 3_600_000 + (SEALED_AGO_MS if sealed else 0)]
    with tempfile.TemporaryDirectory() as data_dir:
        async with open_engine(data_dir, shards=shards, clock_ms=lambda: now[0]) as eng:
            await eng.define_meter(Meter(name="calls", aggregation="sum"))
            started = time.perf_counter()
            for first in range(0, events, BATCH):
                await eng.ingest([
                    Event(meter_api_name="calls", customer_id="bulk", meter_value=1,
                          meter_time_in_millis=START_MS + (i * 17) % (5 * 3_600_000),
                          dimensions={"region": "eu"}, unique_id=f"b-{i}")
                    for i in range(first, min(events, first + BATCH))])
            ingest_s = time.perf_counter() - started
            settle_s = 0.0
            if sealed:
                started = time.perf_counter()
                await _settle(eng)
                settle_s = time.perf_counter() - started
                assert eng.statistics().sealed_before_ms > START_MS + 5 * 3_600_000
            latencies: list[float] = []
            done = trio.Event()

            async def others() -> None:
                n = 0
                while not done.is_set():
                    batch = [Event(meter_api_name="calls", customer_id=f"c-{n % 7}",
                                   meter_value=1, meter_time_in_millis=START_MS + n)
                             for _ in range(10)]
                    sent = time.perf_counter()
                    await eng.ingest(batch)
                    latencies.append(time.perf_counter() - sent)
                    n += 1
                    await trio.sleep(0.005)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(others)
                started = time.perf_counter()
                cancelled = await eng.cancel_where("calls", customer_id="bulk",
                                                   start_ms=START_MS, end_ms=now[0], by="bench")
                cancel_s = time.perf_counter() - started
                done.set()
            rows = (await eng.query(Query(meter_api_name="calls", start_ms=START_MS,
                                          end_ms=now[0], filter={"customer_id": ["bulk"]}))).rows
            assert cancelled == events and not rows, (cancelled, rows)
    ordered = sorted(latencies)
    return {
        "events": events, "shards": shards, "sealed": sealed,
        "ingest_s": round(ingest_s, 3), "settle_s": round(settle_s, 3),
        "cancel_where_s": round(cancel_s, 3), "other_acks": len(latencies),
        "other_ack_median_ms": round(statistics.median(ordered) * 1000, 2) if ordered else None,
        "other_ack_p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2) if ordered else None,
        "other_ack_max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--sealed", action="store_true",
                        help="cancel events of sealed days (three days before the clock)")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]} on {platform.machine()} {platform.system()}")
    result = trio.run(run, args.events, args.shards, args.sealed)
    for key, value in result.items():
        print(f"{key:>22}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
