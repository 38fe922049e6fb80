"""Meter definitions, and the rules every ingested event is checked against.

Pure domain layer: standard library, ``engine.schema``, ``engine.errors`` and
the leaf domain modules ``aggregates`` and ``windows`` only. ``check_meter``
turns a public ``Meter`` into the ``MeterDef`` the shards use (its aggregation
as a small int); ``merge_meter`` decides whether defining a meter again is a
no-op or a conflict. ``IngestRules`` are the configured bounds of an event;
``REPLAY_RULES`` the bounds replay uses, which accept anything a past
configuration may have accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.domain.aggregates import KIND_BY_AGGREGATION
from engine.domain.windows import DAY_MS, MINUTE_MS
from engine.errors import MeterConflict
from engine.schema import AGGREGATIONS, Meter

# Timestamps: non-negative and before year 9999, so a minute index fits 32 bits and
# every calendar window containing one (a month, in any zone) ends before year 10000.
MAX_TIMESTAMP_MS = 253_370_764_800_000 - 1


@dataclass(frozen=True, slots=True)
class IngestRules:
    """What an event may look like. Defaults are documented in docs/api.md."""

    late_ms: int = 35 * DAY_MS  # events up to 35 days old are accepted
    future_ms: int = 5 * MINUTE_MS  # and up to 5 minutes ahead of the engine clock
    max_dimensions: int = 16
    max_key_chars: int = 128  # dimension keys
    max_value_chars: int = 256  # dimension values, customer ids, unique ids, meter names
    max_batch_events: int = 100_000


# The public name before "limits" came to mean alert limits only (engine.IngestLimits).
IngestLimits = IngestRules

# What replay checks: only what normalising an event needs, never the configured rules.
REPLAY_RULES = IngestRules(
    late_ms=MAX_TIMESTAMP_MS, future_ms=MAX_TIMESTAMP_MS, max_dimensions=1 << 30,
    max_key_chars=1 << 30, max_value_chars=1 << 30, max_batch_events=1 << 62,
)


@dataclass(frozen=True, slots=True, eq=False)
class MeterDef:
    """A defined meter, as the shards use it."""

    name: str
    kind: int  # an aggregation kind of engine.domain.aggregates
    unique_dimension: str | None
    meter: Meter


def check_meter(meter: Meter, rules: IngestRules) -> MeterDef:
    """Validate a meter definition; raises ``ValueError`` (not ``MeterConflict``) on bad input."""
    if type(meter.name) is not str or not meter.name:
        raise ValueError("meter name must be a non-empty string")
    if len(meter.name) > rules.max_value_chars:
        raise ValueError(f"meter name is longer than {rules.max_value_chars} characters")
    if meter.aggregation not in KIND_BY_AGGREGATION:
        raise ValueError(
            f"unknown aggregation {meter.aggregation!r}: use one of {', '.join(AGGREGATIONS)}"
        )
    if meter.aggregation == "unique_count":
        if type(meter.unique_dimension) is not str or not meter.unique_dimension:
            raise ValueError("a unique_count meter needs unique_dimension (a dimension key)")
    elif meter.unique_dimension is not None:
        raise ValueError("unique_dimension is only meaningful for unique_count meters")
    return MeterDef(
        meter.name, KIND_BY_AGGREGATION[meter.aggregation], meter.unique_dimension, meter
    )


def merge_meter(existing: MeterDef | None, new: MeterDef) -> bool:
    """True if ``new`` must be stored; raises ``MeterConflict`` if it contradicts ``existing``."""
    if existing is None:
        return True
    old = existing.meter
    if old.aggregation != new.meter.aggregation or old.unique_dimension != new.unique_dimension:
        raise MeterConflict(
            f"meter {new.name!r} is already defined with aggregation {old.aggregation!r}"
            + (f" on {old.unique_dimension!r}" if old.unique_dimension else "")
            + f"; refusing to redefine it as {new.meter.aggregation!r}"
        )
    return False
