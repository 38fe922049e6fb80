"""Limits: thresholds on a customer's usage per period, and the crossings they fire.

Pure domain layer: standard library, ``engine.schema`` and the domain modules
``aggregates``, ``batch``, ``meters``, ``series``, ``values`` and ``windows``
(never ``shard`` or ``query``: the shard holds its limits). A shard
keeps, per limit, which thresholds already fired for each (customer, period)
it owns. After it applies a batch slice, it recomputes the usage of every
(customer, period) the slice touched from its own buckets (the same numbers a
query returns) and fires each threshold that the usage now reaches and that
had not fired in that period. A limit added (or replaced) is evaluated at once
for the period containing the time it was added, so a customer already over a
threshold is alerted immediately.

Everything here is a deterministic function of the write-ahead-log order:
replay produces the same crossings, in the same order.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from engine.domain.aggregates import COUNT, SUM, finalize, merge_partial, slice_partial
from engine.domain.batch import ShardRouter
from engine.domain.meters import MeterDef
from engine.domain.series import MeterShard, Series, dims_match
from engine.domain.values import Number, exact_value
from engine.domain.windows import (
    MINUTE_MS,
    WindowError,
    resolve_timezone,
    window_floor,
    window_spans,
)
from engine.schema import Limit

PERIODS = ("hour", "day", "week", "month", "total")
MAX_THRESHOLDS = 32
# How far past a period's start its end certainly lies (covers DST and month lengths).
_PERIOD_REACH_MS = {"hour": 4 * 3_600_000, "day": 3 * 86_400_000, "week": 9 * 86_400_000,
                    "month": 33 * 86_400_000}
TOTAL_END_MS = 253_402_300_800_000


class LimitError(ValueError):
    """A limit definition that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True, eq=False)
class LimitDef:
    """A validated limit, as shards use it."""

    limit: Limit
    meter: MeterDef
    thresholds: tuple[Number, ...]  # exact, ascending, distinct
    customers: frozenset[str] | None  # from customer_id or filter["customer_id"]
    dim_filters: tuple[tuple[str, frozenset[str]], ...]

    @property
    def id(self) -> str:
        return self.limit.id


def check_limit(limit: Limit, meters: dict[str, MeterDef]) -> LimitDef:
    if type(limit) is not Limit:
        raise LimitError(f"expected a Limit, got {type(limit).__name__}")
    if type(limit.id) is not str or not limit.id or len(limit.id) > 256:
        raise LimitError("limit id must be a non-empty string of at most 256 characters")
    meter = meters.get(limit.meter_api_name)
    if meter is None:
        raise LimitError(f"unknown meter {limit.meter_api_name!r}")
    if limit.period not in PERIODS:
        raise LimitError(f"unknown period {limit.period!r}: use one of {', '.join(PERIODS)}")
    try:
        resolve_timezone(limit.timezone)
    except WindowError as exc:
        raise LimitError(str(exc)) from None
    if not isinstance(limit.thresholds, list) or not 1 <= len(limit.thresholds) <= MAX_THRESHOLDS:
        raise LimitError(f"thresholds must be a list of 1 to {MAX_THRESHOLDS} numbers")
    try:
        thresholds = tuple(sorted({exact_value(t) for t in limit.thresholds}))
    except ValueError as exc:
        raise LimitError(f"threshold: {exc}") from None
    customers: frozenset[str] | None = None
    if limit.customer_id is not None:
        if type(limit.customer_id) is not str or not limit.customer_id:
            raise LimitError("customer_id must be null or a non-empty string")
        customers = frozenset([limit.customer_id])
    dim_filters = []
    for key, allowed in limit.filter.items():
        if type(key) is not str or not key or not isinstance(allowed, list) or not all(
            type(v) is str for v in allowed
        ):
            raise LimitError("filter must map 'customer_id' or dimension keys to lists of strings")
        if key == meter.unique_dimension:
            raise LimitError(f"meter {meter.name!r} counts distinct {key!r}; cannot filter on it")
        if key == "customer_id":
            allowed_set = frozenset(allowed)
            customers = allowed_set if customers is None else customers & allowed_set
        else:
            dim_filters.append((key, frozenset(allowed)))
    return LimitDef(limit, meter, thresholds, customers, tuple(dim_filters))


def period_bounds(ts_ms: int, limit: Limit) -> tuple[int, int]:
    """[start, end) of the limit's period containing ``ts_ms``."""
    if limit.period == "total":
        return 0, TOTAL_END_MS
    tz = resolve_timezone(limit.timezone)
    start = window_floor(ts_ms, limit.period, tz)
    spans = window_spans(start, start + _PERIOD_REACH_MS[limit.period], limit.period, tz)
    return start, spans[0][2]


# A crossing before it gets its sequence number:
# (limit id, customer, meter, threshold, value, period start ms)
Crossing = tuple[str, str, str, Number, Number, int]


USAGE_MEMO_MAX = 200_000  # remembered usages per limit and shard before starting over
RECENT_PERIODS = 4  # periods remembered per limit


class ShardLimits:
    """Limits as one shard evaluates them."""

    def __init__(self) -> None:
        self.by_meter: dict[str, list[LimitDef]] = {}
        self.by_id: dict[str, LimitDef] = {}
        # limit id -> (customer, period start) -> bitmask of fired threshold indexes
        self.fired: dict[str, dict[tuple[str, int], int]] = {}
        # limit id -> (customer, period start) -> usage, for sum and count limits: kept
        # up to date by adding each batch's accepted values, so a batch costs its own
        # events, not a scan of the customer's buckets. A cache: filled from the buckets
        # on a miss (after a restart, or once cleared for size), never exported.
        self.usage: dict[str, dict[tuple[str, int], Any]] = {}
        self._periods: dict[str, list[tuple[int, int]]] = {}  # limit id -> recent periods

    def add(self, limit: LimitDef, meter_shard: MeterShard | None, now_ms: int) -> list[Crossing]:
        """Install (or replace) a limit and evaluate it at once for the current period."""
        self.remove(limit.id)
        self.by_id[limit.id] = limit
        self.by_meter.setdefault(limit.meter.name, []).append(limit)
        self.fired[limit.id] = {}
        self.usage[limit.id] = {}
        if meter_shard is None:
            return []
        start, end = period_bounds(now_ms, limit.limit)
        crossings: list[Crossing] = []
        for customer in list(meter_shard.by_customer):
            if limit.customers is None or customer in limit.customers:
                self._evaluate(limit, meter_shard, customer, start, end, crossings)
        return crossings

    def remove(self, limit_id: str) -> bool:
        limit = self.by_id.pop(limit_id, None)
        if limit is None:
            return False
        self.by_meter[limit.meter.name].remove(limit)
        self.fired.pop(limit_id, None)
        self.usage.pop(limit_id, None)
        self._periods.pop(limit_id, None)
        return True

    def after_apply(
        self, meter_shard: MeterShard, customers: list[str], dims_keys: list[str],
        times: list[int], accepted: list[int], values: list[Any],
    ) -> list[Crossing]:
        """Crossings caused by the accepted events (positions) of one applied slice.

        Runs after the slice is in the buckets: a usage read from them includes it.
        """
        limits = self.by_meter.get(meter_shard.meter.name)
        if not limits or not accepted:
            return []
        crossings: list[Crossing] = []
        kind = meter_shard.meter.kind
        additive = kind == SUM or kind == COUNT
        for limit in limits:
            # (customer, period start) -> [period end, this slice's addition to the usage]
            touched: dict[tuple[str, int], list[Any]] = {}
            period = (0, -1)
            for position in accepted:
                customer = customers[position]
                if limit.customers is not None and customer not in limit.customers:
                    continue
                if limit.dim_filters and not dims_match(
                    meter_shard.dims_by_key[dims_keys[position]], limit.dim_filters
                ):
                    continue
                ts = times[position]
                if not period[0] <= ts < period[1]:
                    period = self._period_of(limit, ts)
                key = (customer, period[0])
                entry = touched.get(key)
                if entry is None:
                    touched[key] = entry = [period[1], 0]
                if additive:
                    entry[1] += 1 if kind == COUNT else values[position]
            memo = self.usage[limit.id]
            if len(memo) > USAGE_MEMO_MAX:
                memo.clear()
            for (customer, start), (end, added) in touched.items():
                period_memo = self._memo_for(limit, start, end)
                known = None if period_memo is None else period_memo.get((customer, start))
                if known is None:
                    value = usage(meter_shard, customer, limit, start, end)
                else:
                    value = known + added
                if period_memo is not None and value is not None:
                    period_memo[(customer, start)] = value
                self._check(limit, customer, start, value, crossings)
        return crossings

    def _period_of(self, limit: LimitDef, ts_ms: int) -> tuple[int, int]:
        """``period_bounds``, remembering the last few periods of each limit (events of a
        batch fall in one or two periods; computing one in a time zone costs ~4 us)."""
        recent = self._periods.setdefault(limit.id, [])
        for period in recent:
            if period[0] <= ts_ms < period[1]:
                return period
        period = period_bounds(ts_ms, limit.limit)
        recent.insert(0, period)
        del recent[RECENT_PERIODS:]
        return period

    def _evaluate(self, limit: LimitDef, meter_shard: MeterShard, customer: str, start: int,
                  end: int, crossings: list[Crossing]) -> None:
        value = usage(meter_shard, customer, limit, start, end)
        memo = self._memo_for(limit, start, end)
        if memo is not None and value is not None:
            memo[(customer, start)] = value
        self._check(limit, customer, start, value, crossings)

    def _memo_for(self, limit: LimitDef, start: int, end: int) -> dict[Any, Any] | None:
        """The usage memo for this limit and period, or None where the buckets must be
        read every time: aggregations other than sum and count, and periods with a bound
        inside a minute (zones with seconds in their offset, such as Monrovia before
        1972), where usage() counts whole-minute buckets that need not match the events'
        own periods."""
        kind = limit.meter.kind
        if (kind != SUM and kind != COUNT) or start % MINUTE_MS or end % MINUTE_MS:
            return None
        return self.usage.get(limit.id)

    def _check(self, limit: LimitDef, customer: str, start: int, value: Number | None,
               crossings: list[Crossing]) -> None:
        """Record and report the thresholds ``value`` reaches that had not fired."""
        if value is None:
            return
        fired_for_limit = self.fired[limit.id]
        fired = fired_for_limit.get((customer, start), 0)
        newly = fired
        for index, threshold in enumerate(limit.thresholds):
            if value < threshold:
                break
            if not fired & (1 << index):
                newly |= 1 << index
                crossings.append((limit.id, customer, limit.meter.name, threshold, value, start))
        if newly != fired:
            fired_for_limit[(customer, start)] = newly

    # ------------------------------------------------------------ snapshot

    def export(self) -> list[list[Any]]:
        """[[limit id, [[customer, period start, mask], ...]], ...] in canonical order."""
        return [
            [limit_id, [[c, p, m] for (c, p), m in sorted(self.fired[limit_id].items())]]
            for limit_id in sorted(self.fired)
        ]

    def load(self, limits: list[LimitDef], fired: list[list[Any]], route: ShardRouter,
             shard_index: int) -> None:
        """Install ``limits`` and the fired masks of this shard's customers."""
        for limit in limits:
            self.by_id[limit.id] = limit
            self.by_meter.setdefault(limit.meter.name, []).append(limit)
            self.fired.setdefault(limit.id, {})
            self.usage.setdefault(limit.id, {})
        for limit_id, entries in fired:
            if limit_id not in self.fired:
                continue
            target = self.fired[limit_id]
            for customer, period_start, mask in entries:
                if route(customer) == shard_index:
                    target[(customer, period_start)] = mask


def usage(meter_shard: MeterShard, customer: str, limit: LimitDef, start_ms: int,
          end_ms: int) -> Number | None:
    """The limit's usage for one customer in [start, end), from the buckets; None if none."""
    kind = meter_shard.meter.kind
    first, last = -(-start_ms // MINUTE_MS), -(-end_ms // MINUTE_MS)
    merged: Any = None
    series_list: list[Series] = meter_shard.by_customer.get(customer, [])
    for series in series_list:
        if limit.dim_filters and not dims_match(series.dims, limit.dim_filters):
            continue
        minutes = series.minutes
        lo = bisect_left(minutes, first)
        hi = bisect_left(minutes, last, lo)
        if lo == hi:
            continue
        partial = slice_partial(kind, series, lo, hi)
        merged = partial if merged is None else merge_partial(kind, merged, partial)
    return None if merged is None else finalize(kind, merged)
