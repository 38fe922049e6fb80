"""Alerts across a SIGKILL of a real ``meter serve`` process: every acknowledged alert is
there after the restart with the same seq and content, and a subscriber resumes
exactly where it left off. (The crash tests of usage are tests/test_crash.py.)
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from engine import Alert, Event, Limit, Meter
from engine.client import open_client
from engine.errors import ConnectionLost
from tests.helpers import serve
from tests.helpers.alerts import (
    assert_gap_free,
    assert_quiet,
    take,
)
from tests.helpers.events import ev
from tests.helpers.serve import HOST

# ------------------------------------------------ a real server, killed with -9


@asynccontextmanager
async def server_process(data: Path, log: Path) -> AsyncIterator[tuple[subprocess.Popen[str],
                                                                     int]]:
    async with serve.server_process(data, log, shards=3) as server:
        yield server.process, server.port


async def test_alerts_survive_sigkill_of_the_server_and_resume_exactly(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    now = time.time_ns() // 1_000_000  # the server runs on the wall clock
    per_batch = 5 * 3  # 5 customers, 3 thresholds each

    def batch(b: int) -> list[Event]:
        return [ev(f"b{b}-{i}", 3, now, unique_id=f"{b}-{i}") for i in range(5)]

    acked: list[Alert] = []
    async with server_process(data, log) as (process, port):
        async with open_client(HOST, port) as admin, open_client(HOST, port) as reader:
            await admin.define_meter(Meter(name="gb"))
            await admin.add_limit(Limit(id="cap", meter_api_name="gb", thresholds=[1, 2, 3],
                                        period="total"))
            async with reader.subscribe(0) as subscription:
                for b in range(6):
                    acked += (await admin.ingest(batch(b), report_alerts=True)).alerts
                seen = await take(subscription, 40)
                assert seen == acked[:40]

                async def keep_ingesting() -> None:
                    for b in range(6, 200):
                        try:
                            ack = await admin.ingest(batch(b), report_alerts=True)
                        except ConnectionLost:
                            return
                        acked.extend(ack.alerts)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_ingesting)
                    with trio.fail_after(10):
                        while len(acked) < 10 * per_batch:
                            await trio.sleep(0.001)
                    process.send_signal(signal.SIGKILL)
                    await trio.to_thread.run_sync(process.wait)
    assert len(acked) >= 10 * per_batch
    assert_gap_free(acked)
    resume_at = seen[-1].seq + 1

    async with server_process(data, log) as (process, port):
        async with open_client(HOST, port) as client:
            total = (await client.stats())["alerts"]
            # Every acknowledged alert is there; at most the one batch in flight is added.
            assert total in (len(acked), len(acked) + per_batch)
            async with client.subscribe(from_seq=resume_at) as subscription:
                rest = await take(subscription, total - resume_at)
                assert_gap_free(rest, first=resume_at)
                assert rest[:len(acked) - resume_at] == acked[resume_at:]  # identical content
                # Live alerts continue the log.
                ack = await client.ingest(batch(1000), report_alerts=True)
                assert [a.seq for a in ack.alerts] == list(range(total, total + per_batch))
                assert await take(subscription, per_batch) == ack.alerts
                await assert_quiet(subscription)
            async with client.subscribe(from_seq=0) as subscription:
                assert (await take(subscription, len(acked)))[:len(acked)] == acked
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await trio.to_thread.run_sync(process.wait)
        assert process.returncode == 0, log.read_text()
