"""The fixed engine clock, time units and event builders shared by the tests."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from engine import Event, Query

NOW = 1_790_000_000_000  # a fixed engine clock: 2026-09-21 14:13:20 UTC
MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000
TODAY = NOW - NOW % DAY  # UTC midnight of NOW


def now_ms() -> int:
    """The wall clock, for tests against a server process (which runs on it)."""
    return time.time_ns() // 1_000_000


def utc_ms(*fields: int) -> int:
    """Epoch ms of a UTC time given as ``datetime`` fields."""
    return int(datetime(*fields, tzinfo=UTC).timestamp()) * 1000


def local_ms(zone: str, *fields: int) -> int:
    """Epoch ms of a local wall-clock time (fold=0) in ``zone``."""
    return int(datetime(*fields, tzinfo=ZoneInfo(zone)).timestamp()) * 1000


def event(**fields: Any) -> Event:
    """An event of 1 on meter ``calls`` for ``acme`` at ``NOW``; ``fields`` override."""
    base: dict[str, Any] = {
        "meter_api_name": "calls",
        "customer_id": "acme",
        "meter_value": 1,
        "meter_time_in_millis": NOW,
    }
    base.update(fields)
    return Event(**base)


def ev(customer: str, value: Any, ts: int, meter: str = "gb", **fields: Any) -> Event:
    """An event in positional shorthand: customer, value, time (meter ``gb``)."""
    return Event(meter_api_name=meter, customer_id=customer, meter_value=value,
                 meter_time_in_millis=ts, **fields)


async def total(source: Any, meter: str = "calls") -> int:
    """The sum of ``meter`` over every customer from 0 to ``NOW + DAY``, as an int; from
    an engine or a client."""
    result = await source.query(Query(meter_api_name=meter, start_ms=0, end_ms=NOW + DAY))
    return sum(int(row.value) for row in result.rows)
