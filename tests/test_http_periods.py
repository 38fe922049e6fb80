"""engine/http/periods.py restates the engine's period rule (the HTTP shell may not import
engine.domain): both must give the same bounds, for random instants and around each
offset change of zones with odd rules."""

from __future__ import annotations

import random
from datetime import datetime
from zoneinfo import ZoneInfo

from engine import Limit
from engine.domain.limits import period_bounds as engine_period_bounds
from engine.http.periods import period_bounds


def test_period_bounds_agree_with_the_engines() -> None:
    """The HTTP layer restates the engine's period rule (it may not import engine.domain):
    the same bounds for random instants, and for instants around each DST change."""
    zones = ["UTC", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kathmandu",
             "America/Santiago", "America/St_Johns", "America/Havana", "Pacific/Apia"]
    rng = random.Random(12)
    instants = [(rng.choice(zones), rng.randrange(0, 2_000_000_000_000)) for _ in range(600)]
    for zone in zones:
        tz = ZoneInfo(zone)
        step_s = 6 * 3600
        for second in range(1_600_000_000, 1_600_000_000 + 2 * 366 * 86400, step_s):
            before = datetime.fromtimestamp(second, tz).utcoffset()
            if datetime.fromtimestamp(second + step_s, tz).utcoffset() != before:
                instants += [(zone, (second + k * 1800) * 1000 + 1) for k in range(13)]
    for zone, now_ms in instants:
        for period in ("hour", "day", "week", "month", "total"):
            limit = Limit(id="x", meter_api_name="m", thresholds=[1], period=period,
                          timezone=zone)
            assert period_bounds(now_ms, limit) == engine_period_bounds(now_ms, limit), (
                zone, period, now_ms)
