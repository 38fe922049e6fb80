"""The Hypothesis inputs shared by the model tests (tests/test_engine_model.py and
tests/test_limits_model.py): meters of every aggregation, customers, time zones with
odd offsets and DST changes, and events near anchors where windows cross them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from engine import Event, Meter
from tests.helpers.events import DAY, HOUR, MINUTE

# Anchors near DST changes in several zones, so windows cross them often.
ANCHORS_MS = [
    int(datetime(2026, 3, 29, 0, 0, tzinfo=UTC).timestamp()) * 1000,  # Europe DST start
    int(datetime(2026, 10, 25, 0, 0, tzinfo=UTC).timestamp()) * 1000,  # Europe DST end
    int(datetime(2026, 3, 8, 6, 0, tzinfo=UTC).timestamp()) * 1000,  # US DST start
    int(datetime(2026, 11, 1, 5, 0, tzinfo=UTC).timestamp()) * 1000,  # US DST end
    int(datetime(2026, 1, 31, 20, 0, tzinfo=UTC).timestamp()) * 1000,  # month end
]
ZONES = [
    "UTC", "Europe/Berlin", "America/New_York", "Asia/Kathmandu", "Asia/Kolkata",
    "Australia/Lord_Howe", "America/St_Johns", "Pacific/Chatham",
]
METERS = [
    Meter(name="m_sum", aggregation="sum"),
    Meter(name="m_count", aggregation="count"),
    Meter(name="m_max", aggregation="max"),
    Meter(name="m_min", aggregation="min"),
    Meter(name="m_avg", aggregation="avg"),
    Meter(name="m_latest", aggregation="latest"),
    Meter(name="m_unique", aggregation="unique_count", unique_dimension="user"),
]
CUSTOMERS = ["acme", "globex", "initech", "umbrella", "hooli", "c-6", "c-7"]

values = st.one_of(
    st.integers(-10**6, 10**6),
    st.integers(-(10**20), 10**20),  # beyond int64 sums
    st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda f: round(f, 4)),
)


@st.composite
def events(draw: Any, anchor_ms: int) -> Event:
    meter = draw(st.sampled_from(METERS))
    dims = draw(st.dictionaries(st.sampled_from(["region", "plan"]),
                                st.sampled_from(["eu", "us", "x"]),
                                max_size=2))
    if meter.unique_dimension:
        dims["user"] = draw(st.sampled_from(["u1", "u2", "u3", "u4"]))
    # Mostly near the anchor, some whole days away (late / out of order), some on exact minutes.
    offset = draw(st.one_of(
        st.integers(-2 * DAY, 2 * DAY),
        st.integers(-48, 48).map(lambda h: h * HOUR),
        st.integers(-3 * 24 * 60, 3 * 24 * 60).map(lambda m: m * MINUTE),
    ))
    unique_id = draw(st.one_of(st.none(), st.sampled_from([f"id-{i}" for i in range(12)])))
    return Event(
        meter_api_name=meter.name,
        customer_id=draw(st.sampled_from(CUSTOMERS)),
        meter_value=draw(values),
        meter_time_in_millis=anchor_ms + offset,
        dimensions=dims,
        unique_id=unique_id,
    )
