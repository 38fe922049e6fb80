"""Meter definitions, and the rules every ingested event is checked against.

Pure domain layer: standard library, ``engine.schema``, ``engine.errors`` and
the leaf domain modules ``aggregates`` and ``windows`` only. ``check_meter``
turns a public ``Meter`` into the ``MeterDef`` the shards use (its aggregation
as a small int); ``merge_meter`` decides whether defining a meter again is a
no-op or a conflict. ``IngestRules`` are the configured bounds of an event;
``REPLAY_RULES`` the bounds replay uses, which accept anything a past
configuration may have accepted. A meter's CloudEvent mapping (``event_type``,
``value_property``, ``dimension_paths``) is checked here too
(``engine.schema.parse_path`` reads its JSON paths).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.domain.aggregates import KIND_BY_AGGREGATION
from engine.domain.windows import DAY_MS, MINUTE_MS
from engine.errors import MeterConflict
from engine.schema import AGGREGATIONS, Meter, parse_path

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
    check_event_mapping(meter, rules)
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
    # The CloudEvent mapping only shapes events still to come (the log holds mapped
    # events), so a meter without one may gain one; a definition without one (an older
    # client's idempotent define) keeps it; a different one is a conflict.
    mapping = _mapping(new.meter)
    if mapping is None or mapping == _mapping(old):
        return False
    if _mapping(old) is not None:
        raise MeterConflict(
            f"meter {new.name!r} already maps CloudEvents of type {old.event_type!r}; "
            "refusing a different mapping")
    return True


def _mapping(meter: Meter) -> tuple[str, str | None, dict[str, str]] | None:
    if meter.event_type is None:
        return None
    return meter.event_type, meter.value_property, dict(meter.dimension_paths)


def check_event_mapping(meter: Meter, rules: IngestRules) -> None:
    """The CloudEvent mapping of ``meter`` is usable; raises ``ValueError`` saying why not."""
    paths = meter.dimension_paths
    if not isinstance(paths, dict):
        raise ValueError("dimension_paths must map dimension keys to JSON paths")
    if meter.event_type is None:
        if meter.value_property is not None or paths:
            raise ValueError("value_property and dimension_paths need an event_type")
        return
    if type(meter.event_type) is not str or not meter.event_type:
        raise ValueError("event_type must be a non-empty string")
    if len(meter.event_type) > rules.max_value_chars:
        raise ValueError(f"event_type is longer than {rules.max_value_chars} characters")
    if meter.value_property is None:
        if meter.aggregation != "count":
            raise ValueError(f"a {meter.aggregation} meter with an event_type needs "
                             "value_property: the JSON path of its value in the event's data")
    else:
        parse_path(meter.value_property)
    if len(paths) > rules.max_dimensions:
        raise ValueError(f"dimension_paths has {len(paths)} keys, at most "
                         f"{rules.max_dimensions} allowed")
    for key, path in paths.items():
        if type(key) is not str or not key or len(key) > rules.max_key_chars:
            raise ValueError(f"dimension_paths key {key!r} must be a string of 1 to "
                             f"{rules.max_key_chars} characters")
        if key == meter.unique_dimension:
            raise ValueError(f"dimension_paths may not name {key!r}: a unique_count meter "
                             "takes the value it counts from value_property")
        parse_path(path)
