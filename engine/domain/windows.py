"""Pure domain layer: calendar windows in IANA time zones.

Imports only the standard library (no trio, lmdb, socket).  Times are integer
milliseconds since the Unix epoch (UTC); never float arithmetic.

Contract
========

A *window* is one of ``WINDOW_NAMES``: ``minute``, ``hour``, ``day``, ``week``
or ``month``.  Every window is evaluated in an IANA time zone ``tz``.

``minute`` and ``hour``
    Real durations of wall-clock time.  The window boundaries are exactly the
    instants at which the local wall clock in ``tz`` reads ``HH:MM:00.000``
    (minute) or ``HH:00:00.000`` (hour), counting both occurrences during a
    fall-back fold.  Consequences:

    * Europe/Berlin has 23 hour windows on a spring-forward day and 25 on a
      fall-back day, each one real hour (3 600 000 ms) long;
    * Asia/Kathmandu (+05:45) hour windows start at minute 15 UTC, Asia/Kolkata
      (+05:30) at minute 30 UTC;
    * when the offset changes by an amount that is not a multiple of the
      window length (e.g. Australia/Lord_Howe's 30-minute DST shift), the window
      around the transition is longer than nominal (90 minutes for an hour
      window there) because the wall clock never reads ``:00`` in between.

    Implementation: time is split into segments of constant UTC offset.  Within
    a segment with offset ``o`` (ms) the boundaries are the instants ``t`` with
    ``(t + o) % P == 0`` (``P`` = 60 000 or 3 600 000).  A transition instant
    is itself a boundary only if the wall clock reads ``:00`` there under the
    *new* offset (which is what the rule above yields for the segment that
    starts at the transition).

``day``, ``week`` (ISO weeks, starting Monday) and ``month``
    Windows start at local midnight (00:00) of the day / the Monday / the 1st,
    converted to UTC with ``fold=0`` (i.e. the first occurrence of midnight if
    it occurs twice).  If local midnight does not exist (a DST gap at midnight,
    e.g. America/Santiago, Asia/Beirut, America/Havana on some dates), the
    window starts at the first instant whose local date is that date, which is
    the transition instant (``fold=0`` maps a gap midnight there whenever the
    gap starts exactly at midnight).  Boundaries are strictly increasing;
    duplicates (a local date that does not exist at all) are skipped.
    ``window_floor`` is the greatest boundary <= ts, so if a fall-back fold
    crosses midnight backwards (America/St_Johns until 2011: 00:01 NDT ->
    23:01 NST of the previous day), the repeated pre-midnight hour belongs to
    the window that began at the new date's first (fold=0) midnight.

``window_spans(start, end, window, tz)`` returns the windows covering the
half-open range ``[start, end)`` as ``(window_start, lo, hi)`` triples in
increasing order: ``window_start`` is the calendar start of the window (it may
be ``< start`` for the first item) and ``[lo, hi)`` is the window clipped to
the range.  The items tile the range exactly.  A query producing more than
``MAX_WINDOWS`` windows is refused with ``WindowError``.

Assumption (documented, relied upon): a zone changes its UTC offset at most
once in any 6-hour interval.  Offset transitions are found by sampling the
offset every 6 hours and binary-searching the exact transition second between
two samples whose offsets differ.  All transitions in the IANA database are at
whole seconds.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

__all__ = [
    "DAY_MS",
    "HOUR_MS",
    "MAX_WINDOWS",
    "MINUTE_MS",
    "WINDOW_NAMES",
    "WindowError",
    "resolve_timezone",
    "window_floor",
    "window_spans",
]

WINDOW_NAMES: tuple[str, ...] = ("minute", "hour", "day", "week", "month")
MAX_WINDOWS = 200_000  # a query producing more windows is refused

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
MINUTE_MS = 60_000  # also the width of a bucket (engine.domain.series)
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# Offset transitions are assumed to be at least this far apart (see module
# docstring): the offset is sampled at this step and transitions are located
# by binary search between two samples whose offsets differ.
_SAMPLE_STEP_S = 6 * 3600

_PERIOD_MS: dict[str, int] = {"minute": MINUTE_MS, "hour": HOUR_MS}
# Shortest nominal length of each window kind, used for a cheap early refusal
# of ranges that certainly produce more than MAX_WINDOWS windows (no real
# window is more than twice its nominal length).
_NOMINAL_MS: dict[str, int] = {
    "minute": MINUTE_MS,
    "hour": HOUR_MS,
    "day": DAY_MS,
    "week": 7 * DAY_MS,
    "month": 28 * DAY_MS,
}


class WindowError(ValueError):
    """A window query was invalid; the message names the offending value."""


# --------------------------------------------------------------------------
# time zones


@functools.lru_cache(maxsize=1024)
def _load_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError, TypeError):
        raise WindowError(
            f"unknown time zone {name!r}: use an IANA name such as 'Europe/Berlin'"
        ) from None


def resolve_timezone(name: str = "UTC") -> ZoneInfo:
    """Return the ``ZoneInfo`` for an IANA zone name (cached).

    Raises ``WindowError`` for an unknown / invalid name or a non-string.
    """
    if not isinstance(name, str):
        raise WindowError(
            f"time zone must be a string IANA name such as 'Europe/Berlin', "
            f"got {type(name).__name__} {name!r}"
        )
    if not name or "\x00" in name:
        raise WindowError(f"unknown time zone {name!r}: use an IANA name such as 'Europe/Berlin'")
    return _load_zone(name)


# --------------------------------------------------------------------------
# small helpers (all integer arithmetic)


def _check_ms(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WindowError(
            f"{what} must be an integer number of milliseconds, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def _check_window(window: object) -> str:
    if not isinstance(window, str) or window not in WINDOW_NAMES:
        raise WindowError(
            f"unknown window {window!r}: expected one of "
            + ", ".join(repr(w) for w in WINDOW_NAMES)
        )
    return window


def _check_tz(tz: object) -> ZoneInfo:
    if not isinstance(tz, ZoneInfo):
        raise WindowError(
            f"tz must be a zoneinfo.ZoneInfo (see resolve_timezone), got {type(tz).__name__} {tz!r}"
        )
    return tz


def _local(sec: int, tz: ZoneInfo) -> datetime:
    """The aware local datetime of whole second ``sec``."""
    try:
        return datetime.fromtimestamp(sec, tz)
    except (OverflowError, OSError, ValueError):
        raise WindowError(f"timestamp out of supported range: {sec * 1000} ms") from None


def _offset_ms(sec: int, tz: ZoneInfo) -> int:
    """UTC offset (ms) in effect at whole second ``sec``."""
    off = _local(sec, tz).utcoffset()
    assert off is not None
    return off // _ONE_MS


def _to_ms(dt: datetime) -> int:
    """Aware datetime -> integer ms since epoch (respects ``fold``)."""
    return (dt - _EPOCH) // _ONE_MS


def _first_second_with_new_offset(lo_s: int, hi_s: int, tz: ZoneInfo) -> int:
    """Offsets at lo_s and hi_s differ; return the first second in (lo_s, hi_s]
    whose offset differs from the one at lo_s (the transition instant)."""
    old = _offset_ms(lo_s, tz)
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if _offset_ms(mid, tz) == old:
            lo_s = mid
        else:
            hi_s = mid
    return hi_s


def _segments(start_ms: int, end_ms: int, tz: ZoneInfo) -> list[tuple[int, int, int]]:
    """Split [start_ms, end_ms) into (a, b, offset_ms) of constant UTC offset.

    Assumes at most one offset transition per 6 hours (see module docstring).
    """
    s0 = start_ms // 1000
    s_last = (end_ms - 1) // 1000  # second containing the last ms of the range
    cur_off = _offset_ms(s0, tz)
    segs: list[tuple[int, int, int]] = []
    a = start_ms
    prev_s = s0
    while prev_s < s_last:
        s = min(prev_s + _SAMPLE_STEP_S, s_last)
        off = _offset_ms(s, tz)
        if off != cur_off:
            t_s = _first_second_with_new_offset(prev_s, s, tz)
            t_ms = t_s * 1000  # start_ms < t_ms < end_ms by construction
            segs.append((a, t_ms, cur_off))
            a = t_ms
            cur_off = _offset_ms(t_s, tz)
            # Re-sample from the transition so a (forbidden but possible)
            # second transition in the same 6 h sample interval is not lost.
            prev_s = t_s
            if cur_off != off:
                continue
        prev_s = s
    segs.append((a, end_ms, cur_off))
    return segs


# --------------------------------------------------------------------------
# minute / hour


def _clock_floor(ts_ms: int, period: int, tz: ZoneInfo) -> int:
    """Greatest instant <= ts_ms at which the wall clock reads a multiple of
    ``period`` (both fold occurrences count)."""
    t = ts_ms
    # Each iteration moves to the previous constant-offset segment; with the
    # 6 h assumption and period <= 1 h this loops at most twice, but keep a
    # generous bound for pathological zone data.
    for _ in range(64):
        sec = t // 1000
        off = _offset_ms(sec, tz)
        cand = t - (t + off) % period
        if _offset_ms(cand // 1000, tz) == off:
            # No transition between cand and t (6 h assumption): cand is the
            # greatest grid point of this segment that is <= t.
            return cand
        # A transition lies in (cand, t]: the segment containing t starts at
        # that transition, which is not a boundary (else cand would be >= it).
        trans_s = _first_second_with_new_offset(cand // 1000, sec, tz)
        t = trans_s * 1000 - 1
    raise WindowError(f"cannot locate the window containing {ts_ms} ms in {tz.key!r}")


def _clock_spans(
    start_ms: int, end_ms: int, period: int, tz: ZoneInfo
) -> list[tuple[int, int, int]]:
    first = _clock_floor(start_ms, period, tz)
    interior: list[range] = []
    count = 1
    for a, b, off in _segments(start_ms, end_ms, tz):
        lo = a if a > start_ms else start_ms + 1  # boundaries strictly > start
        g = lo + (-(lo + off)) % period  # first grid point >= lo
        r = range(g, b, period)
        count += len(r)
        if count > MAX_WINDOWS:
            raise _too_many(start_ms, end_ms, count)
        if r:
            interior.append(r)
    bounds: list[int] = [first]
    for r in interior:
        bounds.extend(r)
    bounds.append(end_ms)
    spans = [(bounds[k], bounds[k], bounds[k + 1]) for k in range(1, len(bounds) - 1)]
    spans.insert(0, (first, start_ms, bounds[1]))
    return spans


# --------------------------------------------------------------------------
# day / week / month


def _key_date(d: date, window: str) -> date:
    if window == "day":
        return d
    if window == "week":
        return d - timedelta(days=d.weekday())
    return d.replace(day=1)


def _next_key(d: date, window: str) -> date:
    try:
        if window == "day":
            return d + timedelta(days=1)
        if window == "week":
            return d + timedelta(days=7)
        if d.month == 12:
            return date(d.year + 1, 1, 1)
        return date(d.year, d.month + 1, 1)
    except (ValueError, OverflowError):  # past 9999-12-31, the last date Python has
        raise WindowError(f"date out of supported range: after {d.isoformat()}") from None


def _local_date(ts_ms: int, tz: ZoneInfo) -> date:
    return _local(ts_ms // 1000, tz).date()


def _date_start_ms(d: date, tz: ZoneInfo) -> int:
    """First instant (ms) of local date ``d``: local midnight with fold=0, or
    the gap's transition instant if midnight does not exist."""
    midnight = datetime.combine(d, time(0), tzinfo=tz)  # fold=0
    try:
        t_ms = _to_ms(midnight)
    except OverflowError:
        raise WindowError(f"date out of supported range: {d.isoformat()}") from None
    back = _local(t_ms // 1000, tz)
    if back.replace(tzinfo=None) == midnight.replace(tzinfo=None):
        return t_ms
    # Midnight falls in a gap.  Find the first second whose local date is >= d
    # (the transition instant when the gap starts at midnight).
    hi = t_ms // 1000
    while _local(hi, tz).date() < d:  # defensive; fold=0 lands after the gap
        hi += 3600
    lo = hi - 2 * 86400
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _local(mid, tz).date() >= d:
            hi = mid
        else:
            lo = mid
    return hi * 1000


def _calendar_floor(ts_ms: int, window: str, tz: ZoneInfo) -> tuple[date, int]:
    """(key date, start ms) of the calendar window containing ts_ms."""
    key = _key_date(_local_date(ts_ms, tz), window)
    floor = _date_start_ms(key, tz)
    floor_key = key
    # Normally the window of ts's own local date.  But if a fall-back fold
    # crosses midnight backwards (e.g. America/St_Johns until 2011: 00:01 NDT
    # -> 23:01 NST the previous day), the repeated pre-midnight hour lies after
    # the next date's fold=0 midnight; the floor is the greatest boundary <= ts,
    # consistent with window_spans.
    while True:
        key = _next_key(key, window)
        nxt = _date_start_ms(key, tz)
        if nxt > ts_ms:
            return floor_key, floor
        if nxt > floor:
            floor_key, floor = key, nxt


def _calendar_spans(
    start_ms: int, end_ms: int, window: str, tz: ZoneInfo
) -> list[tuple[int, int, int]]:
    key, first = _calendar_floor(start_ms, window, tz)
    bounds: list[int] = [first]
    last = start_ms
    while True:
        key = _next_key(key, window)
        b = _date_start_ms(key, tz)
        if b >= end_ms:
            break
        if b <= last:  # non-existent date or duplicate: skip
            continue
        bounds.append(b)
        last = b
        if len(bounds) > MAX_WINDOWS:
            raise _too_many(start_ms, end_ms, len(bounds))
    bounds.append(end_ms)
    spans = [(bounds[k], bounds[k], bounds[k + 1]) for k in range(1, len(bounds) - 1)]
    spans.insert(0, (first, start_ms, bounds[1]))
    return spans


# Day and week windows in UTC are whole multiples of a day (weeks from a Monday; the
# epoch's day 0 was a Thursday): arithmetic, not the calendar walk (a query's planning
# was a third of a one-customer month by day). Inside year 1970 to 9998 only, so that
# the calendar's range checks stay the same.
_UTC_KEYS = frozenset(("UTC", "Etc/UTC"))
_UTC_DAYS = {"day": (DAY_MS, 0), "week": (7 * DAY_MS, 3 * DAY_MS)}
_UTC_FAST_END = 253_370_764_800_000  # 9999-01-01T00:00:00Z


def _utc_day_spans(start_ms: int, end_ms: int, period: tuple[int, int]
                   ) -> list[tuple[int, int, int]]:
    length, shift = period
    first = start_ms - (start_ms + shift) % length
    bounds = range(first + length, end_ms, length)
    if len(bounds) > MAX_WINDOWS:
        raise _too_many(start_ms, end_ms, len(bounds))
    spans = [(first, start_ms, bounds[0] if bounds else end_ms)]
    spans.extend((lo, lo, lo + length) for lo in bounds)
    if bounds:
        spans[-1] = (bounds[-1], bounds[-1], end_ms)
    return spans


# --------------------------------------------------------------------------
# public API


def _too_many(start_ms: int, end_ms: int, count: int) -> WindowError:
    return WindowError(
        f"range [{start_ms}, {end_ms}) ms produces more than {MAX_WINDOWS} windows "
        f"(at least {count}): narrow the range or use a coarser window"
    )


def window_floor(ts_ms: int, window: str, tz: ZoneInfo) -> int:
    """The start (ms) of the calendar window containing ``ts_ms`` (always <= ts_ms)."""
    ts_ms = _check_ms(ts_ms, "ts_ms")
    window = _check_window(window)
    tz = _check_tz(tz)
    if window in _PERIOD_MS:
        return _clock_floor(ts_ms, _PERIOD_MS[window], tz)
    return _calendar_floor(ts_ms, window, tz)[1]


def window_spans(
    start_ms: int, end_ms: int, window: str | None, tz: ZoneInfo
) -> list[tuple[int, int, int]]:
    """Windows covering the half-open range ``[start_ms, end_ms)``, in order.

    Each item is ``(window_start_ms, lo_ms, hi_ms)``; see the module docstring.
    ``window=None`` yields the single span ``(start_ms, start_ms, end_ms)``;
    an empty range (``start_ms >= end_ms``) yields ``[]``.
    """
    start_ms = _check_ms(start_ms, "start_ms")
    end_ms = _check_ms(end_ms, "end_ms")
    if window is not None:
        window = _check_window(window)
    tz = _check_tz(tz)
    if start_ms >= end_ms:
        return []
    if window is None:
        return [(start_ms, start_ms, end_ms)]
    # Cheap early refusal: no window is longer than twice its nominal length.
    lower_bound = (end_ms - start_ms) // (2 * _NOMINAL_MS[window])
    if lower_bound > MAX_WINDOWS + 1:
        raise _too_many(start_ms, end_ms, lower_bound)
    if window in _PERIOD_MS:
        spans = _clock_spans(start_ms, end_ms, _PERIOD_MS[window], tz)
    elif window in _UTC_DAYS and tz.key in _UTC_KEYS and 0 <= start_ms and end_ms < _UTC_FAST_END:
        spans = _utc_day_spans(start_ms, end_ms, _UTC_DAYS[window])
    else:
        spans = _calendar_spans(start_ms, end_ms, window, tz)
    if len(spans) > MAX_WINDOWS:
        raise _too_many(start_ms, end_ms, len(spans))
    return spans
