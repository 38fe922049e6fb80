"""Tests for engine.domain.windows: hand-checked examples, a brute-force model
(Hypothesis + an exhaustive sweep over every 2024-2027 offset transition of
the test zones) and error handling."""

from __future__ import annotations

import functools
import io
import struct
import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.domain.windows import (
    MAX_WINDOWS,
    WINDOW_NAMES,
    WindowError,
    resolve_timezone,
    window_floor,
    window_spans,
)

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
UTC = UTC

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kathmandu",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Pacific/Chatham",
    "Europe/London",
    "America/St_Johns",
)


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    """UTC wall time -> epoch ms, integer arithmetic only."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return (datetime(y, mo, d, h, mi, s, tzinfo=UTC) - epoch) // timedelta(milliseconds=1)


def local(t_ms: int, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(t_ms // 1000, tz)


def assert_tiles(spans: list[tuple[int, int, int]], start: int, end: int) -> None:
    assert spans, "non-empty range must give at least one span"
    assert spans[0][1] == start
    assert spans[-1][2] == end
    for ws, lo, hi in spans:
        assert ws <= lo < hi
    for k in range(len(spans) - 1):
        assert spans[k][2] == spans[k + 1][1]
        # interior windows start exactly at their clipped lower bound
        assert spans[k + 1][0] == spans[k + 1][1]


# --------------------------------------------------------------------------
# hand-checked examples


def test_window_names_and_limit() -> None:
    assert WINDOW_NAMES == ("minute", "hour", "day", "week", "month")
    assert MAX_WINDOWS == 200_000


def test_berlin_spring_forward_day_has_23_real_hours() -> None:
    tz = resolve_timezone("Europe/Berlin")
    day_start = ms(2026, 3, 28, 23)  # 2026-03-29 00:00 CET
    day_end = ms(2026, 3, 29, 22)  # 2026-03-30 00:00 CEST
    noon = ms(2026, 3, 29, 10)
    assert window_floor(noon, "day", tz) == day_start
    days = window_spans(day_start - HOUR, day_end + HOUR, "day", tz)
    assert [s[0] for s in days] == [ms(2026, 3, 27, 23), day_start, day_end]
    assert days[1][2] - days[1][1] == 23 * HOUR
    hours = window_spans(day_start, day_end, "hour", tz)
    assert len(hours) == 23
    assert all(hi - lo == HOUR and ws == lo for ws, lo, hi in hours)
    assert [local(ws, tz).hour for ws, _, _ in hours] == [0, 1, *list(range(3, 24))]


def test_berlin_fall_back_day_has_25_real_hours() -> None:
    tz = resolve_timezone("Europe/Berlin")
    day_start = ms(2026, 10, 24, 22)  # 2026-10-25 00:00 CEST
    day_end = ms(2026, 10, 25, 23)  # 2026-10-26 00:00 CET
    days = window_spans(day_start, day_end, "day", tz)
    assert days == [(day_start, day_start, day_end)]
    assert day_end - day_start == 25 * HOUR
    hours = window_spans(day_start, day_end, "hour", tz)
    assert len(hours) == 25
    assert all(hi - lo == HOUR for _, lo, hi in hours)
    # 02:00 occurs twice, both occurrences start a window
    assert [local(ws, tz).hour for ws, _, _ in hours] == [0, 1, 2, 2, *list(range(3, 24))]
    # floor inside the second 02:xx is the second 02:00
    assert window_floor(ms(2026, 10, 25, 1, 30), "hour", tz) == ms(2026, 10, 25, 1)
    assert window_floor(ms(2026, 10, 25, 0, 30), "hour", tz) == ms(2026, 10, 25, 0)


@pytest.mark.parametrize("name, minute", [("Asia/Kathmandu", 15), ("Asia/Kolkata", 30)])
def test_fractional_offset_hour_windows(name: str, minute: int) -> None:
    tz = resolve_timezone(name)
    start = ms(2026, 6, 1) + 123
    spans = window_spans(start, start + 2 * DAY, "hour", tz)
    assert_tiles(spans, start, start + 2 * DAY)
    assert len(spans) == 49
    for ws, _, _ in spans:
        assert ws % HOUR == minute * MIN
        assert local(ws, tz).minute == 0
    assert spans[0][0] == ms(2026, 5, 31, 23, minute)
    assert window_floor(ms(2026, 6, 1, 0, minute), "hour", tz) == ms(2026, 6, 1, 0, minute)
    assert window_floor(ms(2026, 6, 1, 0, minute) - 1, "hour", tz) == ms(2026, 5, 31, 23, minute)


def test_week_windows_start_monday_local_midnight() -> None:
    tz = resolve_timezone("America/New_York")
    start, end = ms(2026, 2, 20), ms(2026, 4, 20)
    spans = window_spans(start, end, "week", tz)
    assert_tiles(spans, start, end)
    for ws, _, _ in spans:
        lt = local(ws, tz)
        assert (lt.weekday(), lt.hour, lt.minute, lt.second) == (0, 0, 0, 0)
    # 2026-02-20 is a Friday: its week starts Monday 2026-02-16 00:00 EST
    assert spans[0][0] == ms(2026, 2, 16, 5)
    # the week of the DST change (Sun 2026-03-08) starts in EST and lasts 167 h
    assert window_floor(ms(2026, 3, 8, 12), "week", tz) == ms(2026, 3, 2, 5)
    assert window_floor(ms(2026, 3, 10), "week", tz) == ms(2026, 3, 9, 4)
    assert ms(2026, 3, 9, 4) - ms(2026, 3, 2, 5) == 167 * HOUR


def test_month_windows_new_york_2026() -> None:
    tz = resolve_timezone("America/New_York")
    start, end = ms(2026, 1, 1, 5), ms(2027, 1, 1, 5)
    spans = window_spans(start, end, "month", tz)
    # EST (UTC-5) months: Jan, Feb, Mar, Dec; EDT (UTC-4): Apr..Nov (Nov 1 00:00 is still EDT)
    expected = [ms(2026, m, 1, 4 if 4 <= m <= 11 else 5) for m in range(1, 13)]
    assert [s[0] for s in spans] == expected
    assert_tiles(spans, start, end)
    assert spans[2][2] - spans[2][1] == 31 * DAY - HOUR  # March loses an hour
    assert spans[10][2] - spans[10][1] == 30 * DAY + HOUR  # November gains one
    assert window_floor(ms(2026, 7, 31, 23), "month", tz) == ms(2026, 7, 1, 4)


def test_lord_howe_half_hour_dst() -> None:
    tz = resolve_timezone("Australia/Lord_Howe")
    # 2026-04-04T15:00Z: 01:59:59+11:00 -> 01:30:00+10:30 (wall clock never reads 02:00 in +11)
    assert local(ms(2026, 4, 4, 15) - 1000, tz).isoformat() == "2026-04-05T01:59:59+11:00"
    assert local(ms(2026, 4, 4, 15), tz).isoformat() == "2026-04-05T01:30:00+10:30"
    spans = window_spans(ms(2026, 4, 4, 12), ms(2026, 4, 4, 18), "hour", tz)
    assert [s[0] for s in spans] == [
        ms(2026, 4, 4, 12),
        ms(2026, 4, 4, 13),
        ms(2026, 4, 4, 14),  # 01:00+11, lasts 90 real minutes
        ms(2026, 4, 4, 15, 30),  # 02:00+10:30
        ms(2026, 4, 4, 16, 30),
        ms(2026, 4, 4, 17, 30),
    ]
    assert spans[2][2] - spans[2][1] == 90 * MIN
    # just after the transition the floor lies before it, in the +11 segment
    assert window_floor(ms(2026, 4, 4, 15, 10), "hour", tz) == ms(2026, 4, 4, 14)
    assert window_floor(ms(2026, 4, 4, 15, 29, 59), "hour", tz) == ms(2026, 4, 4, 14)
    assert window_floor(ms(2026, 4, 4, 15, 30), "hour", tz) == ms(2026, 4, 4, 15, 30)
    # spring forward 2026-10-03T15:30Z: 01:59:59+10:30 -> 02:30:00+11:00;
    # the transition instant reads :30, so it is no hour boundary
    spans = window_spans(ms(2026, 10, 3, 13), ms(2026, 10, 3, 18), "hour", tz)
    assert [s[0] for s in spans] == [
        ms(2026, 10, 3, 12, 30),
        ms(2026, 10, 3, 13, 30),
        ms(2026, 10, 3, 14, 30),  # 01:00+10:30, lasts 90 real minutes
        ms(2026, 10, 3, 16),  # 03:00+11
        ms(2026, 10, 3, 17),
    ]
    assert window_floor(ms(2026, 10, 3, 15, 40), "hour", tz) == ms(2026, 10, 3, 14, 30)
    assert window_floor(ms(2026, 10, 3, 15, 59, 59) + 999, "hour", tz) == ms(2026, 10, 3, 14, 30)
    # but it is a minute boundary
    assert window_floor(ms(2026, 10, 3, 15, 30) + 5, "minute", tz) == ms(2026, 10, 3, 15, 30)
    assert window_floor(ms(2026, 10, 3, 15, 30) - 5, "minute", tz) == ms(2026, 10, 3, 15, 29)


@pytest.mark.parametrize(
    "name, day, transition, prev_local",
    [
        # verified against the system tz database (see the asserts below)
        ("America/Santiago", date(2026, 9, 6), ms(2026, 9, 6, 4), "2026-09-05T23:59:59-04:00"),
        ("Asia/Beirut", date(2026, 3, 29), ms(2026, 3, 28, 22), "2026-03-28T23:59:59+02:00"),
        ("America/Havana", date(2026, 3, 8), ms(2026, 3, 8, 5), "2026-03-07T23:59:59-05:00"),
    ],
)
def test_midnight_gap_day_starts_at_transition(
    name: str, day: date, transition: int, prev_local: str
) -> None:
    tz = resolve_timezone(name)
    # the data really has a gap at midnight: 23:59:59 is followed by 01:00:00
    assert local(transition - 1000, tz).isoformat() == prev_local
    after = local(transition, tz)
    assert (after.date(), after.hour, after.minute, after.second) == (day, 1, 0, 0)
    noon = transition + 11 * HOUR
    assert window_floor(noon, "day", tz) == transition
    assert window_floor(transition, "day", tz) == transition
    assert window_floor(transition - 1, "day", tz) == transition - DAY
    spans = window_spans(transition - 2 * DAY, transition + 2 * DAY, "day", tz)
    starts = [s[0] for s in spans]
    t = transition
    assert starts == [t - 2 * DAY, t - DAY, t, t + 23 * HOUR, t + 47 * HOUR]
    assert spans[2][2] - spans[2][1] == 23 * HOUR


def test_midnight_fold_day_and_hours_havana() -> None:
    tz = resolve_timezone("America/Havana")
    # 2026-11-01T05:00Z: 00:59:59-04:00 -> 00:00:00-05:00, midnight happens twice
    assert local(ms(2026, 11, 1, 5) - 1000, tz).isoformat() == "2026-11-01T00:59:59-04:00"
    assert local(ms(2026, 11, 1, 5), tz).isoformat() == "2026-11-01T00:00:00-05:00"
    assert window_floor(ms(2026, 11, 1, 12), "day", tz) == ms(2026, 11, 1, 4)  # fold=0
    day = window_spans(ms(2026, 11, 1, 4), ms(2026, 11, 2, 5), "day", tz)
    assert day == [(ms(2026, 11, 1, 4), ms(2026, 11, 1, 4), ms(2026, 11, 2, 5))]
    hours = window_spans(ms(2026, 11, 1, 4), ms(2026, 11, 1, 7), "hour", tz)
    assert [s[0] for s in hours] == [ms(2026, 11, 1, 4), ms(2026, 11, 1, 5), ms(2026, 11, 1, 6)]
    assert window_floor(ms(2026, 11, 1, 5, 30), "hour", tz) == ms(2026, 11, 1, 5)


def test_fold_crossing_midnight_backwards_st_johns_2010() -> None:
    tz = resolve_timezone("America/St_Johns")
    # until 2011 St. John's changed at 00:01: 2010-11-07 00:00:59 NDT -> 2010-11-06 23:01 NST
    trans = ms(2010, 11, 7, 2, 31)
    assert local(trans - 1000, tz).isoformat() == "2010-11-07T00:00:59-02:30"
    assert local(trans, tz).isoformat() == "2010-11-06T23:01:00-03:30"
    first_midnight = ms(2010, 11, 7, 2, 30)  # 2010-11-07 00:00 NDT (fold=0)
    spans = window_spans(ms(2010, 11, 6, 12), ms(2010, 11, 8, 12), "day", tz)
    assert [s[0] for s in spans] == [ms(2010, 11, 6, 2, 30), first_midnight, ms(2010, 11, 8, 3, 30)]
    assert spans[1][2] - spans[1][1] == 25 * HOUR
    # the repeated 23:xx of Nov 6 comes after Nov 7's midnight: it is in Nov 7's window
    repeated = trans + 30 * MIN
    assert local(repeated, tz).date() == date(2010, 11, 6)
    assert window_floor(repeated, "day", tz) == first_midnight
    assert window_spans(repeated, repeated + 1, "day", tz)[0][0] == first_midnight
    for _, lo, hi in spans:
        for t in range(lo, hi, 7 * MIN):
            assert window_floor(t, "day", tz) == window_floor(lo, "day", tz)


def _tzif(posix_tz: str) -> bytes:
    """A minimal TZif v2 file with no explicit transitions: the footer TZ
    string governs all times."""
    header = b"TZif2" + b"\0" * 15 + struct.pack(">6l", 0, 0, 0, 0, 1, 4)
    block = header + struct.pack(">lBB", 0, 0, 0) + b"XST\0"
    return block + block + b"\n" + posix_tz.encode() + b"\n"


# Synthetic zone (UTC+0:30, DST UTC+1:30) whose spring-forward gap contains
# local midnight: last Sunday of March 23:30 -> Monday 00:30.  No real zone in
# the test list has midnight strictly inside a gap, where fold=0 would land
# half an hour after the transition.
MIDNIGHT_IN_GAP = ZoneInfo.from_file(
    io.BytesIO(_tzif("XST-0:30XDT-1:30,M3.5.0/23:30,M10.5.0/3")), key="Test/MidnightInGap"
)


def test_midnight_strictly_inside_gap_starts_at_transition() -> None:
    tz = MIDNIGHT_IN_GAP
    trans = ms(2026, 3, 29, 23)
    assert local(trans - 1000, tz).isoformat() == "2026-03-29T23:29:59+00:30"
    assert local(trans, tz).isoformat() == "2026-03-30T00:30:00+01:30"  # a Monday
    for window in ("day", "week"):
        assert window_floor(trans, window, tz) == trans
        assert window_floor(trans + 5 * HOUR, window, tz) == trans
        assert window_floor(trans - 1, window, tz) < trans
        spans = window_spans(trans - 1, trans + 1, window, tz)
        assert spans[1] == (trans, trans, trans + 1)
    assert window_floor(trans - 1, "day", tz) == ms(2026, 3, 28, 23, 30)
    for window in WINDOW_NAMES:
        check_against_model(tz, window, trans - 2 * DAY - 17, trans + 2 * DAY)
    check_against_model(tz, "month", ms(2025, 12, 20), ms(2027, 1, 10))


def test_none_window_empty_range_and_utc_default() -> None:
    tz = resolve_timezone("UTC")
    assert resolve_timezone() is tz
    assert resolve_timezone("Europe/Berlin") is resolve_timezone("Europe/Berlin")
    assert window_spans(5, 17, None, tz) == [(5, 5, 17)]
    assert window_spans(17, 17, "hour", tz) == []
    assert window_spans(18, 17, None, tz) == []
    assert window_spans(ms(2026, 1, 1, 0, 30), ms(2026, 1, 1, 2), "hour", tz) == [
        (ms(2026, 1, 1), ms(2026, 1, 1, 0, 30), ms(2026, 1, 1, 1)),
        (ms(2026, 1, 1, 1), ms(2026, 1, 1, 1), ms(2026, 1, 1, 2)),
    ]
    assert window_floor(-1, "minute", tz) == -MIN
    assert window_floor(-1, "day", tz) == -DAY


def test_fixed_offset_month_of_minutes_is_fast() -> None:
    tz = resolve_timezone("UTC")
    t0 = time.perf_counter()
    spans = window_spans(ms(2026, 1, 1), ms(2026, 2, 1), "minute", tz)
    elapsed = time.perf_counter() - t0
    assert len(spans) == 31 * 24 * 60
    assert spans[-1] == (ms(2026, 1, 31, 23, 59), ms(2026, 1, 31, 23, 59), ms(2026, 2, 1))
    # Measured 9-18 ms with a busy core beside it; generous for loaded machines.
    assert elapsed < 0.5, f"{elapsed:.3f} s"


# --------------------------------------------------------------------------
# errors


def test_unknown_zone() -> None:
    with pytest.raises(WindowError, match="Mars/Base") as exc:
        resolve_timezone("Mars/Base")
    assert "IANA" in str(exc.value)
    assert isinstance(exc.value, ValueError)
    for bad in ("", "../../etc/passwd", "America"):
        with pytest.raises(WindowError):
            resolve_timezone(bad)
    with pytest.raises(WindowError):
        resolve_timezone(42)  # type: ignore[arg-type]
    with pytest.raises(WindowError):
        resolve_timezone(None)  # type: ignore[arg-type]


def test_unknown_window() -> None:
    tz = resolve_timezone("UTC")
    with pytest.raises(WindowError, match="fortnight") as exc:
        window_spans(0, DAY, "fortnight", tz)
    for name in WINDOW_NAMES:
        assert name in str(exc.value)
    with pytest.raises(WindowError, match="year"):
        window_floor(0, "year", tz)
    with pytest.raises(WindowError):
        window_floor(0, None, tz)  # type: ignore[arg-type]


def test_non_integer_timestamps_rejected() -> None:
    tz = resolve_timezone("UTC")
    with pytest.raises(WindowError):
        window_floor(1.5, "hour", tz)  # type: ignore[arg-type]
    with pytest.raises(WindowError):
        window_spans(0, 10.0, "hour", tz)  # type: ignore[arg-type]


def test_too_many_windows() -> None:
    tz = resolve_timezone("Europe/Berlin")
    t0 = time.perf_counter()
    with pytest.raises(WindowError, match="200000"):
        window_spans(ms(2024, 1, 1), ms(2024, 1, 1) + 1000 * DAY, "minute", tz)
    with pytest.raises(WindowError):
        window_spans(0, 10**15, "hour", tz)
    refused_s = time.perf_counter() - t0  # measured under 0.1 ms: refused before any work
    assert refused_s < 1.0, f"{refused_s:.3f} s"
    # exactly at the limit is allowed, one more is refused (UTC: exact count)
    utc = resolve_timezone("UTC")
    assert len(window_spans(0, MAX_WINDOWS * MIN, "minute", utc)) == MAX_WINDOWS
    with pytest.raises(WindowError):
        window_spans(0, MAX_WINDOWS * MIN + 1, "minute", utc)
    with pytest.raises(WindowError):
        window_spans(0, (MAX_WINDOWS + 1) * DAY, "day", utc)


# --------------------------------------------------------------------------
# brute-force model


def _offset(t_s: int, tz: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(t_s, tz).utcoffset()


@functools.cache
def transitions(name: str) -> tuple[int, ...]:
    """Offset transitions (ms, to the hour after them) in 2024-2027, found by
    an hourly scan independent of the module under test."""
    tz = ZoneInfo(name)
    out = []
    s, stop = ms(2024, 1, 1) // 1000, ms(2028, 1, 1) // 1000
    prev = _offset(s, tz)
    while s < stop:
        s += 3600
        cur = _offset(s, tz)
        if cur != prev:
            out.append(s * 1000)
            prev = cur
    return tuple(out)


def test_transition_table_is_plausible() -> None:
    assert transitions("UTC") == ()
    assert transitions("Asia/Kolkata") == ()
    assert len(transitions("Europe/Berlin")) == 8
    assert len(transitions("Australia/Lord_Howe")) == 8


def _clock_boundary(t: int, tz: ZoneInfo, window: str) -> bool:
    lt = datetime.fromtimestamp(t // 1000, tz)
    return lt.second == 0 and (window == "minute" or lt.minute == 0)


def _cal_key(t: int, tz: ZoneInfo, window: str) -> date:
    d = datetime.fromtimestamp(t // 1000, tz).date()
    if window == "day":
        return d
    if window == "week":
        return d - timedelta(days=d.weekday())
    return d.replace(day=1)


def model_boundaries(start: int, end: int, tz: ZoneInfo, window: str) -> list[int]:
    """Every minute instant strictly inside (start, end) that starts a window."""
    first = -(-(start + 1) // MIN) * MIN  # first minute instant > start
    if window in ("minute", "hour"):
        return [t for t in range(first, end, MIN) if _clock_boundary(t, tz, window)]
    out = []
    prev_key = _cal_key(first - MIN, tz, window)
    # keys only change when the local date changes: compute dates per minute
    prev_date = datetime.fromtimestamp((first - MIN) // 1000, tz).date()
    for t in range(first, end, MIN):
        d = datetime.fromtimestamp(t // 1000, tz).date()
        if d != prev_date:
            prev_date = d
            key = _cal_key(t, tz, window)
            if key != prev_key:
                out.append(t)
                prev_key = key
    return out


def check_against_model(zone: str | ZoneInfo, window: str, start: int, end: int) -> None:
    tz = resolve_timezone(zone) if isinstance(zone, str) else zone
    spans = window_spans(start, end, window, tz)
    assert_tiles(spans, start, end)
    for ws, lo, _ in spans:
        assert window_floor(lo, window, tz) == ws
    assert [lo for _, lo, _ in spans[1:]] == model_boundaries(start, end, tz, window)
    # the first window's start is itself a boundary, and none lies in (ws, start]
    ws = spans[0][0]
    assert ws % MIN == 0  # all test zones have minute-aligned offsets in 2024-2027
    if window in ("minute", "hour"):
        assert _clock_boundary(ws, tz, window)
        assert not any(_clock_boundary(t, tz, window) for t in range(ws + MIN, start + 1, MIN))
    else:
        assert _cal_key(ws, tz, window) == _cal_key(start, tz, window)
        assert _cal_key(ws - MIN, tz, window) != _cal_key(ws, tz, window)


DST_ZONES = [z for z in ZONES if z not in ("UTC", "Asia/Kolkata", "Asia/Kathmandu")]


@pytest.mark.parametrize("name", DST_ZONES)
def test_every_transition_2024_2027_against_model(name: str) -> None:
    trans = transitions(name)
    assert len(trans) == 8
    for t in trans:
        check_against_model(name, "minute", t - 5 * HOUR - 7, t + 4 * HOUR + 11)
        check_against_model(name, "hour", t - 30 * HOUR, t + 30 * HOUR + 1)
        # ranges starting just after the transition: the first window may begin
        # before it, on the old offset's grid
        for after in (1, 1000 + 1, 10 * MIN + 3, 29 * MIN, 59 * MIN + 999):
            check_against_model(name, "hour", t + after, t + 3 * HOUR)
            check_against_model(name, "minute", t + after, t + after + 5 * MIN)
        for window in ("day", "week"):
            check_against_model(name, window, t - 9 * DAY + 3, t + 9 * DAY)
    check_against_model(name, "month", ms(2024, 1, 1) - 5 * DAY, ms(2024, 1, 1) + 370 * DAY)


def _anchor_and_range(draw: st.DrawFn, window: str) -> tuple[str, int, int]:
    name = draw(st.sampled_from(ZONES))
    trans = transitions(name)
    if trans and draw(st.integers(0, 3)) > 0:
        anchor = draw(st.sampled_from(trans))
    else:
        anchor = draw(st.integers(ms(2024, 1, 2), ms(2027, 12, 1)))
    # Hypothesis favours small integers, so draw coarse units plus a fine jitter
    # to get lengths spread over the whole allowed interval.
    if window in ("minute", "hour"):
        unit, max_units = HOUR, 72  # up to 3 days
    else:
        unit, max_units = DAY, 120  # up to 120 days
    before = draw(st.integers(0, max_units)) * unit + draw(st.integers(0, unit - 1))
    if draw(st.booleans()):
        # start a few hours before (or a little after) the anchor
        before = draw(st.integers(-2 * HOUR, 6 * HOUR))
    length = draw(st.integers(0, max_units - 1)) * unit + draw(st.integers(1, unit))
    # sometimes align to whole minutes / hours, sometimes arbitrary ms
    align = draw(st.sampled_from([1, 1000, MIN, HOUR]))
    start = (anchor - before) // align * align
    return name, start, start + length


@st.composite
def clock_cases(draw: st.DrawFn) -> tuple[str, str, int, int]:
    window = draw(st.sampled_from(["minute", "hour"]))
    return (window, *_anchor_and_range(draw, window))


@st.composite
def calendar_cases(draw: st.DrawFn) -> tuple[str, str, int, int]:
    window = draw(st.sampled_from(["day", "week", "month"]))
    return (window, *_anchor_and_range(draw, window))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clock_cases())
def test_clock_windows_match_model(case: tuple[str, str, int, int]) -> None:
    window, name, start, end = case
    check_against_model(name, window, start, end)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calendar_cases())
def test_calendar_windows_match_model(case: tuple[str, str, int, int]) -> None:
    window, name, start, end = case
    check_against_model(name, window, start, end)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(ZONES),
    st.sampled_from(WINDOW_NAMES),
    st.integers(ms(2024, 1, 1), ms(2028, 1, 1)),
)
def test_floor_properties(name: str, window: str, ts: int) -> None:
    tz = resolve_timezone(name)
    f = window_floor(ts, window, tz)
    assert f <= ts
    assert window_floor(f, window, tz) == f
    # f is the start of the span containing ts
    spans = window_spans(ts, ts + 1, window, tz)
    assert spans == [(f, ts, ts + 1)]
    # the next window starts after ts
    nxt = window_spans(f, ts + 1, window, tz)
    assert nxt[0][0] == f and nxt[-1][2] == ts + 1


def test_windows_past_the_last_python_date_are_refused_not_crashed() -> None:
    """A range ending in 9999 in a zone ahead of UTC needs windows after 9999-12-31:
    a WindowError (answered as an invalid query), never a ValueError from ``date``."""
    from engine.domain.windows import WindowError, window_spans

    for window in ("day", "week", "month"):
        with pytest.raises(WindowError, match="out of supported range"):
            window_spans(253_380_000_000_000, 253_402_300_799_999, window,
                         ZoneInfo("Pacific/Kiritimati"))


@given(st.one_of(st.integers(0, 253_370_764_800_000 - 1),
                 st.integers(0, 2_932_000).map(lambda day: day * 86_400_000)),
       st.one_of(st.integers(0, 400 * 86_400_000),
                 st.integers(0, 400).map(lambda days: days * 86_400_000)),
       st.sampled_from(["day", "week"]), st.sampled_from(["UTC", "Etc/UTC"]))
def test_utc_day_and_week_spans_are_the_calendars(start_ms: int, length_ms: int, window: str,
                                                  zone: str) -> None:
    """Day and week windows in UTC are computed by arithmetic; the calendar walk
    (every other zone's path) gives the same spans, range edges included."""
    from engine.domain import windows as windows_module

    tz = ZoneInfo(zone)
    end_ms = min(start_ms + length_ms, 253_370_764_800_000 - 1)
    fast = windows_module.window_spans(start_ms, end_ms, window, tz)
    if start_ms >= end_ms:
        assert fast == []
        return
    assert fast == windows_module._calendar_spans(start_ms, end_ms, window, tz)
