"""Crash tests of checkpointing, sealing and compaction: SIGKILL at each named point.

A child process ingests numbered batches with unique ids while its clock runs a
simulated eighth of a day per batch, with the smallest hot window (one day) and
small checkpoints, so it seals and compacts every few batches; late events land
in sealed days. ``METERING_ENGINE_FAULT=POINT:N`` kills it at the N-th pass
through a point (``engine.faults``). The test counts the kills that landed at
each point, then reopens the data directory: every acknowledged batch is counted,
nothing twice; after every batch is sent again, each event counts exactly once
(the retries are duplicates) and every day's total equals the model's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from engine import Event, Query, open_engine
from engine.faults import ENV, POINTS
from tests.helpers.events import DAY, MINUTE
from tests.helpers.serve import child_env

START_MS = 1_760_000_000_000 // DAY * DAY
BATCHES = 120
PER_BATCH = 60
STEP_MS = DAY // 8


def batch(number: int) -> list[Event]:
    now = START_MS + number * STEP_MS
    return [Event(meter_api_name="calls", customer_id=f"c{i % 7}", meter_value=1,
                  # a third of the events 1-3 days late: into sealed days
                  meter_time_in_millis=now - (i % 3) * DAY - (i * 7 % 50) * MINUTE,
                  dimensions={"region": "eu" if i % 2 else "us"},
                  unique_id=f"b{number}-{i}")
            for i in range(PER_BATCH)]


CHILD = f"""
import sys, trio
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from engine import Meter, open_engine
from tests.test_history_crash import batch, START_MS, STEP_MS, BATCHES
now = [START_MS]
async def main(data_dir, acks_path):
    async with open_engine(data_dir, shards=3, clock_ms=lambda: now[0], hot_window_ms=86_400_000,
                           snapshot_every_bytes=16_000) as eng:
        await eng.define_meter(Meter(name="calls"))
        with open(acks_path, "a") as acks:
            for number in range(BATCHES):
                now[0] = START_MS + number * STEP_MS
                await eng.ingest(batch(number))
                acks.write(f"{{number}}\\n")
                acks.flush()
trio.run(main, sys.argv[1], sys.argv[2])
"""


def expected_by_day(numbers: range) -> Counter[int]:
    days: Counter[int] = Counter()
    for number in numbers:
        for event in batch(number):
            days[event.meter_time_in_millis // DAY * DAY] += 1
    return days


async def totals_by_day(eng: object) -> Counter[int]:
    result = await eng.query(Query(  # type: ignore[attr-defined]
        meter_api_name="calls", start_ms=START_MS - 5 * DAY,
        end_ms=START_MS + (BATCHES // 8 + 2) * DAY, window="day"))
    return Counter({row.window_start_ms: row.value for row in result.rows})


@pytest.mark.parametrize("point", POINTS)
async def test_kill_at_each_point_loses_and_doubles_nothing(tmp_path: Path, point: str) -> None:
    data_dir, acks_path = tmp_path / "data", tmp_path / "acks"
    env = {**child_env(), ENV: f"{point}:3"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), str(acks_path)],
                           env=env, capture_output=True, timeout=120)
    landed = child.returncode == -signal.SIGKILL
    assert landed or child.returncode == 0, child.stderr.decode()[-2000:]
    # Every point is passed at least three times in this run: the kill lands.
    assert landed, f"no kill at {point}"
    acked = [int(line) for line in acks_path.read_text().split()] if acks_path.exists() else []
    assert acked == list(range(len(acked))) and len(acked) < BATCHES
    now = START_MS + BATCHES * STEP_MS
    async with open_engine(data_dir, shards=3, clock_ms=lambda: now,
                           hot_window_ms=DAY) as eng:
        counted = await totals_by_day(eng)
        committed = sum(counted.values())
        # Whole batches, at least every acknowledged one (one more may have committed
        # unacknowledged), none twice.
        assert committed % PER_BATCH == 0
        logged = committed // PER_BATCH
        assert len(acked) <= logged <= len(acked) + 1
        assert counted == expected_by_day(range(logged))
        duplicates = 0
        for number in range(BATCHES):
            duplicates += (await eng.ingest(batch(number))).duplicates
        assert duplicates == committed
        assert await totals_by_day(eng) == expected_by_day(range(BATCHES))
        assert eng.statistics().block_count > 0
    os.environ.pop(ENV, None)
