"""A limit's current period ``[start, end)``, for ``GET /api/customers/{id}/limits``.

Shell layer: the standard library (zoneinfo) and ``engine.schema`` only. The HTTP
shell may not import ``engine.domain``, so this restates the rule of
``engine.domain.windows`` (and ``limits.period_bounds``), which the engine uses
to evaluate limits; ``tests/test_http_limits.py`` checks that both agree:

- ``hour``: the instants at which the local wall clock reads ``HH:00:00.000``
  (a DST change by a non-multiple of an hour makes one window longer);
- ``day`` / ``week`` (Monday) / ``month`` (the 1st): local midnight of that date
  with ``fold=0``; if midnight does not exist (a gap), the first instant whose
  local date is that date;
- ``total``: all of time, ``[0, 253402300800000)`` (the end of year 9999).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from engine.schema import Limit

HOUR_MS = 3_600_000
TOTAL_END_MS = 253_402_300_800_000
# How far past a period's start its end certainly lies (DST, month lengths).
_REACH_MS = {"hour": 4 * HOUR_MS, "day": 3 * 86_400_000, "week": 9 * 86_400_000,
             "month": 33 * 86_400_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def period_bounds(now_ms: int, limit: Limit) -> tuple[int, int]:
    """``[start, end)`` of ``limit``'s period that holds ``now_ms``."""
    if limit.period == "total":
        return 0, TOTAL_END_MS
    tz = ZoneInfo(limit.timezone)
    start = _floor(now_ms, limit.period, tz)
    # The end is the least boundary after start: walk down from one certainly past it.
    end = _floor(start + _REACH_MS[limit.period], limit.period, tz)
    for _ in range(64):
        earlier = _floor(end - 1, limit.period, tz)
        if earlier <= start:
            return start, end
        end = earlier
    raise ValueError(f"cannot find the end of the {limit.period} from {start} ms")


def _floor(ts_ms: int, period: str, tz: ZoneInfo) -> int:
    return _hour_floor(ts_ms, tz) if period == "hour" else _calendar_floor(ts_ms, period, tz)


def _local(second: int, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(second, tz)


def _offset_ms(second: int, tz: ZoneInfo) -> int:
    offset = _local(second, tz).utcoffset()
    assert offset is not None
    return offset // _ONE_MS


def _hour_floor(ts_ms: int, tz: ZoneInfo) -> int:
    t = ts_ms
    for _ in range(64):
        second = t // 1000
        offset = _offset_ms(second, tz)
        candidate = t - (t + offset) % HOUR_MS
        if _offset_ms(candidate // 1000, tz) == offset:
            return candidate
        # A transition lies in (candidate, t]: it is not a boundary; look before it.
        low, high = candidate // 1000, second
        while high - low > 1:
            middle = (low + high) // 2
            if _offset_ms(middle, tz) == _offset_ms(low, tz):
                low = middle
            else:
                high = middle
        t = high * 1000 - 1
    raise ValueError(f"cannot find the hour holding {ts_ms} ms in {tz.key!r}")


def _key_date(day: date, period: str) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _next_key(day: date, period: str) -> date:
    if period == "day":
        return day + timedelta(days=1)
    if period == "week":
        return day + timedelta(days=7)
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _date_start_ms(day: date, tz: ZoneInfo) -> int:
    midnight = datetime.combine(day, time(0), tzinfo=tz)  # fold=0
    t_ms = (midnight - _EPOCH) // _ONE_MS
    if _local(t_ms // 1000, tz).replace(tzinfo=None) == midnight.replace(tzinfo=None):
        return t_ms
    # Midnight is in a gap: the first second whose local date is ``day``.
    high = t_ms // 1000
    while _local(high, tz).date() < day:
        high += 3600
    low = high - 2 * 86400
    while high - low > 1:
        middle = (low + high) // 2
        if _local(middle, tz).date() >= day:
            high = middle
        else:
            low = middle
    return high * 1000


def _calendar_floor(ts_ms: int, period: str, tz: ZoneInfo) -> int:
    key = _key_date(_local(ts_ms // 1000, tz).date(), period)
    floor = _date_start_ms(key, tz)
    # A fold that crosses midnight backwards puts ts after the next date's start.
    for _ in range(8):
        key = _next_key(key, period)
        following = _date_start_ms(key, tz)
        if following > ts_ms:
            return floor
        floor = max(floor, following)
    return floor
