"""Limits: thresholds on a customer's usage per period, and the crossings they fire.

Pure domain layer: standard library, ``engine.schema`` and the domain modules
``aggregates``, ``batch``, ``meters``, ``records``, ``series``, ``values`` and
``windows`` (never ``shard`` or ``query``: the shard holds its limits, and is
their ``LimitSource``). A shard keeps, per limit and (customer, period) it
owns, the period's partial aggregate and which thresholds already fired. After
it applies a batch slice, it merges the slice's accepted events into the
partials they touch and fires each threshold that the finalized usage now
reaches and that had not fired in that period. A batch costs its own events,
never a read of stored usage: the source is read only to create a missing
state. A limit added (or replaced) is evaluated at once for the period
containing the time it was added, so a customer already over a threshold is
alerted immediately.

Usage equals what a query over the period returns for that customer under the
limit's filters, with one documented exception kept from before: a period with
a bound inside a minute (``period_of_bucket``).

A *usage feed* is a limit without thresholds (``usage_feed``): its changed
values are published, not compared. After each slice (and when it is
installed) every (customer, period) whose usage it tracks changed is appended
to ``ShardLimits.feed`` as ``(feed id, customer, period start, usage)``; the
runtime hands the feed of each applied batch to whoever installed it (pricing,
for cost limits), so metering never knows what the usage is priced at.

Everything here is a deterministic function of the write-ahead-log order:
replay produces the same crossings, in the same order, and the same states.

A unique_count limit keeps its distinct values as 64-bit hashes
(``engine.domain.distinct``: 8 bytes a value instead of a set of strs; the chance of
a collision and what it would do are stated there). Checkpoints store the states of
unique_count limits as a log of *chunks*
(``unique_chunks``): a month's or the whole history's distinct values per customer
grow with the period, and encoding them all at every checkpoint stalled every ack
behind it. A chunk holds, per (period, customer) changed since the checkpoint
before, the hashes added, or the whole state when it was read from the source or
rebuilt by a correction (an empty whole state: gone). A restore applies a limit's
chunks in order; after ``MAX_UNIQUE_CHUNKS`` of them the next checkpoint writes the
limit whole, one chunk, and drops the others (one such limit per shard and
checkpoint). The states of the other kinds (a number or two per customer and
period) are written whole, in the shard's part.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from engine.domain.aggregates import (
    AVG,
    COUNT,
    LATEST,
    MAX,
    SUM,
    UNIQUE,
    distinct_values,
    finalize,
    merge_partial,
)
from engine.domain.batch import Columns, ShardRouter
from engine.domain.distinct import DistinctHashes, hashes_bytes, value_hash
from engine.domain.meters import MeterDef
from engine.domain.records import decimal_or_int
from engine.domain.series import MeterShard, dims_match
from engine.domain.values import Number, exact_value, fits_int64
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
# A unique_count limit's chunks on one shard before a checkpoint writes it whole again.
MAX_UNIQUE_CHUNKS = 16


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
    if limit.measure != "usage":
        raise LimitError(f"measure {limit.measure!r}: metering evaluates usage limits only "
                         "(cost limits are pricing's)")
    if limit.meter_api_name is None:
        raise LimitError("a usage limit needs a meter_api_name")
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
    check_webhook_url(limit.webhook_url)
    return LimitDef(limit, meter, thresholds, customers, tuple(dim_filters))


def usage_feed(feed_id: str, meter: MeterDef, period: str, timezone: str,
               dim_filters: dict[str, list[str]]) -> LimitDef:
    """A limit without thresholds that publishes every change of each customer's
    usage of ``meter`` per ``period`` in ``timezone`` under ``dim_filters`` (what
    ``Query.filter`` means), instead of firing (``ShardLimits.feed``)."""
    limit = Limit(id=feed_id, meter_api_name=meter.name, thresholds=[], period=period,  # type: ignore[arg-type]
                  timezone=timezone, filter=dim_filters)
    return LimitDef(limit, meter, (), None,
                    tuple((key, frozenset(values)) for key, values in sorted(dim_filters.items())))


# A feed entry: (feed id, customer, period start ms, the period's usage now)
UsageChange = tuple[str, str, int, Number]


MAX_URL_CHARS = 2048


def check_webhook_url(url: object) -> None:
    """None, or an absolute http(s) URL with a host; raises ``LimitError`` otherwise."""
    if url is None:
        return
    if type(url) is not str or len(url) > MAX_URL_CHARS:
        raise LimitError(f"webhook_url must be a URL of at most {MAX_URL_CHARS} characters")
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if scheme.lower() not in ("http", "https") or not host or any(
            c.isspace() or ord(c) < 32 for c in url):
        raise LimitError(f"webhook_url must be an http:// or https:// URL, got {url!r}")


def period_bounds(ts_ms: int, limit: Limit) -> tuple[int, int]:
    """[start, end) of the limit's period containing ``ts_ms``."""
    if limit.period == "total":
        return 0, TOTAL_END_MS
    tz = resolve_timezone(limit.timezone)
    start = window_floor(ts_ms, limit.period, tz)
    spans = window_spans(start, start + _PERIOD_REACH_MS[limit.period], limit.period, tz)
    return start, spans[0][2]


# A crossing before it gets its sequence number:
# (limit id, customer, meter, threshold, value, period start ms), and for a cost
# limit (evaluated by pricing) also (..., measure, currency), meter None for a total.
Crossing = (tuple[str, str, str | None, Number, Number, int]
            | tuple[str, str, str | None, Number, Number, int, str, str])


RECENT_PERIODS = 4  # periods remembered per limit
FORGET_EVERY_MS = 3_600_000  # forgetting ended periods runs at most once per hour of received time


class LimitSource(Protocol):
    """Where a limit's state comes from when it has none: the shard's stored usage.

    ``ShardState`` implements it (``engine.domain.shard``). ``ShardLimits`` calls it
    only to create a missing state, never for a state it holds, so the cost of a
    read (bucket columns today, sealed blocks later) is paid once per (limit,
    customer, period), not once per batch.
    """

    def limit_partial(self, limit: LimitDef, customer: str, start_ms: int,
                      end_ms: int) -> Any | None:
        """The partial aggregate (``engine.domain.aggregates``) of ``customer``'s usage
        of ``limit.meter`` in [start, end) under the limit's dimension filters, or None
        if there is none. Whole-minute buckets: a bucket belongs to the period holding
        its minute's start (``period_of_bucket``). The caller owns the result (merges
        into it in place)."""
        ...

    def customers_of(self, meter_name: str) -> Iterable[str]:
        """Every customer with usage of the meter (in any order)."""
        ...


class _Period:
    """One limit's states for one period: its end and each customer's partial."""

    __slots__ = ("end_ms", "partials")

    def __init__(self, end_ms: int) -> None:
        self.end_ms = end_ms
        self.partials: dict[str, Any] = {}


class ShardLimits:
    """Limits as one shard evaluates them.

    Per (limit, customer, period) the shard keeps the period's *partial aggregate*
    (``engine.domain.aggregates``): ``after_apply`` merges each accepted event of a
    slice into it and checks the thresholds on its finalized value. A state is read
    from the ``LimitSource`` only when missing: when a limit is added (for the period
    containing the time it was added), when an event reaches a period the limit does
    not track yet (a late event, or the first touch after restoring a snapshot
    written before states were kept). Order: a slice is applied to the buckets
    first, then ``after_apply`` runs; a state missing at that point is read from the
    buckets, which already hold the slice, so the slice's events are not merged into
    it again.

    Periods that ended more than ``late_ms`` (plus a minute: see ``forget_ended``)
    before a batch's received time can receive no event, so their states and fired
    masks are forgotten. ``late_ms=None`` never forgets.
    """

    def __init__(self, source: LimitSource, late_ms: int | None = None) -> None:
        self._source = source
        self.late_ms = late_ms
        self.by_meter: dict[str, list[LimitDef]] = {}
        self.by_id: dict[str, LimitDef] = {}
        # limit id -> (customer, period start) -> bitmask of fired threshold indexes
        self.fired: dict[str, dict[tuple[str, int], int]] = {}
        # limit id -> period start -> the period's partials per customer
        self.states: dict[str, dict[int, _Period]] = {}
        self._periods: dict[str, list[tuple[int, int]]] = {}  # limit id -> recent periods
        # Ends before this were forgotten; not exported: forgetting again is a no-op.
        self._forgotten_before_ms = -1
        # limit id -> period start -> end, of the fired masks' periods (forget_ended)
        self._fired_ends: dict[str, dict[int, int]] = {}
        # Usage feeds' changes since the runtime last took them (``take_feed``).
        self.feed: list[UsageChange] = []
        # limit id -> dimension set key -> whether it passes the limit's dimension filters
        # (a dimension set key names one set of dimensions, whatever the customer).
        self._matches: dict[str, dict[str, bool]] = {}
        # unique_count limits' checkpoint log (``unique_chunks``): limit id ->
        # (period start, customer) -> the values added since the last checkpoint, or None
        # (write the state whole); the chunk numbers each limit has stored, the next
        # number per limit, the limits to write whole next time, and chunks to delete.
        self._unique_log: dict[str, dict[tuple[int, str], set[int] | None]] = {}
        self.unique_chunk_seqs: dict[str, list[int]] = {}
        self._next_chunk: dict[str, int] = {}
        self._unique_whole: set[str] = set()
        self._dropped_chunks: list[tuple[str, int]] = []

    def take_feed(self) -> list[UsageChange]:
        feed, self.feed = self.feed, []
        return feed

    def add(self, limit: LimitDef, now_ms: int) -> list[Crossing]:
        """Install (or replace) a limit and evaluate it at once for the current period."""
        self.remove(limit.id)
        self.by_id[limit.id] = limit
        self.by_meter.setdefault(limit.meter.name, []).append(limit)
        self.fired[limit.id] = {}
        periods = self.states[limit.id] = {}
        if limit.meter.kind == UNIQUE:
            self._unique_whole.add(limit.id)
        start, end = period_bounds(now_ms, limit.limit)
        crossings: list[Crossing] = []
        kind = limit.meter.kind
        # Sorted: a source may answer with a set, whose order varies between processes.
        for customer in sorted(self._source.customers_of(limit.meter.name)):
            if limit.customers is not None and customer not in limit.customers:
                continue
            partial = self._source.limit_partial(limit, customer, start, end)
            if partial is None:
                continue
            if kind == UNIQUE:
                partial = unique_state(partial)
            period = periods.get(start)
            if period is None:
                period = periods[start] = _Period(end)
            period.partials[customer] = partial
            self._check(limit, customer, start, finalize(kind, partial), crossings)
        return crossings

    def remove(self, limit_id: str) -> bool:
        limit = self.by_id.pop(limit_id, None)
        if limit is None:
            return False
        self.by_meter[limit.meter.name].remove(limit)
        self.fired.pop(limit_id, None)
        self.states.pop(limit_id, None)
        self._periods.pop(limit_id, None)
        self._fired_ends.pop(limit_id, None)
        self._matches.pop(limit_id, None)
        self._unique_log.pop(limit_id, None)
        self._unique_whole.discard(limit_id)
        self._dropped_chunks.extend((limit_id, seq)
                                    for seq in self.unique_chunk_seqs.pop(limit_id, ()))
        return True

    def after_apply(
        self, meter_shard: MeterShard, items: Columns, accepted: list[int], seq_base: int,
    ) -> list[Crossing]:
        """Crossings caused by the accepted events (positions) of one applied slice.

        Runs after the slice is in the buckets (see the class docstring for why that
        order matters). ``seq_base`` is ``lsn << SEQ_SHIFT``: a latest partial orders
        equal timestamps by ``seq_base | index in batch``, as the buckets do.
        """
        limits = self.by_meter.get(meter_shard.meter.name)
        if not limits or not accepted:
            return []
        crossings: list[Crossing] = []
        kind = meter_shard.meter.kind
        customers, dims_keys, times = items.customers, items.dims_keys, items.times
        values, indices, unique_values = items.values, items.indices, items.unique_values
        dims_by_key = meter_shard.dims_by_key
        if kind == UNIQUE:  # each value hashed once, whatever the number of limits
            hash_of = {value: value_hash(value) for value in
                       {unique_values[position] for position in accepted}}
        for limit in limits:
            # (customer, period start) -> this slice's partial for it, in first-touch order
            delta: dict[tuple[str, int], Any] = {}
            ends: dict[int, int] = {}
            # Rare (zones with seconds in their offset, see period_of_bucket): events
            # counted in the period before their own, which is checked, not that one.
            moved: dict[tuple[str, int], Any] = {}
            checked: dict[tuple[str, int], None] = {}
            period = (0, -1)
            customer_filter = limit.customers
            dim_filters = limit.dim_filters
            matches = self._matches.setdefault(limit.id, {}) if dim_filters else {}
            for position in accepted:
                customer = customers[position]
                if customer_filter is not None and customer not in customer_filter:
                    continue
                if dim_filters:
                    dims_key = dims_keys[position]
                    match = matches.get(dims_key)
                    if match is None:
                        match = matches[dims_key] = dims_match(dims_by_key[dims_key],
                                                               dim_filters)
                    if not match:
                        continue
                ts = times[position]
                if not period[0] <= ts < period[1]:
                    period = self._period_of(limit, ts)
                    ends[period[0]] = period[1]
                if period[0] % 60_000 and ts - ts % 60_000 < period[0]:
                    checked[(customer, period[0])] = None
                    counted_in = self._period_of(limit, ts - ts % 60_000)
                    ends[counted_in[0]] = counted_in[1]
                    one = _event_partial(kind, values[position], ts, seq_base | indices[position],
                                         hash_of[unique_values[position]] if kind == UNIQUE
                                         else None)
                    key = (customer, counted_in[0])
                    found = moved.get(key)
                    moved[key] = one if found is None else merge_partial(kind, found, one)
                    continue
                key = (customer, period[0])
                # Add one event to this slice's partial, inline (a call per event costs).
                if kind == SUM:
                    delta[key] = delta.get(key, 0) + values[position]
                elif kind == COUNT:
                    delta[key] = delta.get(key, 0) + 1
                elif kind == UNIQUE:  # the values' hashes (engine.domain.distinct)
                    found = delta.get(key)
                    if found is None:
                        delta[key] = {hash_of[unique_values[position]]}
                    else:
                        found.add(hash_of[unique_values[position]])
                elif kind == AVG:
                    found = delta.get(key)
                    if found is None:
                        delta[key] = [values[position], 1]
                    else:
                        found[0] += values[position]
                        found[1] += 1
                elif kind == LATEST:
                    found = delta.get(key)
                    seq = seq_base | indices[position]
                    if found is None or (ts, seq) > found[:2]:
                        delta[key] = (ts, seq, values[position])
                else:
                    value = values[position]
                    found = delta.get(key)
                    if found is None or (value > found if kind == MAX else value < found):
                        delta[key] = value
            periods = self.states[limit.id]
            # States read from the source during this slice already hold all of it.
            fresh: set[tuple[str, int]] = set()
            for key, partial in moved.items():
                self._state(limit, periods, key, ends[key[1]], partial, fresh)
            for key, partial in delta.items():
                state = self._state(limit, periods, key, ends[key[1]], partial, fresh)
                if state is not None:
                    self._check(limit, key[0], key[1], finalize(kind, state), crossings)
            for key in checked:
                if key not in delta:
                    state = self._state(limit, periods, key, ends[key[1]], None, fresh)
                    if state is not None:
                        self._check(limit, key[0], key[1], finalize(kind, state), crossings)
        return crossings

    def after_correction(self, meter_name: str, customers: set[str]) -> list[Crossing]:
        """A correction rebuilt some of ``customers``' buckets of ``meter_name``: every
        period state of theirs is read again from the source; a threshold the period's
        usage is now below re-arms (its fired bit is cleared, the alert stays a fact),
        one it reaches and had not fired is reported as a crossing (a new alert)."""
        crossings: list[Crossing] = []
        for limit in self.by_meter.get(meter_name, ()):
            periods = self.states.get(limit.id, {})
            fired_for_limit = self.fired.get(limit.id, {})
            starts = {start for start, period in periods.items()
                      if customers.intersection(period.partials)}
            starts.update(start for customer, start in fired_for_limit if customer in customers)
            for start in sorted(starts):
                period = periods.get(start)
                end = period.end_ms if period is not None else period_bounds(start, limit.limit)[1]
                for customer in sorted(customers):
                    known = period is not None and customer in period.partials
                    if not known and (customer, start) not in fired_for_limit:
                        continue
                    state = self._source.limit_partial(limit, customer, start, end)
                    if limit.meter.kind == UNIQUE:
                        self._unique_log.setdefault(limit.id, {})[(start, customer)] = None
                        if state is not None:
                            state = unique_state(state)
                    if period is not None:
                        if state is None:
                            period.partials.pop(customer, None)
                        else:
                            period.partials[customer] = state
                    value = None if state is None else finalize(limit.meter.kind, state)
                    mask = fired_for_limit.get((customer, start), 0)
                    for index, threshold in enumerate(limit.thresholds):
                        if mask & (1 << index) and (value is None or value < threshold):
                            mask &= ~(1 << index)
                    if mask:
                        fired_for_limit[(customer, start)] = mask
                    else:
                        fired_for_limit.pop((customer, start), None)
                    if value is not None and limit.thresholds:
                        self._check(limit, customer, start, value, crossings)
                if period is not None and not period.partials:
                    del periods[start]
        return crossings

    def _state(self, limit: LimitDef, periods: dict[int, _Period], key: tuple[str, int],
               end: int, partial: Any | None, fresh: set[tuple[str, int]]) -> Any | None:
        """The state of (customer, period start) ``key`` with this slice's ``partial``
        merged in. A missing state is read from the source, which already holds the
        whole slice: it is marked ``fresh`` and nothing of the slice is merged into it."""
        customer, start = key
        period = periods.get(start)
        if period is None:
            period = periods[start] = _Period(end)
        known = period.partials.get(customer)
        kind = limit.meter.kind
        if known is None:
            known = self._source.limit_partial(limit, customer, start, end)
            if known is None:
                if not period.partials:
                    del periods[start]
                return None
            fresh.add(key)
            if kind == UNIQUE:
                known = unique_state(known)
                self._unique_log.setdefault(limit.id, {})[(start, customer)] = None
        elif partial is not None and key not in fresh:
            if kind == UNIQUE:
                self._log_added(limit.id, (start, customer), known.add_hashes(partial))
            else:
                known = merge_partial(kind, known, partial)
        period.partials[customer] = known
        return known

    def _log_added(self, limit_id: str, key: tuple[int, str], added: list[int]) -> None:
        """Note for the next checkpoint the hashes a slice added to a unique_count state
        (a state logged as None is written whole anyway)."""
        if not added:
            return
        log = self._unique_log.get(limit_id)
        if log is None:
            log = self._unique_log[limit_id] = {}
        if key not in log:
            log[key] = set(added)
            return
        noted = log[key]
        if noted is not None:
            noted.update(added)

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

    def _check(self, limit: LimitDef, customer: str, start: int, value: Number,
               crossings: list[Crossing]) -> None:
        """Record and report the thresholds ``value`` reaches that had not fired."""
        if not limit.thresholds:  # a usage feed: publish, never fire
            self.feed.append((limit.id, customer, start, value))
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

    # ------------------------------------------------------------ forgetting

    def forget_ended(self, received_ms: int) -> None:
        """Forget the states and fired masks of periods no event can reach any more.

        Ingest refuses events older than ``received_ms - late_ms``, so a period that
        ended before that is final. One more minute of margin: in a zone with seconds
        in its offset, an event up to a minute after a period's end may count in it
        (``period_of_bucket``). The horizon moves in whole hours of received time, so
        this walks the states at most once per hour, and the result depends only on the
        batches' received times (replay forgets exactly what the live engine forgot).
        """
        if self.late_ms is None:
            return
        horizon = received_ms - self.late_ms - MINUTE_MS
        horizon -= horizon % FORGET_EVERY_MS
        if horizon <= self._forgotten_before_ms:
            return
        self._forgotten_before_ms = horizon
        for limit_id, periods in self.states.items():
            log = (self._unique_log.setdefault(limit_id, {})
                   if self.by_id[limit_id].meter.kind == UNIQUE else None)
            for start in [s for s, period in periods.items() if period.end_ms <= horizon]:
                if log is not None:  # gone from the stored chunks too
                    log.update(((start, customer), None) for customer in periods[start].partials)
                del periods[start]
            fired = self.fired[limit_id]
            if not fired:
                continue
            limit = self.by_id[limit_id].limit
            # computing a period in a time zone costs microseconds: remembered
            ends = self._fired_ends.setdefault(limit_id, {})
            stale = []
            for key in fired:
                start = key[1]
                end = ends.get(start)
                if end is None:
                    end = ends[start] = period_bounds(start, limit)[1]
                if end <= horizon:
                    stale.append(key)
            for key in stale:
                del fired[key]
            for start in [start for start, end in ends.items() if end <= horizon]:
                del ends[start]

    # ------------------------------------------------------------ snapshot

    def export(self) -> list[list[Any]]:
        """[[limit id, [[customer, period start, mask], ...]], ...] in canonical order."""
        return [
            [limit_id, [[c, p, m] for (c, p), m in sorted(self.fired[limit_id].items())]]
            for limit_id in sorted(self.fired)
        ]

    def export_states(self, canonical: bool = True,
                      unique: bool = True) -> list[list[Any]]:
        """[[limit id, [[period start, period end, [[customer, partial], ...]], ...]], ...]
        in canonical order, partials encoded by ``encode_partial``. ``canonical=False``
        leaves unique_count sets unsorted: the same state, in bytes that may differ
        between equal states. ``unique=False`` leaves unique_count limits out: a
        checkpoint writes them as chunks (``unique_chunks``)."""
        out = []
        for limit_id in sorted(self.states):
            kind = self.by_id[limit_id].meter.kind
            if kind == UNIQUE and not unique:
                continue
            periods = self.states[limit_id]
            out.append([limit_id, [
                [start, periods[start].end_ms, [
                    [customer, encode_partial(kind, partial, canonical)]
                    for customer, partial in sorted(periods[start].partials.items())
                ]]
                for start in sorted(periods)
            ]])
        return out

    def unique_chunks(self, whole: bool = False
                      ) -> tuple[list[tuple[str, int, list[Any]]], list[tuple[str, int]]]:
        """The unique_count limits' chunks this checkpoint writes, as (limit id, chunk
        number, [[period start, period end, [[customer, whole, values], ...]], ...]),
        and the (limit id, chunk number) it deletes. ``whole``: every limit whole (the
        store's chunks were dropped). Takes the log: call once per checkpoint."""
        puts: list[tuple[str, int, list[Any]]] = []
        drops, self._dropped_chunks = self._dropped_chunks, []
        if not whole:
            # At most one limit per checkpoint is written whole for having many chunks.
            crowded = max(((len(seqs), limit_id) for limit_id, seqs in
                           self.unique_chunk_seqs.items() if len(seqs) >= MAX_UNIQUE_CHUNKS),
                          default=None)
            if crowded is not None:
                self._unique_whole.add(crowded[1])
        for limit_id in sorted(self.states):
            if self.by_id[limit_id].meter.kind != UNIQUE:
                continue
            log = self._unique_log.pop(limit_id, {})
            seqs = self.unique_chunk_seqs.setdefault(limit_id, [])
            periods = self.states[limit_id]
            if whole or limit_id in self._unique_whole:
                payload = [[start, periods[start].end_ms, [
                    [customer, True, encode_partial(UNIQUE, partial, False)]
                    for customer, partial in sorted(periods[start].partials.items())]]
                    for start in sorted(periods)]
                drops.extend((limit_id, seq) for seq in seqs)
                seqs.clear()
                if not payload:
                    continue
            elif log:
                by_start: dict[int, list[Any]] = {}
                for (start, customer), added in sorted(log.items()):
                    period = periods.get(start)
                    state = period.partials.get(customer) if period is not None else None
                    if state is None:  # gone (a correction, or a period forgotten)
                        entry = [customer, True, []]
                    elif added is None:
                        entry = [customer, True, encode_partial(UNIQUE, state, False)]
                    else:
                        entry = [customer, False, hashes_bytes(added)]
                    by_start.setdefault(start, []).append(entry)
                payload = [[start, periods[start].end_ms if start in periods else 0, entries]
                           for start, entries in sorted(by_start.items())]
            else:
                continue
            seq = self._next_chunk.get(limit_id, 0)
            self._next_chunk[limit_id] = seq + 1
            seqs.append(seq)
            puts.append((limit_id, seq, payload))
        self._unique_whole.clear()
        return puts, drops

    def load_unique_chunks(self, chunks: list[tuple[int, str, int, list[Any]]],
                           route: ShardRouter, shard_index: int) -> None:
        """Apply stored chunks, as (shard part, limit id, chunk number, payload), to this
        shard's customers' states, each limit's in chunk order; remember the numbers of
        this shard's own. Call after ``load``."""
        # a state's increments, added in one sort each once every chunk is read
        added: dict[tuple[str, int, str], list[bytes]] = {}
        for part, limit_id, seq, payload in sorted(chunks, key=lambda c: (c[1], c[0], c[2])):
            if part == shard_index:
                self.unique_chunk_seqs.setdefault(limit_id, []).append(seq)
                self._next_chunk[limit_id] = max(self._next_chunk.get(limit_id, 0), seq + 1)
            periods = self.states.get(limit_id)
            if periods is None:  # a limit since removed: its chunks go at the next checkpoint
                if part == shard_index:
                    self._dropped_chunks.append((limit_id, seq))
                continue
            for start, end, entries in payload:
                for customer, whole, values in entries:
                    if route(customer) != shard_index:
                        continue
                    period = periods.get(start)
                    if whole:
                        added.pop((limit_id, start, customer), None)
                        if not values:
                            if period is not None:
                                period.partials.pop(customer, None)
                                if not period.partials:
                                    del periods[start]
                            continue
                        if period is None:
                            period = periods[start] = _Period(end)
                        period.partials[customer] = decode_partial(UNIQUE, values)
                        continue
                    if period is None:
                        period = periods[start] = _Period(end)
                    if customer not in period.partials:
                        period.partials[customer] = decode_partial(UNIQUE, values)
                    else:
                        added.setdefault((limit_id, start, customer), []).append(
                            _chunk_bytes(values))
        for (limit_id, start, customer), raws in added.items():
            self.states[limit_id][start].partials[customer].add_bytes(raws)

    def load(self, limits: list[LimitDef], fired: list[list[Any]], route: ShardRouter,
             shard_index: int, states: list[list[Any]] | None = None) -> None:
        """Install ``limits``, and the fired masks and states of this shard's customers.

        A snapshot without states (from before they were kept) leaves them to be read
        from the source on first touch."""
        for limit in limits:
            self.by_id[limit.id] = limit
            self.by_meter.setdefault(limit.meter.name, []).append(limit)
            self.fired.setdefault(limit.id, {})
            self.states.setdefault(limit.id, {})
        for limit_id, entries in fired:
            if limit_id not in self.fired:
                continue
            target = self.fired[limit_id]
            for customer, period_start, mask in entries:
                if route(customer) == shard_index:
                    target[(customer, period_start)] = mask
        for limit_id, stored_periods in states or []:
            limit_def = self.by_id.get(limit_id)
            if limit_def is None:
                continue
            kind = limit_def.meter.kind
            periods = self.states[limit_id]
            if kind == UNIQUE:  # a part from before chunks: the next checkpoint writes them
                self._unique_whole.add(limit_id)
            for start, end, partials in stored_periods:
                for customer, encoded in partials:
                    if route(customer) != shard_index:
                        continue
                    period = periods.get(start)
                    if period is None:
                        period = periods[start] = _Period(end)
                    period.partials[customer] = decode_partial(kind, encoded)


def _event_partial(kind: int, value: Any, ts_ms: int, seq: int, unique_value: Any) -> Any:
    """The partial of one event (the slow path of ``after_apply``)."""
    if kind == COUNT:
        return 1
    if kind == AVG:
        return [value, 1]
    if kind == LATEST:
        return (ts_ms, seq, value)
    if kind == UNIQUE:
        return {unique_value}
    return value


def _encode_number(value: Number) -> int | str:
    return value if type(value) is int and fits_int64(value) else str(value)


def unique_state(partial: Any) -> DistinctHashes:
    """A unique_count limit's state from a partial of the source (a set of values, a
    ``PackedDistinct``, one value) or a state already."""
    if type(partial) is DistinctHashes:
        return partial
    if type(partial) is str:
        return DistinctHashes.of_values([partial])
    return DistinctHashes.of_values(distinct_values(partial))


def _chunk_bytes(values: bytes | list[str]) -> bytes:
    """A chunk's added values as hashes' bytes: as stored, or hashed from the values
    themselves (a list of strs, in chunks written before states were hashes)."""
    if isinstance(values, bytes):
        return values
    return hashes_bytes(value_hash(value) for value in values)


def encode_partial(kind: int, partial: Any, canonical: bool = True) -> Any:
    """A partial as plain msgpack data, deterministically: numbers beyond int64 and
    Decimals as decimal strings (as ``records.SeriesRecord``); a unique_count state as
    its hashes' bytes (``DistinctHashes.to_bytes``), a set of values as a sorted list
    (as a list in set order if not ``canonical``)."""
    if kind == UNIQUE:
        if type(partial) is DistinctHashes:
            return partial.to_bytes()
        return sorted(partial) if canonical else list(partial)
    if kind == AVG:
        return [_encode_number(partial[0]), partial[1]]
    if kind == LATEST:
        return [partial[0], partial[1], _encode_number(partial[2])]
    return _encode_number(partial)


def decode_partial(kind: int, encoded: Any) -> Any:
    """Inverse of ``encode_partial``: a unique_count state comes back as hashes,
    from its bytes or (states written before they were hashes) from its values."""
    if kind == UNIQUE:
        if type(encoded) is bytes:
            return DistinctHashes.of_bytes(encoded)
        return DistinctHashes.of_values(encoded)
    if kind == AVG:
        return [decimal_or_int(encoded[0]), encoded[1]]
    if kind == LATEST:
        return (encoded[0], encoded[1], decimal_or_int(encoded[2]))
    return decimal_or_int(encoded)


def period_of_bucket(ts_ms: int, limit: Limit) -> tuple[int, int]:
    """The period whose usage counts an event at ``ts_ms``: the one holding the start of
    the event's minute. Usage is read from whole-minute buckets, so a period with a
    bound inside a minute (zones with seconds in their UTC offset, such as Monrovia
    before 1972) counts the minute holding its start in the period before. For every
    other period this is ``period_bounds(ts_ms)``."""
    return period_bounds(ts_ms - ts_ms % MINUTE_MS, limit)
