"""Crash safety of a real server process under concurrent TCP ingest.

A ``python -m engine serve`` subprocess takes batches from several client
connections at once (each connection pipelines a few producers, each sending
its own numbered batches with unique ids) and is killed with SIGKILL at random
moments. After every restart, before anyone ingests again:

- every acknowledged batch is there exactly once (its per-batch values equal
  what was sent: a double count would double them);
- every unacknowledged batch is wholly present or wholly absent (each batch
  carries its own ``batch`` dimension, so one query per meter tells);
- the alert log is gap-free from seq 0, holds every alert seen before the kill
  (in an ack or pushed to a subscriber) with the same seq and content, has each
  (limit, customer, period, threshold) once, and equals what a simple model
  predicts from the usage actually present.

Producers then retry their unacknowledged batch with the same unique ids (the
ack must say "all duplicates" if it was present, "all accepted" if not), and at
the end the totals per customer equal everything sent and the alerts equal the
model's prediction from those totals.

SIGTERM during heavy ingest must drain in-flight requests, exit 0, lose no
acknowledged batch and leave a snapshot, so the next start replays no WAL.

The slow variants kill 25 times, and measure the restart time after a SIGKILL
with a million events in the WAL (printed; run with ``-s`` to see it).
"""

from __future__ import annotations

import functools
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from engine import Alert, Engine, Event, IngestAck, Limit, Meter, Query
from engine.client import Client, open_client
from engine.errors import ConnectionLost
from engine.runtime.engine import DEFAULT_SNAPSHOT_EVERY_BYTES
from engine.runtime.writer import MAX_GROUP_BYTES
from tests.helpers import serve
from tests.helpers.events import DAY, MINUTE
from tests.helpers.serve import HOST, ServerProcess

METERS = [
    Meter(name="calls", aggregation="sum"),
    Meter(name="hits", aggregation="count"),
    Meter(name="peak", aggregation="max"),
    Meter(name="users", aggregation="unique_count", unique_dimension="user"),
]
AGGREGATION = {meter.name: meter.aggregation for meter in METERS}
# Thresholds chosen so that some are crossed within a few batches, some late in
# the run, and the top ones never: the model must predict both.
LIMITS = [
    Limit(id="calls-total", meter_api_name="calls", thresholds=[1_000, 5_000, 20_000, 10**12],
          period="total"),
    Limit(id="hits-day", meter_api_name="hits", thresholds=[20, 80, 300, 10**9], period="day"),
    Limit(id="peak-total", meter_api_name="peak", thresholds=[900_000, 999_000, 10**9],
          period="total"),
    Limit(id="users-day", meter_api_name="users", thresholds=[30, 120, 280, 10**6],
          period="day"),
]
USERS_PER_CUSTOMER = 300
CUSTOMERS_PER_PRODUCER = 3


# ------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """Deterministic batches: batch ``number`` of ``producer`` is always the same events."""

    base_ms: int  # every event lies in [base_ms - 10 min, base_ms]
    events_per_batch: int

    def batch(self, producer: int, number: int) -> list[Event]:
        rng = random.Random(f"{producer}/{number}")
        pool = [f"p{producer}-c{j}" for j in range(CUSTOMERS_PER_PRODUCER)]
        customers = rng.sample(pool, 2)  # a batch spans two customers, so usually two shards
        label = f"{producer}-{number}"
        events = []
        for index in range(self.events_per_batch):
            meter = METERS[index % len(METERS)].name
            value = {"calls": rng.randint(1, 100), "hits": 1,
                     "peak": rng.randint(0, 1_000_000), "users": 1}[meter]
            dimensions = {"batch": label}
            if meter == "users":
                dimensions["user"] = f"u{rng.randrange(USERS_PER_CUSTOMER)}"
            events.append(Event(
                meter_api_name=meter, customer_id=rng.choice(customers), meter_value=value,
                meter_time_in_millis=self.base_ms - rng.randint(0, 10 * MINUTE),
                dimensions=dimensions, unique_id=f"{label}-{index}",
            ))
        return events


# Usage as parts that merge: (meter, customer, UTC day start) -> a sum, a count, a
# max, or the set of distinct users. Parts of a set of batches merge into the usage
# of any (customer, period) that is a union of days.
Parts = dict[tuple[str, str, int], Any]


def merge_into(into: Parts, parts: Parts) -> None:
    for key, value in parts.items():
        aggregation = AGGREGATION[key[0]]
        if key not in into:
            into[key] = set(value) if aggregation == "unique_count" else value
        elif aggregation == "max":
            into[key] = max(into[key], value)
        elif aggregation == "unique_count":
            into[key] |= value
        else:
            into[key] += value


def usage(parts: Parts, key: Any) -> dict[Any, int]:
    """The naive aggregation of ``parts`` grouped by ``key((meter, customer, day))``."""
    grouped: dict[Any, Parts] = defaultdict(dict)
    for part_key, value in parts.items():
        merge_into(grouped[key(part_key)], {(part_key[0], "", 0): value})
    return {group: (len(value) if isinstance(value, set) else value)
            for group, merged in grouped.items() for value in merged.values()}


@dataclass(frozen=True)
class BatchSummary:
    rows: dict[tuple[str, str], int]  # what the engine must answer: (meter, customer) -> value
    parts: Parts


@functools.cache
def summarize(workload: Workload, producer: int, number: int) -> BatchSummary:
    parts: Parts = {}
    for event in workload.batch(producer, number):
        value = event.meter_value
        assert isinstance(value, int)
        aggregation = AGGREGATION[event.meter_api_name]
        if aggregation == "count":
            value = 1
        elif aggregation == "unique_count":
            value = frozenset([event.dimensions["user"]])
        day = event.meter_time_in_millis - event.meter_time_in_millis % DAY
        merge_into(parts, {(event.meter_api_name, event.customer_id, day): value})
    rows = usage(parts, lambda key: (key[0], key[1]))
    return BatchSummary(rows, parts)


def model_alerts(parts: Parts) -> set[tuple[str, str, int, int]]:
    """(limit, customer, period start, threshold) for every threshold the usage reaches.

    Every meter here only grows, so a threshold fired at some batch iff the final
    usage of its period reaches it, whatever the order of the batches.
    """
    expected = set()
    for limit in LIMITS:
        assert limit.period in ("total", "day") and limit.timezone == "UTC"
        mine = {key: value for key, value in parts.items() if key[0] == limit.meter_api_name}
        totals = usage(mine, lambda key, period=limit.period: (
            key[1], 0 if period == "total" else key[2]))
        for (customer, period_start_ms), value in totals.items():
            for threshold in limit.thresholds:
                assert isinstance(threshold, int)
                if value >= threshold:
                    expected.add((limit.id, customer, period_start_ms, threshold))
    return expected


def alert_key(alert: Alert) -> tuple[str, str, int, int]:
    threshold = alert.threshold
    assert isinstance(threshold, int)
    return (alert.limit_id, alert.customer_id, alert.period_start_ms, threshold)


# ------------------------------------------------------------------ producers


@dataclass
class Producer:
    """Sends its batches in order, one at a time, and remembers what was acknowledged.

    A batch whose ack never came (the connection died) stays ``unacked`` and is
    retried first, with the same unique ids, on the next connection.
    """

    id: int
    workload: Workload
    next_number: int = 0
    acked: set[int] = field(default_factory=set)
    unacked: int | None = None
    # Found present (True) or absent (False) after a restart: what its retry's ack must say.
    unacked_present: bool | None = None
    in_flight: bool = False
    acks_after: list[float] = field(default_factory=list)  # perf_counter of every ack
    retried: int = 0

    def sent_numbers(self) -> range:
        return range(self.next_number)

    async def run(self, client: Client, alerts: AlertBook, batch_quota: int) -> None:
        for _ in range(batch_quota):
            if self.unacked is None:
                self.unacked, self.unacked_present = self.next_number, None
                self.next_number += 1
            number = self.unacked
            events = self.workload.batch(self.id, number)
            self.in_flight = True
            try:
                ack = await client.ingest(events, report_alerts=True)
            except ConnectionLost:
                return
            finally:
                self.in_flight = False
            self.acks_after.append(time.perf_counter())
            self.check_ack(number, ack, len(events))
            alerts.record(ack.alerts, f"the ack of batch {self.id}-{number}")
            self.acked.add(number)
            self.unacked = self.unacked_present = None

    def check_ack(self, number: int, ack: IngestAck, size: int) -> None:
        if self.unacked_present is None:  # a new batch: its unique ids were never sent
            assert (ack.accepted, ack.duplicates) == (size, 0), ack
        elif self.unacked_present:
            self.retried += 1
            assert (ack.accepted, ack.duplicates) == (0, size), (
                f"batch {self.id}-{number} was present after the restart, yet its retry "
                f"counted {ack.accepted} events again")
            assert ack.alerts == [], "a retry of a present batch fired alerts"
        else:
            self.retried += 1
            assert (ack.accepted, ack.duplicates) == (size, 0), (
                f"batch {self.id}-{number} was absent after the restart, yet its retry "
                f"was not accepted whole: {ack}")


class AlertBook:
    """Every alert seen from the server (acks and subscription pushes), by seq."""

    def __init__(self) -> None:
        self.by_seq: dict[int, Alert] = {}
        self.pushed_next_seq = 0  # where the subscriber resumes
        self.pushed_count = 0

    def record(self, alerts: list[Alert], source: str) -> None:
        for alert in alerts:
            known = self.by_seq.setdefault(alert.seq, alert)
            assert known == alert, f"{source}: seq {alert.seq} was {known}, now {alert}"

    async def subscribe(self, port: int, max_alerts: int = 1_000_000) -> None:
        """Record pushed alerts from ``pushed_next_seq`` on, in order, until the server dies."""
        try:
            async with open_client(HOST, port) as client, \
                    client.subscribe(self.pushed_next_seq) as subscription:
                for _ in range(max_alerts):
                    alert = await subscription.__anext__()
                    assert alert.seq == self.pushed_next_seq, (
                        f"pushed seq {alert.seq}, expected {self.pushed_next_seq}: "
                        "a gap or a repeat")
                    self.record([alert], "a push")
                    self.pushed_next_seq += 1
                    self.pushed_count += 1
        except (ConnectionLost, OSError):
            return


async def run_connection(port: int, producers: list[Producer], alerts: AlertBook,
                         batch_quota: int) -> None:
    """One TCP connection shared by a few producers (pipelined requests)."""
    try:
        async with open_client(HOST, port) as client, trio.open_nursery() as nursery:
            for producer in producers:
                nursery.start_soon(producer.run, client, alerts, batch_quota)
    except (ConnectionLost, OSError):
        return  # the server died before or during the handshake


# --------------------------------------------------------------- the server


# ``python -m engine serve`` with a smaller ``snapshot_every_bytes`` default (the command
# has no flag for it), so that snapshots, and kills during them, happen within a short run.
SERVE_WITH_SNAPSHOT_EVERY = """
import sys
from engine.runtime.engine import open_engine
open_engine.__wrapped__.__kwdefaults__["snapshot_every_bytes"] = int(sys.argv[1])
from engine.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


@asynccontextmanager
async def server_process(data: Path, log: Path, shards: int = 4,
                         snapshot_every_bytes: int | None = None,
                         ) -> AsyncIterator[ServerProcess]:
    """The server, started (``ready_s`` from spawning it to "listening"), with the
    recovery time it printed (``recovery_ms``)."""
    command: tuple[str, ...] = serve.ENGINE_COMMAND
    if snapshot_every_bytes is not None:
        command = (sys.executable, "-c", SERVE_WITH_SNAPSHOT_EVERY, str(snapshot_every_bytes))
    async with serve.server_process(data, log, shards=shards, start_timeout_s=300,
                                    command=command) as started:
        assert started.recovery_ms is not None, log.read_text()
        yield started


async def setup(port: int) -> None:
    with trio.fail_after(30):
        await define(port)


async def define(port: int) -> None:
    async with open_client(HOST, port) as client:
        for meter in METERS:
            await client.define_meter(meter)
        for limit in LIMITS:
            await client.add_limit(limit)


# ----------------------------------------------------------------- checking


async def per_batch_rows(client: Client, workload: Workload) -> dict[str, dict[Any, Any]]:
    """batch label -> {(meter, customer): value}, as the server answers it."""
    start_ms = workload.base_ms - workload.base_ms % DAY - DAY
    found: dict[str, dict[Any, Any]] = defaultdict(dict)
    for meter in METERS:
        with trio.fail_after(60):
            result = await client.query(Query(
                meter_api_name=meter.name, start_ms=start_ms, end_ms=start_ms + 3 * DAY,
                group_by=["batch", "customer_id"]))
        for row in result.rows:
            found[row.group["batch"]][(meter.name, row.group["customer_id"])] = row.value
    return found


async def check_after_restart(client: Client, producers: list[Producer],
                              alerts: AlertBook) -> tuple[int, int]:
    """The state a restarted server recovered, before anyone ingests again.

    Returns (unacknowledged batches found present, found absent).
    """
    found = await per_batch_rows(client, producers[0].workload)
    present: Parts = {}
    present_count = absent_count = 0
    for producer in producers:
        for number in producer.sent_numbers():
            label = f"{producer.id}-{number}"
            summary = summarize(producer.workload, producer.id, number)
            expected = summary.rows
            got = found.pop(label, {})
            if number in producer.acked:
                assert got == expected, f"acknowledged batch {label}: {got} != {expected}"
            else:
                assert number == producer.unacked, f"batch {label} neither acked nor pending"
                assert got in ({}, expected), f"batch {label} is partly applied: {got}"
                producer.unacked_present = bool(got)
                present_count += bool(got)
                absent_count += not got
            if got:
                merge_into(present, summary.parts)
    assert not found, f"rows of batches never sent: {sorted(found)[:5]}"

    with trio.fail_after(30):
        total = (await client.stats())["alerts"]
    log = []
    async with client.subscribe(0) as subscription:
        with trio.fail_after(30):
            for _ in range(total):
                log.append(await subscription.__anext__())
    assert [a.seq for a in log] == list(range(total)), "the alert log has gaps"
    for seq, alert in alerts.by_seq.items():
        assert seq < total and log[seq] == alert, (
            f"alert {seq} seen before the kill was {alert}, now "
            f"{log[seq] if seq < total else 'missing'}")
    keys = [alert_key(a) for a in log]
    assert len(set(keys)) == len(keys), "a crossing was logged twice"
    assert set(keys) == model_alerts(present), "alerts differ from the usage present"
    for alert in log:
        assert alert.threshold <= alert.value
    return present_count, absent_count


def sent_parts(producers: list[Producer]) -> Parts:
    parts: Parts = {}
    for producer in producers:
        for number in producer.sent_numbers():
            merge_into(parts, summarize(producer.workload, producer.id, number).parts)
    return parts


async def check_final_totals(client: Client, producers: list[Producer]) -> None:
    """Everything was acknowledged in the end: totals per customer equal all that was sent."""
    expected = usage(sent_parts(producers), lambda key: (key[0], key[1]))
    workload = producers[0].workload
    start_ms = workload.base_ms - workload.base_ms % DAY - DAY
    got = {}
    for meter in METERS:
        with trio.fail_after(60):
            result = await client.query(Query(
                meter_api_name=meter.name, start_ms=start_ms, end_ms=start_ms + 3 * DAY,
                group_by=["customer_id"]))
        got.update({(meter.name, row.group["customer_id"]): row.value for row in result.rows})
    assert got == expected


# ---------------------------------------------------------------- scenarios


CONNECTIONS = 4
PRODUCERS_PER_CONNECTION = 3


@dataclass
class Report:
    kills: int = 0
    terms: int = 0
    open_s: list[float] = field(default_factory=list)
    recovery_ms: list[int] = field(default_factory=list)
    replayed_records: list[int] = field(default_factory=list)
    snapshot_lsns: list[int] = field(default_factory=list)  # what each restart started from
    in_flight_at_kill: list[int] = field(default_factory=list)
    unacked_present: int = 0
    unacked_absent: int = 0


def start_ingest_and_subscriber(nursery: trio.Nursery, port: int, producers: list[Producer],
                                alerts: AlertBook) -> None:
    """The producers, PRODUCERS_PER_CONNECTION to a connection, and one subscriber."""
    for offset in range(0, len(producers), PRODUCERS_PER_CONNECTION):
        nursery.start_soon(run_connection, port,
                           producers[offset:offset + PRODUCERS_PER_CONNECTION], alerts, 100_000)
    nursery.start_soon(alerts.subscribe, port)


async def run_round(started: ServerProcess, producers: list[Producer], alerts: AlertBook,
                    end: str, run_s: float, report: Report) -> None:
    """Ingest from every producer and subscribe, then end the server with ``end``."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            start_ingest_and_subscriber(nursery, started.port, producers, alerts)
            await trio.sleep(run_s)
            report.in_flight_at_kill.append(sum(p.in_flight for p in producers))
            if end == "kill":
                await serve.kill(started.process)
                report.kills += 1
            else:
                await serve.terminate(started.process, within_s=10 + 20)
                report.terms += 1


async def finish(started: ServerProcess, producers: list[Producer], alerts: AlertBook) -> None:
    """No kill: retry what is pending, send a few more batches, check the final state."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for offset in range(0, len(producers), PRODUCERS_PER_CONNECTION):
                nursery.start_soon(run_connection, started.port,
                                   producers[offset:offset + PRODUCERS_PER_CONNECTION], alerts, 3)
    assert all(p.unacked is None for p in producers)
    async with open_client(HOST, started.port) as client:
        total = (await client.stats())["alerts"]
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alerts.subscribe, started.port)
                for _ in range(3_000):
                    if alerts.pushed_next_seq >= total:
                        break
                    await trio.sleep(0.01)
                assert alerts.pushed_next_seq == total
                nursery.cancel_scope.cancel()
        await check_final_totals(client, producers)
        await check_after_restart(client, producers, alerts)  # the same checks, live
        final = model_alerts(sent_parts(producers))
        assert {alert_key(a) for a in alerts.by_seq.values()} == final
        assert len(alerts.by_seq) == total
    # The model predicted crossings of every limit, and thresholds never reached.
    assert {limit_id for limit_id, _, _, _ in final} == {limit.id for limit in LIMITS}
    assert not {(limit_id, threshold) for limit_id, _, _, threshold in final} & {
        (limit.id, max(limit.thresholds)) for limit in LIMITS}


async def crash_scenario(tmp_path: Path, ends: list[str], seed: int,
                         snapshot_every_bytes: int | None = None) -> Report:
    rng = random.Random(seed)
    data, log = tmp_path / "data", tmp_path / "server.log"
    workload = Workload(base_ms=time.time_ns() // 1_000_000, events_per_batch=40)
    producers = [Producer(id=index, workload=workload)
                 for index in range(CONNECTIONS * PRODUCERS_PER_CONNECTION)]
    alerts = AlertBook()
    report = Report()
    for round_number, end in enumerate([*ends, "finish"]):
        async with server_process(data, log,
                                  snapshot_every_bytes=snapshot_every_bytes) as started:
            report.open_s.append(started.ready_s)
            report.recovery_ms.append(started.recovery_ms)
            if round_number == 0:
                await setup(started.port)
            else:
                async with open_client(HOST, started.port) as client:
                    with trio.fail_after(30):
                        stats = await client.stats()
                    report.replayed_records.append(stats["recovered_wal_records"])
                    report.snapshot_lsns.append(stats["last_lsn"] - stats["recovered_wal_records"])
                    present, absent = await check_after_restart(client, producers, alerts)
                    report.unacked_present += present
                    report.unacked_absent += absent
            if end == "finish":
                await finish(started, producers, alerts)
                await serve.terminate(started.process, within_s=30)
            else:
                await run_round(started, producers, alerts, end, rng.uniform(0.05, 1.5), report)
    acked = sum(len(p.acked) for p in producers)
    print(f"\ncrash scenario: {report.kills} SIGKILLs, {report.terms} SIGTERMs, "
          f"{acked} batches of {workload.events_per_batch} events acknowledged "
          f"({acked * workload.events_per_batch} events), "
          f"{sum(p.retried for p in producers)} retried after a restart "
          f"({report.unacked_present} had been applied, {report.unacked_absent} not), "
          f"{len(alerts.by_seq)} alerts ({alerts.pushed_count} pushed); "
          f"in flight at each end: {report.in_flight_at_kill}; "
          f"open s median {statistics.median(report.open_s):.2f} max {max(report.open_s):.2f}; "
          f"recovery ms median {statistics.median(report.recovery_ms)} "
          f"max {max(report.recovery_ms)}; WAL records replayed {report.replayed_records} "
          f"after snapshots at lsn {report.snapshot_lsns}")
    return report


async def test_sigkill_under_concurrent_ingest_keeps_acked_batches_and_alerts(
    tmp_path: Path,
) -> None:
    report = await crash_scenario(tmp_path, ["kill", "kill", "term", "kill"], seed=1)
    assert report.kills == 3
    # The kills hit a busy server: most producers had a batch in flight.
    assert sum(report.in_flight_at_kill) >= len(report.in_flight_at_kill)


async def test_sigkill_with_frequent_snapshots_keeps_acked_batches_and_alerts(
    tmp_path: Path,
) -> None:
    """The same with a snapshot every 256 KiB of WAL: kills land between, and sometimes
    during, snapshots; restarts load one and replay the tail after it."""
    report = await crash_scenario(tmp_path, ["kill", "kill", "kill"], seed=3,
                                  snapshot_every_bytes=256 << 10)
    assert report.kills == 3
    assert any(lsn > 0 and replayed > 0 for lsn, replayed in
               zip(report.snapshot_lsns, report.replayed_records, strict=True))


@pytest.mark.slow
async def test_soak_25_sigkills_under_concurrent_ingest(tmp_path: Path) -> None:
    ends = ["term" if round_number % 6 == 5 else "kill" for round_number in range(29)]
    report = await crash_scenario(tmp_path, ends, seed=2)
    assert report.kills >= 25
    assert sum(report.in_flight_at_kill) >= len(report.in_flight_at_kill)


DRAIN_TIMEOUT_S = 10.0  # the server's default (ServerConfig.drain_timeout_s)


async def ingest_until(started: ServerProcess, producers: list[Producer], alerts: AlertBook,
                       acked_events: int, end: str) -> tuple[int, float, float]:
    """Ingest from every producer until ``acked_events`` are acknowledged, then end the
    server with ``end`` while batches are in flight.

    Returns (batches in flight when signalled, when it was signalled, seconds to exit).
    """
    events_per_batch = producers[0].workload.events_per_batch
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            start_ingest_and_subscriber(nursery, started.port, producers, alerts)
            for _ in range(600_000):
                if sum(len(p.acked) for p in producers) * events_per_batch >= acked_events:
                    break
                await trio.sleep(0.001)
            in_flight = sum(p.in_flight for p in producers)
            signalled = time.perf_counter()
            if end == "kill":
                await serve.kill(started.process)
                exit_s = time.perf_counter() - signalled
            else:
                exit_s = await serve.terminate(started.process, within_s=DRAIN_TIMEOUT_S + 20)
    return in_flight, signalled, exit_s


async def test_sigterm_during_heavy_ingest_drains_exits_0_and_the_restart_replays_nothing(
    tmp_path: Path,
) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    workload = Workload(base_ms=time.time_ns() // 1_000_000, events_per_batch=400)
    producers = [Producer(id=index, workload=workload)
                 for index in range(CONNECTIONS * PRODUCERS_PER_CONNECTION)]
    alerts = AlertBook()
    async with server_process(data, log) as started:
        await setup(started.port)
        in_flight, signalled, exit_s = await ingest_until(started, producers, alerts,
                                                          100_000, "term")
        assert started.process.stdout is not None
        output = started.process.stdout.read()
    assert "SIGTERM: shutting down" in output and "stopped cleanly" in output, output
    assert exit_s < DRAIN_TIMEOUT_S, f"took {exit_s:.1f} s to exit"
    assert in_flight >= len(producers) // 2, "SIGTERM found too little in flight"
    # Requests the server had already read were answered during the drain.
    acks_after_signal = sum(t > signalled for p in producers for t in p.acks_after)
    assert acks_after_signal >= 1
    unacked = sum(p.unacked is not None for p in producers)

    async with server_process(data, log) as started:
        async with open_client(HOST, started.port) as client:
            stats = await client.stats()
            assert (stats["recovered_wal_records"], stats["recovered_wal_bytes"]) == (0, 0)
            present, absent = await check_after_restart(client, producers, alerts)
        await finish(started, producers, alerts)
        await serve.terminate(started.process, within_s=30)
    acked = sum(len(p.acked) for p in producers)
    print(f"\nSIGTERM: {in_flight} batches in flight, exit 0 after {exit_s:.2f} s, "
          f"{acks_after_signal} acks during the drain, {unacked} unacknowledged "
          f"({present} had been applied, {absent} not); restart replayed "
          f"{stats['recovered_wal_records']} WAL records, open {started.ready_s:.2f} s "
          f"(recovery {started.recovery_ms} ms); {acked} batches of "
          f"{workload.events_per_batch} events in all")


@pytest.mark.slow
async def test_restart_time_after_sigkill_with_a_million_events(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    workload = Workload(base_ms=time.time_ns() // 1_000_000, events_per_batch=1000)
    producers = [Producer(id=index, workload=workload)
                 for index in range(CONNECTIONS * PRODUCERS_PER_CONNECTION)]
    alerts = AlertBook()
    async with server_process(data, log) as started:
        await setup(started.port)
        ingest_started = time.perf_counter()
        await ingest_until(started, producers, alerts, 1_000_000, "kill")
        ingest_s = time.perf_counter() - ingest_started
    figures = []
    # Three restarts on the same WAL (each killed again before it writes anything), to
    # show the spread on a shared machine; then a clean stop and a start from its snapshot.
    hows = ["after SIGKILL (WAL replay)"] * 3 + ["after SIGTERM (snapshot)"]
    for attempt, how in enumerate(hows):
        async with server_process(data, log) as started:
            async with open_client(HOST, started.port) as client:
                with trio.fail_after(30):
                    stats = await client.stats()
                if attempt in (0, len(hows) - 1):
                    await check_after_restart(client, producers, alerts)
            figures.append(
                f"restart {how}: open {started.ready_s:.2f} s (spawn to listening), "
                f"recovery {started.recovery_ms} ms, replayed {stats['recovered_wal_records']} "
                f"WAL records / {stats['recovered_wal_bytes'] / 1e6:.1f} MB; "
                f"{stats['series_count']:,} series, {stats['bucket_count']:,} buckets; "
                f"load average {os.getloadavg()[0]:.1f}")
            # The replay is the WAL since the last checkpoint: at most the checkpoint
            # threshold and one group commit, however many events came before.
            assert stats["recovered_wal_bytes"] <= DEFAULT_SNAPSHOT_EVERY_BYTES + MAX_GROUP_BYTES
            if attempt < len(hows) - 2:
                await serve.kill(started.process)
            elif attempt == len(hows) - 2:
                exit_s = await serve.terminate(started.process, within_s=120)
                figures.append(f"SIGTERM with that state: exit 0 after {exit_s:.2f} s "
                               "(writes the snapshot)")
            else:
                assert stats["recovered_wal_records"] == 0
                await finish(started, producers, alerts)
                await serve.terminate(started.process, within_s=120)
    acked = sum(len(p.acked) for p in producers) * workload.events_per_batch
    print(f"\n{acked:,} events acknowledged over TCP in {ingest_s:.1f} s before the SIGKILL "
          f"(Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    print("\n".join(figures))


# ------------------------------------------------------------- a client hang


async def test_a_cancelled_subscriber_leaves_its_subscription_promptly(
    engine: Engine, serving: Any,
) -> None:
    """A timeout around a subscriber cancels the client's reader too; leaving the
    subscription must not then wait (shielded, forever) for an unsubscribe reply that
    no task will ever read."""
    clients: list[Client] = []
    left = trio.Event()

    async def subscriber(port: int) -> None:
        with trio.move_on_after(0.2):
            async with open_client(HOST, port) as client:
                clients.append(client)
                async with client.subscribe(0) as subscription:
                    await subscription.__anext__()  # no alert ever comes: the timeout fires
        left.set()

    async with serving(engine) as server, trio.open_nursery() as nursery:
        nursery.start_soon(subscriber, server.port)
        with trio.move_on_after(5):
            await left.wait()
        if not left.is_set():
            clients[0]._fail_all(ConnectionLost("the test gave up"))  # let the task end
            pytest.fail("leaving the subscription hung after its task was cancelled")


@pytest.mark.slow
async def test_soak_25_sigkills_with_frequent_snapshots(tmp_path: Path) -> None:
    report = await crash_scenario(tmp_path, ["kill"] * 25, seed=4,
                                  snapshot_every_bytes=256 << 10)
    assert report.kills == 25
    assert sum(lsn > 0 and replayed > 0 for lsn, replayed in
               zip(report.snapshot_lsns, report.replayed_records, strict=True)) >= 10
