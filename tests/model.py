"""A naive model of the engine: a list of events and a straightforward aggregation.

Used by the property tests as the reference the engine must agree with.
Everything here is computed in Decimal from the raw inputs, event by event.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from engine.domain.windows import resolve_timezone, window_floor
from engine.schema import Event, Meter, Query


def to_decimal(value: Any) -> Decimal:
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


@dataclass
class ModelEvent:
    event: Event
    order: int  # global ingest order: ties on timestamp go to the later one


@dataclass
class Model:
    meters: dict[str, Meter] = field(default_factory=dict)
    events: list[ModelEvent] = field(default_factory=list)
    seen: set[tuple[str, str, str]] = field(default_factory=set)

    def ingest(self, batch: list[Event]) -> tuple[int, int]:
        accepted = duplicates = 0
        for event in batch:
            if event.unique_id is not None:
                key = (event.meter_api_name, event.customer_id, event.unique_id)
                if key in self.seen:
                    duplicates += 1
                    continue
                self.seen.add(key)
            self.accept(event)
            accepted += 1
        return accepted, duplicates

    def accept(self, event: Event) -> None:
        """Keep one accepted event (a subclass may note more about it)."""
        self.events.append(ModelEvent(event, len(self.events)))

    def query(self, query: Query) -> list[tuple[int, dict[str, Any], Any]]:
        meter = self.meters[query.meter_api_name]
        tz = resolve_timezone(query.timezone)
        unique_key = meter.unique_dimension
        groups: dict[tuple[int, tuple[Any, ...]], list[ModelEvent]] = {}
        for item in self.events:
            event = item.event
            if event.meter_api_name != meter.name:
                continue
            if not query.start_ms <= event.meter_time_in_millis < query.end_ms:
                continue
            dims = {k: v for k, v in event.dimensions.items() if k != unique_key}
            fields = {**dims, "customer_id": event.customer_id}
            if any(fields.get(k) not in allowed for k, allowed in query.filter.items()):
                continue
            if query.window is None:
                label = query.start_ms
            else:
                label = window_floor(event.meter_time_in_millis, query.window, tz)
            group = tuple(fields.get(k) for k in query.group_by)
            groups.setdefault((label, group), []).append(item)
        values = {key: aggregate(meter, items) for key, items in groups.items()}
        order = sorted(values, key=lambda k: (k[0], group_order(k[1])))
        if query.take is not None:
            totals: dict[tuple[Any, ...], list[ModelEvent]] = {}
            for (_, group), items in groups.items():
                totals.setdefault(group, []).extend(items)
            sign = 1 if query.take.ascending else -1
            ranked = sorted(
                totals, key=lambda g: (sign * aggregate(meter, totals[g]), group_order(g))
            )
            rank = {g: i for i, g in enumerate(ranked[: query.take.limit])}
            order = sorted(
                (k for k in values if k[1] in rank), key=lambda k: (k[0], rank[k[1]])
            )
        return [(label, dict(zip(query.group_by, group, strict=True)), values[(label, group)])
                for label, group in order]


def group_order(group: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((v is not None, v or "") for v in group)


def aggregate(meter: Meter, items: list[ModelEvent]) -> Any:
    values = [to_decimal(i.event.meter_value) for i in items]
    kind = meter.aggregation
    if kind == "sum":
        with decimal.localcontext(decimal.Context(prec=200)):
            return sum(values, Decimal(0))
    if kind == "count":
        return len(values)
    if kind == "max":
        return max(values)
    if kind == "min":
        return min(values)
    if kind == "avg":
        with decimal.localcontext(decimal.Context(prec=200)):
            total = sum(values, Decimal(0))
        return total / Decimal(len(values))  # default context: 28 digits, half-even
    if kind == "latest":
        best = max(items, key=lambda i: (i.event.meter_time_in_millis, i.order))
        return to_decimal(best.event.meter_value)
    assert meter.unique_dimension is not None
    return len({i.event.dimensions[meter.unique_dimension] for i in items})
