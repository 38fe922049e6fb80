"""Shared fixtures for the TCP server tests: an engine on disk and a server on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from engine import Engine, open_engine
from engine.server import MeterServer, ServerConfig
from tests.helpers.events import NOW
from tests.helpers.serve import HOST

__all__ = ["HOST", "NOW", "GatedEngine"]  # NOW and HOST stay importable from here


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    """An LMDB-backed engine in ``tmp_path`` with a fixed clock (no meters defined)."""
    async with open_engine(tmp_path / "data", shards=4, clock_ms=lambda: NOW) as eng:
        yield eng


@pytest.fixture
def serving() -> Callable[..., AbstractAsyncContextManager[MeterServer]]:
    """``async with serving(engine, **config) as server``: a server on 127.0.0.1, port 0.

    ``server.port`` is the bound port. On exit the server is shut down and its task
    must return within a few seconds.
    """

    @asynccontextmanager
    async def start(eng: Engine, **config: Any) -> AsyncIterator[MeterServer]:
        config.setdefault("drain_timeout_s", 2.0)
        server = MeterServer(eng, ServerConfig(host=HOST, port=0, **config))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                yield server
            finally:
                server.shutdown()
                with trio.fail_after(config["drain_timeout_s"] + 5):
                    await _wait_for_nursery(nursery)

    return start


async def _wait_for_nursery(nursery: trio.Nursery) -> None:
    while nursery.child_tasks:
        await trio.sleep(0.01)


class GatedEngine:
    """An engine wrapper to hand a ``MeterServer``: counts calls in progress and can hold
    ingests at a gate, so tests control what is in flight without server internals.

    ``gate = trio.Event()`` holds every ingest that starts until ``gate.set()``.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.started = 0
        self.in_flight = 0
        self.gate: trio.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def _call(self, method: Any, *args: Any) -> Any:
        self.started += 1
        self.in_flight += 1
        try:
            return await method(*args)
        finally:
            self.in_flight -= 1

    async def ingest(self, events: Any, *, report_alerts: bool = False) -> Any:
        async def gated(events: Any) -> Any:
            if self.gate is not None:
                await self.gate.wait()
            return await self.engine.ingest(events, report_alerts=report_alerts)

        return await self._call(gated, events)

    async def query(self, query: Any) -> Any:
        return await self._call(self.engine.query, query)

    async def define_meter(self, meter: Any) -> Any:
        return await self._call(self.engine.define_meter, meter)

    async def settled(self, timeout_s: float = 5.0) -> None:
        """Wait until no call is in progress."""
        with trio.fail_after(timeout_s):
            while self.in_flight:
                await trio.sleep(0.001)
