"""History growth: what the engine's cost does as simulated days of steady traffic pile up.

Benchmark script (not collected by pytest; ``tests/test_growth_smoke.py`` runs it
on a tiny configuration). It is the measuring tool of the "history without
growth" work: run against today's engine it gives the baseline, and the same
command measures the rewrite.

**Traffic** (``Traffic``, deterministic: every event is a pure function of
(customer, meter, minute), so nothing sent has to be kept to make retries of
it): N customers, each with a region; meters from ``--meters`` (default one
``sum`` and one ``unique_count`` meter, whose unique dimension ``user`` takes
``--distinct-per-customer-day`` values per customer per UTC day, half of them
the customer's regulars, half new that day); one event per customer per meter
per simulated minute, every event with a 36-character unique id. On top:

- **late events**: ``--late-fraction`` of the originals (default 0.5 %) are held
  back and delivered 10 minutes to 34 days later (inside the 35-day late limit);
- **retries**: ``--retry-fraction`` (default 1 %) extra sends of an event already
  delivered, with its unique id: 60 % of an event of the last hour, 40 % of one
  1 to 34 days old ("old retries"); 30 % of all retries carry a changed
  timestamp (the current minute). Every retry must be counted as a duplicate.

**Time is simulated**: the engine's ``clock_ms`` follows the traffic (the end
of the last minute generated), so a simulated day takes as long as its 288k
events (at 100 customers, 2 meters) take to ingest. Each meter has a day, a
month and a total limit (every customer), so limit state grows as it would.

**Processes**: the engine runs embedded in a *worker* child process (this
script with ``--worker``) that generates the traffic itself and ingests it with
``--in-flight`` concurrent ``eng.ingest`` calls (submitted in generation order,
checked by the acks' lsns), default shards (8) and snapshot threshold. At each
checkpoint day it stops between acknowledged batches and reports; the parent
then measures a **restart after SIGKILL**: it copies the data directory (every
acknowledged commit was fsynced and no write transaction is open, so the copy
is byte for byte what a SIGKILL at that moment leaves; LMDB's ``lock.mdb`` is
not copied, as a crash leaves no live reader), spawns a fresh child on the copy
(``--restart-probe``) that opens the engine and answers one query, and takes
spawn → first answer received; the answer must equal the live worker's; then
the child is SIGKILLed. The live worker is never restarted, so its memory is
that of a process that has run the whole history. The restart child's peak RSS
(VmHWM) is reported too. During a restart probe both processes are alive: the
machine needs about twice the worker's memory.

Per checkpoint: RSS, RssAnon and peak (``/proc/self/status`` of the worker,
taken before that checkpoint's queries: the state's memory), RAM per event of
history ((RssAnon - RssAnon of the empty engine) / events accepted) and per event
since the previous checkpoint, RssAnon again after the queries (whole-history
queries build large transient results whose pages the allocator keeps), ingest events/s (wall
time, the traffic generation in the same thread included; ``generation_s`` says how
much of it was generation), ack p50/p99/max over every batch of the interval
(snapshots included; acks that overlapped a snapshot are also given apart),
the longest event-loop stall (a task sleeping 1 ms in a loop records its
overshoots), snapshots taken, LMDB ``data.mdb`` bytes per accepted event,
restart time, and query times for three shapes on every meter: (a) one
customer's whole history by day, (b) the top 10 customers over the whole
history, (c) the last 30 days by day grouped by region; the first (cold) run
and p50/p99 of ``--query-runs`` warm runs (fewer if ``--query-budget-s`` runs
out: the count is reported). Answers are checked against a model the traffic
keeps (events accepted and duplicates against the traffic's counts, the probe
customer's days on every meter, every customer's sum totals, region by day on
sum meters).

Then a **paced** run on the final state: ``--pace-events-per-s`` for
``--pace-seconds``, batches started on a fixed schedule (open loop: ack time
is measured from each batch's scheduled start, so a stalled loop is not
hidden), with one ``eng.snapshot()`` forced at mid-run (``--no-pace-snapshot``
to skip it): automatic checkpoints come every 16 MiB of WAL or more (twice what
the last one wrote), so a short paced run might otherwise miss one; the forced
one seals on every shard.

    python benchmarks/growth.py --quick                       # ~1-3 min: 4 days, 20 customers
    python benchmarks/growth.py --days 16 --checkpoint-days 1,8,16
    python benchmarks/growth.py                               # 64 days, 100 customers: hours,
                                                              # 2 x 8-11 GiB today
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import itertools
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import trio

from benchmarks.ingest import BenchmarkFailure, machine_facts, percentile
from engine import Event, Limit, Meter, Query, Take, open_engine
from engine.runtime.engine import DEFAULT_SNAPSHOT_EVERY_BYTES
from engine.schema import QueryResult

REPO_ROOT = Path(__file__).resolve().parent.parent
MINUTE_MS = 60_000
DAY_MINUTES = 1440
DAY_MS = DAY_MINUTES * MINUTE_MS
START_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)  # simulated day 0
REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south")
UNIQUE_DIMENSION = "user"
# Late events arrive this many minutes after their own minute (all inside the 35-day limit).
LATE_DELAYS_MIN = (10, 60, 360, DAY_MINUTES, 3 * DAY_MINUTES, 7 * DAY_MINUTES,
                   20 * DAY_MINUTES, 34 * DAY_MINUTES)
OLD_RETRY_MAX_MIN = 34 * DAY_MINUTES
MESSAGE = "GROWTH "  # prefix of the worker's report lines on stdout
STALL_RECORD_S = 0.020  # event-loop stalls at least this long are counted
# The paced run gives up (and says so) when this many batches wait for their acks.
MAX_PACED_OUTSTANDING = 64
# ... or when its schedule is this far behind real time (the loop itself was held up).
MAX_PACED_LAG_S = 120.0

QUICK = {"days": 4, "customers": 20, "checkpoint_days": [1, 2, 4],
         "distinct_per_customer_day": 100, "query_runs": 20, "query_budget_s": 3.0,
         "pace_seconds": 10.0, "timeout_s": 900.0}
FULL = {"days": 64, "customers": 100, "checkpoint_days": [1, 8, 16, 32, 64],
        "distinct_per_customer_day": 1000, "query_runs": 50, "query_budget_s": 30.0,
        "pace_seconds": 60.0, "timeout_s": 4 * 3600.0}


# ------------------------------------------------------------------- traffic


class SimClock:
    """The engine's clock: the simulated time the traffic has reached."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@dataclass
class TrafficModel:
    """What the engine must answer, kept as the originals are generated (small: no ids)."""

    probe_customer: str
    sum_meters: list[str]
    unique_meters: list[str]
    originals: int = 0
    retries: int = 0
    # meter -> customer -> total; meter -> (day, region) -> total
    totals: dict[str, dict[str, int]] = field(default_factory=dict)
    region_days: dict[str, dict[tuple[int, str], int]] = field(default_factory=dict)
    # meter -> day -> value (sum) or set of users (unique_count), probe customer only
    probe_days: dict[str, dict[int, Any]] = field(default_factory=dict)


class Traffic:
    """The benchmark's event stream, minute by minute, deterministic in ``seed``."""

    def __init__(self, *, seed: int, customers: int, aggregations: Sequence[str],
                 distinct_per_customer_day: int, late_fraction: float = 0.005,
                 retry_fraction: float = 0.01, changed_ts_fraction: float = 0.3,
                 old_retry_fraction: float = 0.4) -> None:
        if not 1 <= distinct_per_customer_day <= DAY_MINUTES:
            raise ValueError("distinct values per customer and day must be 1..1440 "
                             "(one event per customer, meter and minute)")
        self.seed = seed
        self.customers = customers
        self.customer_ids = [f"cust-{c:05d}" for c in range(customers)]
        self.regions = [REGIONS[c % len(REGIONS)] for c in range(customers)]
        self.meters = [
            Meter(name=f"{aggregation}_{index}", aggregation=aggregation,  # type: ignore[arg-type]
                  unique_dimension=UNIQUE_DIMENSION if aggregation == "unique_count" else None)
            for index, aggregation in enumerate(aggregations)]
        self.unique = [m.aggregation == "unique_count" for m in self.meters]
        self.distinct = distinct_per_customer_day
        self.late_fraction = late_fraction
        self.retry_fraction = retry_fraction
        self.changed_ts_fraction = changed_ts_fraction
        self.old_retry_fraction = old_retry_fraction
        self.next_minute = 0
        self._late_cache: dict[int, dict[tuple[int, int], int]] = {}
        self.model = TrafficModel(
            self.customer_ids[0],
            [m.name for m, u in zip(self.meters, self.unique, strict=True) if not u],
            [m.name for m, u in zip(self.meters, self.unique, strict=True) if u])
        for meter, unique in zip(self.meters, self.unique, strict=True):
            self.model.probe_days[meter.name] = {}
            if not unique:
                self.model.totals[meter.name] = dict.fromkeys(self.customer_ids, 0)
                self.model.region_days[meter.name] = {}

    # --- pure functions of (customer, meter, minute)

    def late_set(self, minute: int) -> dict[tuple[int, int], int]:
        """(customer, meter) -> delay in minutes, for the originals of ``minute`` held back."""
        cached = self._late_cache.get(minute)
        if cached is not None:
            return cached
        rng = random.Random(self.seed * 1_000_003 + minute * 2 + 1)
        expected = self.customers * len(self.meters) * self.late_fraction
        count = int(expected) + (rng.random() < expected - int(expected))
        held: dict[tuple[int, int], int] = {}
        for _ in range(count):
            key = (rng.randrange(self.customers), rng.randrange(len(self.meters)))
            held[key] = rng.choice(LATE_DELAYS_MIN)
        if len(self._late_cache) > 4096:
            self._late_cache.clear()
        self._late_cache[minute] = held
        return held

    def delivered_minute(self, customer: int, meter: int, minute: int) -> int:
        return minute + self.late_set(minute).get((customer, meter), 0)

    def user_of(self, customer: int, minute: int) -> str:
        day, index = divmod(minute, DAY_MINUTES)
        index %= self.distinct
        if index < self.distinct // 2:
            return f"u{customer}-r{index}"  # a regular: the same every day
        return f"u{customer}-d{day}-{index}"

    def value_of(self, customer: int, meter: int, minute: int) -> int:
        return 1 + (customer * 31 + minute * 17 + meter * 7) % 10

    def event(self, customer: int, meter: int, minute: int,
              timestamp_ms: int | None = None) -> Event:
        offset_ms = (customer * 7919 + meter * 104_729 + minute * 31) % MINUTE_MS
        dimensions = {"region": self.regions[customer]}
        if self.unique[meter]:
            dimensions[UNIQUE_DIMENSION] = self.user_of(customer, minute)
        return Event(
            meter_api_name=self.meters[meter].name, customer_id=self.customer_ids[customer],
            meter_value=self.value_of(customer, meter, minute),
            meter_time_in_millis=(START_MS + minute * MINUTE_MS + offset_ms
                                  if timestamp_ms is None else timestamp_ms),
            dimensions=dimensions,
            unique_id=f"{customer:08x}-{meter:04x}-0000-0000-{minute:012x}")

    # --- the stream

    def _original(self, out: list[Event], customer: int, meter: int, minute: int) -> None:
        out.append(self.event(customer, meter, minute))
        model = self.model
        model.originals += 1
        name = self.meters[meter].name
        day = minute // DAY_MINUTES
        if self.unique[meter]:
            if customer == 0:
                model.probe_days[name].setdefault(day, set()).add(self.user_of(0, minute))
            return
        value = self.value_of(customer, meter, minute)
        model.totals[name][self.customer_ids[customer]] += value
        key = (day, self.regions[customer])
        region_days = model.region_days[name]
        region_days[key] = region_days.get(key, 0) + value
        if customer == 0:
            probe = model.probe_days[name]
            probe[day] = probe.get(day, 0) + value

    def minute_events(self, minute: int) -> list[Event]:
        """Everything sent during simulated ``minute``: originals, late deliveries, retries."""
        out: list[Event] = []
        held = self.late_set(minute)
        for customer in range(self.customers):
            for meter in range(len(self.meters)):
                if (customer, meter) not in held:
                    self._original(out, customer, meter, minute)
        for delay in LATE_DELAYS_MIN:
            if minute - delay >= 0:
                for (customer, meter), held_for in self.late_set(minute - delay).items():
                    if held_for == delay:
                        self._original(out, customer, meter, minute - delay)
        rng = random.Random(self.seed * 1_000_003 + minute * 2)
        expected = self.customers * len(self.meters) * self.retry_fraction
        for _ in range(int(expected) + (rng.random() < expected - int(expected))):
            customer, meter = rng.randrange(self.customers), rng.randrange(len(self.meters))
            if rng.random() < self.old_retry_fraction:
                age = rng.randint(DAY_MINUTES, OLD_RETRY_MAX_MIN)
            else:
                age = rng.randint(1, 60)
            changed = rng.random() < self.changed_ts_fraction
            target = minute - age
            # Only retries of events already delivered: each is then a duplicate, exactly.
            if target < 0 or self.delivered_minute(customer, meter, target) >= minute:
                continue
            timestamp = (START_MS + minute * MINUTE_MS + rng.randrange(MINUTE_MS)
                         if changed else None)
            out.append(self.event(customer, meter, target, timestamp))
            self.model.retries += 1
        return out

    def next_batch(self, batch_size: int, until_minute: int, clock: SimClock) -> list[Event]:
        """Whole minutes from ``next_minute`` until at least ``batch_size`` events."""
        batch: list[Event] = []
        while len(batch) < batch_size and self.next_minute < until_minute:
            batch += self.minute_events(self.next_minute)
            self.next_minute += 1
        clock.now_ms = max(clock.now_ms, START_MS + self.next_minute * MINUTE_MS)
        return batch


def meter_limits(traffic: Traffic) -> list[Limit]:
    """A day, a month and a total limit on every meter, for every customer."""
    limits = []
    distinct = traffic.distinct
    for meter, unique in zip(traffic.meters, traffic.unique, strict=True):
        # sum: ~5.5 per event, ~7,900 per customer and day
        thresholds = ({"day": [distinct // 2 or 1], "month": [5 * distinct],
                       "total": [20 * distinct]} if unique else
                      {"day": [5_000], "month": [100_000, 200_000], "total": [1_000_000]})
        for period, values in thresholds.items():
            limits.append(Limit(id=f"{meter.name}-{period}", meter_api_name=meter.name,
                                thresholds=list(values), period=period))  # type: ignore[arg-type]
    return limits


# ----------------------------------------------------------- worker: measuring


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, VmHWM of a process in bytes (from /proc/<pid>/status)."""
    wanted = {"VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes", "VmHWM": "rss_peak_bytes"}
    result: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in wanted:
            result[wanted[name]] = int(rest.split()[0]) * 1024
    return result


def rows_json(result: QueryResult) -> list[list[Any]]:
    """Rows in a comparable, JSON-able form: [window start, group, value]."""
    return [[row.window_start_ms, sorted(row.group.items()), str(row.value)]
            for row in result.rows]


class StallMonitor:
    """A task that sleeps 1 ms in a loop: its overshoots are the event loop's stalls.

    With ``$GROWTH_STALL_TRACE_S`` set (seconds), a stall longer than that dumps every
    thread's stack to the worker's stderr (``faulthandler``), to see what stalled."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self.count = 0  # stalls of at least STALL_RECORD_S
        self.total_s = 0.0
        trace = os.environ.get("GROWTH_STALL_TRACE_S")
        self.trace_after_s = float(trace) if trace else None

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self.trace_after_s is not None:
                faulthandler.cancel_dump_traceback_later()

    async def _run(self) -> None:
        while True:
            if self.trace_after_s is not None:
                faulthandler.dump_traceback_later(self.trace_after_s)
            before = time.perf_counter()
            await trio.sleep(0.001)
            stall = time.perf_counter() - before - 0.001
            if stall > self.max_s:
                self.max_s = stall
            if stall >= STALL_RECORD_S:
                self.count += 1
                self.total_s += stall

    def report(self) -> dict[str, float]:
        return {"loop_stall_max_ms": self.max_s * 1000, "loop_stalls_over_20ms": self.count,
                "loop_stall_total_s": self.total_s}


class SubmitOrder:
    """Lets concurrent ingest calls start in batch order (so the log order is generation order).

    ``eng.ingest`` hands its batch to the writer before it first yields, so a
    call started before the next one is logged before it; the acks' lsns check it.
    """

    def __init__(self) -> None:
        self.next_index = 0
        self._turns: dict[int, trio.Event] = {}

    async def wait_turn(self, index: int) -> None:
        if self.next_index != index:
            await self._turns.setdefault(index, trio.Event()).wait()

    def advance(self) -> None:
        self.next_index += 1
        turn = self._turns.pop(self.next_index, None)
        if turn is not None:
            turn.set()


def latency_figures(latencies_s: list[float], prefix: str) -> dict[str, float]:
    ordered = sorted(latencies_s)
    return {f"{prefix}_count": len(ordered),
            f"{prefix}_p50_ms": percentile(ordered, 0.50) * 1000,
            f"{prefix}_p99_ms": percentile(ordered, 0.99) * 1000,
            f"{prefix}_max_ms": (ordered[-1] * 1000) if ordered else math.nan}


class Worker:
    """The engine embedded with the traffic: one per benchmark run, in its own process."""

    def __init__(self, args: argparse.Namespace, data_dir: str) -> None:
        self.args = args
        self.data_dir = data_dir
        self.clock = SimClock(START_MS)
        self.traffic = Traffic(seed=args.seed, customers=args.customers,
                               aggregations=args.meters,
                               distinct_per_customer_day=args.distinct_per_customer_day,
                               late_fraction=args.late_fraction,
                               retry_fraction=args.retry_fraction)
        self.sent = self.accepted = self.duplicates = 0
        self.lsns_out_of_order = 0
        self._phase_lsns: dict[int, int] = {}  # batch index in this phase -> its lsn
        self.deadline = time.monotonic() + args.timeout_s

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise BenchmarkFailure(f"worker ran out of its {self.args.timeout_s:.0f} s budget")

    async def _ingest_one(self, eng: Any, order: SubmitOrder, index: int, batch: list[Event],
                          latencies: list[float], snapshot_latencies: list[float],
                          started_at: float | None = None) -> None:
        await order.wait_turn(index)
        snapshots_before = eng.statistics().snapshots
        called = time.perf_counter()
        order.advance()  # the next call can only start once this one has yielded
        ack = await eng.ingest(batch)
        done = time.perf_counter()
        latency = done - (called if started_at is None else started_at)
        latencies.append(latency)
        if eng.statistics().snapshots != snapshots_before:
            snapshot_latencies.append(latency)
        self._phase_lsns[index] = ack.lsn
        self.sent += len(batch)
        self.accepted += ack.accepted
        self.duplicates += ack.duplicates

    def _check_log_order(self) -> None:
        """Batches must be logged in the order they were generated (retries after originals)."""
        lsns = [self._phase_lsns[index] for index in sorted(self._phase_lsns)]
        self.lsns_out_of_order += sum(1 for a, b in itertools.pairwise(lsns) if b <= a)
        self._phase_lsns.clear()

    async def ingest_until(self, eng: Any, until_minute: int) -> dict[str, Any]:
        """Generate and ingest the traffic up to ``until_minute``, ``--in-flight`` at a time."""
        latencies: list[float] = []
        snapshot_latencies: list[float] = []
        order = SubmitOrder()
        monitor = StallMonitor()
        generation_s = 0.0
        events_before, snapshots_before = self.sent, eng.statistics().snapshots
        send, receive = trio.open_memory_channel[tuple[int, list[Event]]](self.args.in_flight)

        async def producer() -> None:
            nonlocal generation_s
            async with send:
                index = 0
                while self.traffic.next_minute < until_minute:
                    self.check_time()
                    started = time.perf_counter()
                    batch = self.traffic.next_batch(self.args.batch_size, until_minute,
                                                    self.clock)
                    generation_s += time.perf_counter() - started
                    await send.send((index, batch))
                    index += 1

        async def consumer() -> None:
            async for index, batch in receive:
                await self._ingest_one(eng, order, index, batch, latencies, snapshot_latencies)

        started = time.perf_counter()
        async with trio.open_nursery() as outer:
            outer.start_soon(monitor.run)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(producer)
                for _ in range(self.args.in_flight):
                    nursery.start_soon(consumer)
            outer.cancel_scope.cancel()
        elapsed_s = time.perf_counter() - started
        self._check_log_order()
        events = self.sent - events_before
        return {"events_sent": events, "ingest_s": elapsed_s, "generation_s": generation_s,
                "events_per_s": events / elapsed_s if elapsed_s else math.nan,
                "events_per_s_without_generation": (
                    events / (elapsed_s - generation_s) if elapsed_s > generation_s
                    else math.nan),
                "snapshots": eng.statistics().snapshots - snapshots_before,
                **latency_figures(latencies, "ack"),
                **latency_figures(snapshot_latencies, "ack_during_snapshot"),
                **monitor.report()}

    def queries(self) -> dict[str, dict[str, Query]]:
        """The three shapes on every meter, over the history so far."""
        day_end_ms = START_MS + math.ceil(self.traffic.next_minute / DAY_MINUTES) * DAY_MS
        month_start_ms = max(START_MS, day_end_ms - 30 * DAY_MS)
        shapes: dict[str, dict[str, Query]] = {}
        for meter in self.traffic.meters:
            shapes[meter.name] = {
                "customer_by_day": Query(
                    meter_api_name=meter.name, start_ms=START_MS, end_ms=day_end_ms,
                    window="day", filter={"customer_id": [self.traffic.model.probe_customer]}),
                "top10_customers": Query(
                    meter_api_name=meter.name, start_ms=START_MS, end_ms=day_end_ms,
                    group_by=["customer_id"], take=Take(limit=10)),
                "month_by_region": Query(
                    meter_api_name=meter.name, start_ms=month_start_ms, end_ms=day_end_ms,
                    window="day", group_by=["region"]),
            }
        return shapes

    async def time_queries(self, eng: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        figures: dict[str, Any] = {}
        answers: dict[str, Any] = {}
        for meter, shapes in self.queries().items():
            for shape, query in shapes.items():
                started = time.perf_counter()
                result = await eng.query(query)
                cold_s = time.perf_counter() - started
                answers[f"{meter}/{shape}"] = rows_json(result)
                warm: list[float] = []
                budget_end = time.perf_counter() + self.args.query_budget_s
                while len(warm) < self.args.query_runs and time.perf_counter() < budget_end:
                    started = time.perf_counter()
                    again = await eng.query(query)
                    warm.append(time.perf_counter() - started)
                    if len(warm) == 1 and rows_json(again) != answers[f"{meter}/{shape}"]:
                        raise BenchmarkFailure(f"{meter}/{shape}: a second run answers otherwise")
                warm.sort()
                figures[f"{meter}/{shape}"] = {
                    "cold_ms": cold_s * 1000, "warm_runs": len(warm),
                    "p50_ms": percentile(warm, 0.5) * 1000,
                    "p99_ms": percentile(warm, 0.99) * 1000}
                self.check_time()
        return figures, answers

    def check_answers(self, eng: Any, answers: dict[str, Any]) -> None:
        """The engine's answers and counters against the traffic's model."""
        model = self.traffic.model
        problems = []
        stats = eng.statistics()
        if self.accepted != model.originals or self.duplicates != model.retries:
            problems.append(f"acks: {self.accepted} accepted, {self.duplicates} duplicates; "
                            f"sent {model.originals} originals and {model.retries} retries")
        if self.accepted + self.duplicates != self.sent:
            problems.append(f"accepted + duplicates != {self.sent} sent")
        if (stats.events_accepted, stats.events_duplicate) != (self.accepted, self.duplicates):
            problems.append("statistics() disagree with the acks")
        if self.lsns_out_of_order:
            problems.append(f"{self.lsns_out_of_order} batches logged out of generation order")
        for meter, days in model.probe_days.items():
            expected = [[START_MS + day * DAY_MS, [["customer_id", model.probe_customer]],
                         str(len(value) if isinstance(value, set) else value)]
                        for day, value in sorted(days.items())]
            got = answers[f"{meter}/customer_by_day"]
            # The engine may group the probe customer's rows by nothing: compare days/values.
            if [(r[0], r[2]) for r in got] != [(r[0], r[2]) for r in expected]:
                problems.append(f"{meter}: the probe customer's days differ from the model")
        for meter, totals in model.totals.items():
            got = answers[f"{meter}/top10_customers"]
            top = sorted(totals.values(), reverse=True)[:10]
            if [int(r[2]) for r in got] != top or any(
                    totals[dict(r[1])["customer_id"]] != int(r[2]) for r in got):
                problems.append(f"{meter}: top 10 customers differ from the model")
            month = answers[f"{meter}/month_by_region"]
            first_day = (month[0][0] - START_MS) // DAY_MS if month else 0
            expected_region = sorted(
                (START_MS + day * DAY_MS, region, value)
                for (day, region), value in model.region_days[meter].items()
                if day >= first_day and value)
            got_region = sorted((r[0], dict(r[1])["region"], int(r[2])) for r in month)
            if got_region != expected_region:
                problems.append(f"{meter}: region by day differs from the model")
        if problems:
            raise BenchmarkFailure("; ".join(problems))

    def disk_figures(self) -> dict[str, float]:
        data_file = Path(self.data_dir) / "lmdb" / "data.mdb"
        info = data_file.stat()
        return {"data_file_bytes": info.st_size, "data_file_allocated_bytes": info.st_blocks * 512,
                "disk_bytes_per_event": info.st_size / max(1, self.accepted)}

    async def checkpoint(self, eng: Any, day: int, baseline_anon: int) -> dict[str, Any]:
        # The parent copies the data directory for the restart measurement while this
        # engine waits: let the dedup index finish its background writes first (a copy
        # of a file being written is torn; a SIGKILL never tears LMDB).
        with trio.fail_after(self.args.timeout_s):
            while eng.statistics().dedup_jobs_pending:
                await trio.sleep(0.05)
        # The block cache full (or holding every block) before memory is read, so that
        # two checkpoints' memory differs by the state, not by how much the cache held.
        cache_fill = fill_block_cache(eng)
        # Memory of the state, before the queries: whole-history queries build large
        # transient results (a month of distinct values per customer) whose pages the
        # allocator keeps afterwards; that figure is reported beside it.
        memory = proc_status()
        figures, answers = await self.time_queries(eng)
        self.check_answers(eng, answers)
        after_queries = proc_status()
        stats = eng.statistics()
        return {
            "day": day, "sim_now_ms": self.clock.now_ms, "events_sent": self.sent,
            "events_accepted": self.accepted, "duplicates": self.duplicates,
            "retries_sent": self.traffic.model.retries,
            **memory,
            "rss_anon_after_queries_bytes": after_queries["rss_anon_bytes"],
            "ram_bytes_per_event": (memory["rss_anon_bytes"] - baseline_anon)
            / max(1, self.accepted),
            **self.disk_figures(),
            "block_cache_fill": cache_fill,
            "series_count": stats.series_count, "bucket_count": stats.bucket_count,
            "snapshots_total": stats.snapshots, "alerts_total": stats.alerts,
            "last_checkpoint": {"bytes": stats.checkpoint_bytes, "ms": stats.checkpoint_ms,
                                "head_chunks": stats.checkpoint_head_chunks,
                                "head_chunks_dropped": stats.checkpoint_head_chunks_dropped},
            "wal_bytes_since_snapshot": stats.wal_bytes_since_snapshot,
            "statistics": dataclasses.asdict(stats),
            "queries": figures,
            "probe_query": msgspec.json.encode(
                self.queries()[self.traffic.meters[0].name]["customer_by_day"]).decode(),
            "probe_answer": answers[f"{self.traffic.meters[0].name}/customer_by_day"],
            "answers": answers if self.args.report_answers else None,
        }

    async def paced(self, eng: Any) -> dict[str, Any]:
        """Open-loop ingest at ``--pace-events-per-s`` for ``--pace-seconds``."""
        rate, seconds = self.args.pace_events_per_s, self.args.pace_seconds
        latencies: list[float] = []
        snapshot_latencies: list[float] = []
        order = SubmitOrder()
        monitor = StallMonitor()
        snapshot: dict[str, float] = {}
        events_before = self.sent
        outstanding_max = 0
        behind = 0
        index = 0

        async def forced_snapshot() -> None:
            await trio.sleep(seconds / 2)
            started = time.perf_counter()
            await eng.snapshot()
            snapshot["snapshot_call_s"] = time.perf_counter() - started

        started = time.perf_counter()
        async with trio.open_nursery() as outer:
            outer.start_soon(monitor.run)
            async with trio.open_nursery() as nursery:
                if self.args.pace_snapshot:
                    nursery.start_soon(forced_snapshot)
                next_start = started
                end = started + seconds
                while next_start < end:
                    self.check_time()
                    await trio.sleep(max(0.0, next_start - time.perf_counter()))
                    batch = self.traffic.next_batch(self.args.batch_size, 1 << 40, self.clock)
                    outstanding = index - len(latencies)
                    outstanding_max = max(outstanding_max, outstanding)
                    if (outstanding > MAX_PACED_OUTSTANDING
                            or time.perf_counter() - next_start > MAX_PACED_LAG_S):
                        behind += 1
                        break
                    nursery.start_soon(self._ingest_one, eng, order, index, batch, latencies,
                                       snapshot_latencies, next_start)
                    index += 1
                    next_start += len(batch) / rate
            outer.cancel_scope.cancel()
        elapsed_s = time.perf_counter() - started
        self._check_log_order()
        events = self.sent - events_before
        return {"target_events_per_s": rate, "seconds": seconds, "events_sent": events,
                "achieved_events_per_s": events / elapsed_s, "elapsed_s": elapsed_s,
                "gave_up_behind_schedule": bool(behind), "outstanding_max": outstanding_max,
                "forced_snapshot": self.args.pace_snapshot, **snapshot,
                **latency_figures(latencies, "ack"),
                **latency_figures(snapshot_latencies, "ack_during_snapshot"),
                **monitor.report()}


def fill_block_cache(eng: Any) -> dict[str, Any]:
    """Decode sealed blocks, newest day first, until the block cache holds its budget
    (or every block): both decoded forms of each, as queries and limits read them.

    Reads the engine's private cache between requests (one trio thread: no shard is in
    the middle of a turn); the figures say whether the cache ended full."""
    cache = eng._blocks
    meters = eng._catalog.meter_defs
    started = time.perf_counter()
    loaded = 0
    blocks = sorted(((day, name, part) for name in meters for part in range(eng.shard_count)
                     for day in cache.days(name, part)), reverse=True)
    for day, name, part in blocks:
        if cache.cached_bytes >= cache.budget_bytes * 0.95:
            break
        cache.load_rollup(meters[name], day, part)
        cache.load(meters[name], day, part)
        loaded += 1
    return {"budget_bytes": cache.budget_bytes, "cached_bytes": cache.cached_bytes,
            "full": cache.cached_bytes >= cache.budget_bytes * 0.95,
            "blocks": len(blocks), "blocks_loaded": loaded,
            "seconds": time.perf_counter() - started}


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(MESSAGE + json.dumps({"kind": kind, **payload}, default=str), flush=True)


async def wait_for_parent(expected: str) -> None:
    line = await trio.to_thread.run_sync(sys.stdin.readline)
    if line.strip() != expected:
        raise BenchmarkFailure(f"worker expected {expected!r} from the parent, got {line!r}")


async def worker_main(args: argparse.Namespace) -> None:
    worker = Worker(args, args.data_dir)
    async with open_engine(args.data_dir, shards=args.shards, clock_ms=worker.clock) as eng:
        for meter in worker.traffic.meters:
            await eng.define_meter(meter)
        if args.limits:
            for limit in meter_limits(worker.traffic):
                await eng.add_limit(limit)
        baseline = proc_status()
        emit("started", {"pid": os.getpid(), **baseline})
        for day in args.checkpoint_days:
            ingest = await worker.ingest_until(eng, day * DAY_MINUTES)
            report = await worker.checkpoint(eng, day, baseline["rss_anon_bytes"])
            emit("checkpoint", {"ingest": ingest, **report})
            await wait_for_parent("continue")
        paced = await worker.paced(eng) if args.pace_seconds > 0 else None
        emit("done", {"paced": paced, **proc_status(), "events_accepted": worker.accepted})
        # The parent SIGKILLs this process: a clean close would write a snapshot first.
        await wait_for_parent("exit")


async def probe_main(args: argparse.Namespace) -> None:
    """Open the engine on a data directory, answer one query, print it, wait to be killed."""
    query = msgspec.json.decode(args.probe_query, type=Query)
    async with open_engine(args.data_dir, shards=args.shards,
                           clock_ms=lambda: args.probe_now_ms) as eng:
        result = await eng.query(query)
        stats = eng.statistics()
        emit("answer", {"rows": rows_json(result), "recovery_ms": stats.recovery_ms,
                        "recovered_wal_bytes": stats.recovered_wal_bytes})
        await wait_for_parent("exit")


# ------------------------------------------------------------ parent: orchestrating


class Child:
    """A child process of this script; its report lines on stdout, stderr to a file."""

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("w")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.spawned = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *argv], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self.pid = self.process.pid
        self._buffer = b""

    def _next_line(self, deadline: float) -> bytes | None:
        """One line of stdout, b"" at its end, None at the deadline (select + os.read:
        a buffered reader could hold a line that select no longer reports)."""
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([stdout], [], [], min(left, 5.0))
            if ready:
                chunk = os.read(stdout.fileno(), 1 << 16)
                if not chunk:
                    return b""
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def message(self, kind: str, timeout_s: float) -> dict[str, Any]:
        """The next report line (skipping anything else printed), within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            raw = self._next_line(deadline)
            if raw is None:
                raise BenchmarkFailure(f"no {kind!r} from child {self.pid} in {timeout_s:.0f} s")
            line = raw.decode()
            if not line:
                raise BenchmarkFailure(f"child {self.pid} exited ({self.process.poll()}) "
                                       f"before {kind!r}: {self.stderr_tail()}")
            if line.startswith(MESSAGE):
                payload: dict[str, Any] = json.loads(line[len(MESSAGE):])
                if payload["kind"] != kind:
                    raise BenchmarkFailure(f"expected {kind!r}, got {payload['kind']!r}")
                return payload

    def tell(self, line: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()[-3000:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()


def copy_data_dir(source: str, target: str) -> None:
    """What a SIGKILL leaves, from an idle engine: every file but LMDB's reader table."""
    shutil.copytree(source, target, ignore=lambda _dir, names: [
        n for n in names if n == "lock.mdb"])


def measure_restart(args: argparse.Namespace, data_dir: str, tmp: Path,
                    checkpoint: dict[str, Any]) -> dict[str, Any]:
    keep = args.keep_restart_copies
    copy = (Path(keep) if keep else tmp) / f"restart-day-{checkpoint['day']}"
    copy_started = time.perf_counter()
    copy_data_dir(data_dir, str(copy))
    # The copy leaves gigabytes of dirty pages; written back behind the probe or the
    # paced run that follows, they would slow every fsync there and time the copy,
    # not the engine. The copy's cost (copy_s) includes this write-back.
    os.sync()
    copy_s = time.perf_counter() - copy_started
    probe = Child(["--restart-probe", "--data-dir", str(copy), "--shards", str(args.shards),
                   "--probe-query", checkpoint["probe_query"],
                   "--probe-now-ms", str(checkpoint["sim_now_ms"])],
                  tmp / f"restart-day-{checkpoint['day']}.stderr")
    try:
        answer = probe.message("answer", args.timeout_s)
        restart_s = time.perf_counter() - probe.spawned
        memory = proc_status(probe.pid)
    finally:
        probe.kill()
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)
    if answer["rows"] != checkpoint["probe_answer"]:
        raise BenchmarkFailure(f"day {checkpoint['day']}: the restarted engine answers "
                               "otherwise than the live one")
    return {"restart_s": restart_s, "restart_recovery_ms": answer["recovery_ms"],
            "restart_wal_tail_bytes": answer["recovered_wal_bytes"],
            "restart_rss_peak_bytes": memory["rss_peak_bytes"],
            "restart_rss_anon_bytes": memory["rss_anon_bytes"], "copy_s": copy_s}


def worker_argv(args: argparse.Namespace, data_dir: str) -> list[str]:
    argv = ["--worker", "--data-dir", data_dir, "--days", str(args.days),
            "--customers", str(args.customers), "--meters", ",".join(args.meters),
            "--distinct-per-customer-day", str(args.distinct_per_customer_day),
            "--shards", str(args.shards), "--checkpoint-days",
            ",".join(map(str, args.checkpoint_days)), "--in-flight", str(args.in_flight),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--late-fraction", str(args.late_fraction),
            "--retry-fraction", str(args.retry_fraction),
            "--query-runs", str(args.query_runs), "--query-budget-s", str(args.query_budget_s),
            "--pace-events-per-s", str(args.pace_events_per_s),
            "--pace-seconds", str(args.pace_seconds), "--timeout-s", str(args.timeout_s)]
    if not args.pace_snapshot:
        argv.append("--no-pace-snapshot")
    if not args.limits:
        argv.append("--no-limits")
    if args.report_answers:
        argv.append("--report-answers")
    return argv


def run(args: argparse.Namespace, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole benchmark; returns the report (the worker's figures plus the restarts)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_facts(), "parameters": parameters(args),
                              "checkpoints": [], "paced": None}
    tmp = Path(tempfile.mkdtemp(prefix="meter-bench-growth-", dir=args.tmpdir))
    worker: Child | None = None
    try:
        data_dir = str(tmp / "data")
        worker = Child(worker_argv(args, data_dir), tmp / "worker.stderr")
        report["empty_engine"] = worker.message("started", 120)
        previous = report["empty_engine"]
        previous_events = 0
        for day in args.checkpoint_days:
            checkpoint = worker.message("checkpoint", args.timeout_s)
            checkpoint["ram_bytes_per_event_since_previous"] = (
                (checkpoint["rss_anon_bytes"] - previous["rss_anon_bytes"])
                / max(1, checkpoint["events_accepted"] - previous_events))
            if args.restart:
                checkpoint.update(measure_restart(args, data_dir, tmp, checkpoint))
            report["checkpoints"].append(checkpoint)
            log(f"day {day}: {checkpoint['events_accepted']:,} events, RssAnon "
                f"{checkpoint['rss_anon_bytes'] / 2**20:,.0f} MiB, "
                f"{time.perf_counter() - started:.0f} s since start")
            previous, previous_events = checkpoint, checkpoint["events_accepted"]
            worker.tell("continue")
        done = worker.message("done", args.timeout_s)
        report["paced"] = done["paced"]
        report["final_memory"] = {k: done[k] for k in
                                  ("rss_bytes", "rss_anon_bytes", "rss_peak_bytes")}
    except BenchmarkFailure:
        if worker is not None:
            log(f"worker stderr: {worker.stderr_tail()}")
        raise
    finally:
        if worker is not None:
            worker.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - started
    return report


# ------------------------------------------------------------------- output


def parameters(args: argparse.Namespace) -> dict[str, Any]:
    events_per_day = args.customers * len(args.meters) * DAY_MINUTES
    return {"days": args.days, "customers": args.customers, "meters": args.meters,
            "distinct_per_customer_day": args.distinct_per_customer_day,
            "shards": args.shards, "checkpoint_days": args.checkpoint_days,
            "in_flight": args.in_flight, "batch_size": args.batch_size, "seed": args.seed,
            "late_fraction": args.late_fraction, "retry_fraction": args.retry_fraction,
            "original_events_per_day": events_per_day, "query_runs": args.query_runs,
            "query_budget_s": args.query_budget_s,
            "pace_events_per_s": args.pace_events_per_s, "pace_seconds": args.pace_seconds,
            "pace_snapshot": args.pace_snapshot, "restart": args.restart,
            "limits": "a day, a month and a total limit per meter" if args.limits else "none",
            "snapshot_every_bytes": "engine default "
                                    f"({DEFAULT_SNAPSHOT_EVERY_BYTES >> 20} MiB)"}


def _mib(value: float) -> str:
    return "-" if math.isnan(value) else f"{value / 2**20:,.0f}"


def _ms(value: float) -> str:
    """Milliseconds for the tables; a dash where nothing was measured (no ack in a snapshot)."""
    return "-" if math.isnan(value) else f"{value:,.0f}"


def format_tables(report: dict[str, Any]) -> str:
    lines = ["| day | events accepted | RSS MiB | RssAnon MiB | peak MiB | RAM B/event "
             "| since prev B/event | RssAnon after queries MiB | ingest ev/s "
             "| ack p50 / p99 / max ms | snapshots "
             "| ack max in snapshot ms | loop stall max ms | disk B/event | block cache MiB "
             "| restart s | restart WAL tail MiB | restart peak MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
             "---:|---:|"]
    for c in report["checkpoints"]:
        ingest = c["ingest"]
        restart = (f"{c['restart_s']:.2f}", _mib(c.get("restart_wal_tail_bytes", math.nan)),
                   _mib(c["restart_rss_peak_bytes"])) if "restart_s" in c else ("", "", "")
        fill = c.get("block_cache_fill")
        cache = (f"{_mib(fill['cached_bytes'])} ({'full' if fill['full'] else 'all blocks'})"
                 if fill else "")
        lines.append(
            f"| {c['day']} | {c['events_accepted']:,} | {_mib(c['rss_bytes'])} "
            f"| {_mib(c['rss_anon_bytes'])} | {_mib(c['rss_peak_bytes'])} "
            f"| {c['ram_bytes_per_event']:.0f} | {c['ram_bytes_per_event_since_previous']:.0f} "
            f"| {_mib(c.get('rss_anon_after_queries_bytes', math.nan))} "
            f"| {ingest['events_per_s']:,.0f} | {ingest['ack_p50_ms']:.1f} / "
            f"{ingest['ack_p99_ms']:.1f} / {ingest['ack_max_ms']:,.0f} | {ingest['snapshots']} "
            f"| {_ms(ingest['ack_during_snapshot_max_ms'])} | {ingest['loop_stall_max_ms']:,.0f} "
            f"| {c['disk_bytes_per_event']:.0f} | {cache} | {restart[0]} | {restart[1]} "
            f"| {restart[2]} |")
    lines += ["", "| day | meter | query | cold ms | warm p50 ms | warm p99 ms | warm runs |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for c in report["checkpoints"]:
        for name, q in c["queries"].items():
            meter, shape = name.split("/")
            lines.append(f"| {c['day']} | {meter} | {shape} | {q['cold_ms']:,.1f} "
                         f"| {q['p50_ms']:,.1f} | {q['p99_ms']:,.1f} | {q['warm_runs']} |")
    paced = report.get("paced")
    if paced:
        lines += ["", "| paced target ev/s | achieved ev/s | seconds | ack p50 / p99 / max ms "
                  "| acks in snapshot | ack max in snapshot ms | snapshot() s "
                  "| loop stall max ms |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|",
                  f"| {paced['target_events_per_s']:,} | {paced['achieved_events_per_s']:,.0f} "
                  f"| {paced['elapsed_s']:.1f} | {paced['ack_p50_ms']:.1f} / "
                  f"{paced['ack_p99_ms']:.1f} / {paced['ack_max_ms']:,.0f} "
                  f"| {paced['ack_during_snapshot_count']} "
                  f"| {_ms(paced['ack_during_snapshot_max_ms'])} "
                  f"| {paced.get('snapshot_call_s', math.nan):.2f} "
                  f"| {paced['loop_stall_max_ms']:,.0f} |"]
    return "\n".join(lines)


# ------------------------------------------------------------------- arguments


def _int_list(text: str) -> list[int]:
    values = sorted({int(part) for part in text.split(",") if part.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,16, got {text!r}")
    return values


def _meters(text: str) -> list[str]:
    meters = [part.strip() for part in text.split(",") if part.strip()]
    if not meters or any(m not in ("sum", "unique_count") for m in meters):
        raise argparse.ArgumentTypeError("meters: a comma list of sum and unique_count")
    return meters


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 days, 20 customers, checkpoints 1,2,4 (~1-3 min)")
    parser.add_argument("--days", type=int, help="simulated days (full 64, quick 4)")
    parser.add_argument("--customers", type=int, help="customers (full 100, quick 20)")
    parser.add_argument("--meters", type=_meters, default=["sum", "unique_count"],
                        help="aggregations of the meters, comma separated "
                             "(default sum,unique_count)")
    parser.add_argument("--distinct-per-customer-day", type=int,
                        dest="distinct_per_customer_day",
                        help="distinct unique-dimension values per customer and day, 1..1440 "
                             "(full 1000, quick 100)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--checkpoint-days", type=_int_list, dest="checkpoint_days",
                        help="days to measure at (full 1,8,16,32,64; the last day is always "
                             "one)")
    parser.add_argument("--in-flight", type=int, default=4, dest="in_flight")
    parser.add_argument("--batch-size", type=int, default=1000, dest="batch_size",
                        help="events per batch, at least (whole minutes; default 1000)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--late-fraction", type=float, default=0.005, dest="late_fraction")
    parser.add_argument("--retry-fraction", type=float, default=0.01, dest="retry_fraction")
    parser.add_argument("--query-runs", type=int, dest="query_runs",
                        help="warm runs per query shape and meter (full 50, quick 20)")
    parser.add_argument("--query-budget-s", type=float, dest="query_budget_s",
                        help="time budget of the warm runs per shape and meter "
                             "(full 30, quick 3)")
    parser.add_argument("--pace-events-per-s", type=int, default=10_000,
                        dest="pace_events_per_s")
    parser.add_argument("--pace-seconds", type=float, dest="pace_seconds",
                        help="paced run on the final state (full 60, quick 10; 0 skips it)")
    parser.add_argument("--no-pace-snapshot", action="store_false", dest="pace_snapshot",
                        help="do not force a snapshot in the middle of the paced run")
    parser.add_argument("--no-limits", action="store_false", dest="limits",
                        help="define no limits (to see what they cost)")
    parser.add_argument("--no-restart", action="store_false", dest="restart",
                        help="skip the restart measurement (it doubles the memory needed)")
    parser.add_argument("--timeout-s", type=float, dest="timeout_s",
                        help="budget of the whole run (full 4 h, quick 15 min)")
    parser.add_argument("--tmpdir", help="where the temporary data directories go")
    parser.add_argument("--keep-restart-copies", metavar="DIR",
                        help="keep each restart's copy of the data directory here "
                             "(restart-day-N), to profile a restart on it afterwards")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON report here")
    parser.add_argument("--report-answers", action="store_true", dest="report_answers",
                        help="include every query answer in the JSON (for tests)")
    # Internal: the child processes.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--restart-probe", action="store_true", dest="restart_probe",
                        help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", dest="data_dir", help=argparse.SUPPRESS)
    parser.add_argument("--probe-query", dest="probe_query", help=argparse.SUPPRESS)
    parser.add_argument("--probe-now-ms", type=int, dest="probe_now_ms", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.checkpoint_days = sorted({d for d in args.checkpoint_days if d <= args.days}
                                  | {args.days})
    if args.days < 1 or args.customers < 1 or args.in_flight < 1 or args.batch_size < 1:
        parser.error("--days, --customers, --in-flight and --batch-size must be positive")
    if not 1 <= args.distinct_per_customer_day <= DAY_MINUTES:
        parser.error("--distinct-per-customer-day must be 1..1440")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        trio.run(worker_main, args)
        return 0
    if args.restart_probe:
        trio.run(probe_main, args)
        return 0
    print(json.dumps({"machine": machine_facts(), "parameters": parameters(args)}, indent=2))
    try:
        report = run(args)
    except BenchmarkFailure as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    print(format_tables(report))
    print(f"wall time {report['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
