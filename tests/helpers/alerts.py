"""Reading alert subscriptions (embedded or over TCP) and checking what came."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from engine import Alert, Engine, Event, open_engine
from engine.storage import MemoryStore
from tests.helpers.events import NOW, ev


def key(alert: Alert) -> tuple[Any, ...]:
    """What an alert says, without its seq and arrival time."""
    return (alert.limit_id, alert.customer_id, alert.threshold, alert.value,
            alert.period_start_ms)


async def take(subscription: Any, count: int, timeout_s: float = 10.0) -> list[Alert]:
    """Exactly ``count`` alerts from an embedded or TCP subscription."""
    alerts = []
    with trio.fail_after(timeout_s):
        for _ in range(count):
            alerts.append(await subscription.__anext__())
    return alerts


async def assert_quiet(subscription: Any, wait_s: float = 0.2) -> None:
    """Nothing more arrives within ``wait_s``."""
    with trio.move_on_after(wait_s):
        extra = await subscription.__anext__()
        pytest.fail(f"unexpected alert {extra}")


def assert_gap_free(alerts: list[Alert], first: int = 0) -> None:
    assert [a.seq for a in alerts] == list(range(first, first + len(alerts)))


def crossing_batch(prefix: str, customers: int, value: Any = 3,
                   ts: int = NOW) -> list[Event]:
    """One event of ``value`` on meter ``gb`` for each of ``customers`` new customers,
    with unique ids: each crosses a limit's low thresholds."""
    return [ev(f"{prefix}{i}", value, ts, unique_id=f"{prefix}{i}-{value}")
            for i in range(customers)]


@asynccontextmanager
async def memory_engine(clock_ms: Callable[[], int] = lambda: NOW,
                        shards: int = 3) -> AsyncIterator[Engine]:
    """An engine on the in-memory store (safe under ``autojump_clock``)."""
    async with open_engine(store=MemoryStore(), shards=shards, clock_ms=clock_ms) as eng:
        yield eng
