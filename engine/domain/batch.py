"""Batch validation and preparation: the per-event work done once per batch.

Pure domain layer: standard library, ``engine.schema``, ``engine.errors`` and
the domain modules ``meters`` and ``values`` only. ``prepare_batch`` checks
every event of a batch against the ``IngestRules``, names each bad one by
index and reason, and either refuses the whole batch or splits it by shard,
and within a shard by meter, into ``Columns`` the shard actors apply. Replay of
the write-ahead log runs the same function with ``now_ms=None`` (no clock, no
configured rules): a logged batch was valid when logged, and replay must be a
pure function of the log.

``prepare_batch`` is a documented hot loop: it inlines the checks of the common
event and leaves every other case to ``_prepare_one``. ``ShardRouter`` holds
the per-engine state it reads for every event (customer -> shard, the memo of
checked dimension sets); ``dims_key_of`` is the canonical dimension key the
shards store.
"""

from __future__ import annotations

import zlib
from typing import Any

from engine.domain.meters import MAX_TIMESTAMP_MS, REPLAY_RULES, IngestRules, MeterDef
from engine.domain.values import INT64_MAX, exact_value
from engine.errors import BatchRejected, EventProblem
from engine.schema import Event


def shard_of(customer_id: str, shard_count: int) -> int:
    """Stable across processes and machines (never Python's randomised ``hash``)."""
    return zlib.crc32(customer_id.encode()) % shard_count


class Columns:
    """One shard's events of one meter in a batch, as parallel lists.

    Columns rather than a tuple per event: a batch waiting in a mailbox then
    holds a handful of lists instead of thousands of GC-tracked tuples, which
    every garbage collection during ingest would otherwise walk.
    ``unique_values`` is filled for unique_count meters only.
    """

    __slots__ = ("customers", "dims_keys", "indices", "times", "unique_ids", "unique_values",
                 "values")

    def __init__(self) -> None:
        self.customers: list[str] = []
        self.dims_keys: list[str] = []
        self.times: list[int] = []
        self.values: list[Any] = []
        self.unique_ids: list[str | None] = []
        self.indices: list[int] = []
        self.unique_values: list[str] = []

    def __len__(self) -> int:
        return len(self.times)


# The dimensions of an event whose only dimension is its meter's unique one.
NO_DIMENSIONS: dict[str, str] = {}

# What one shard gets of a batch: its events grouped by meter, in order of first appearance.
ShardSlice = list[tuple[MeterDef, Columns]]


def dims_key_of(dims: dict[str, str]) -> str:
    """The canonical key of a dimension set: sorted ``key NUL value`` pairs joined by NUL.

    Unambiguous because dimension keys and values may not contain NUL.
    """
    if not dims:
        return ""
    return "\x00".join([part for pair in sorted(dims.items()) for part in pair])


def dims_of_key(dims_key: str) -> tuple[tuple[str, str], ...]:
    if not dims_key:
        return ()
    parts = dims_key.split("\x00")
    return tuple(zip(parts[0::2], parts[1::2], strict=True))


# Checked dimension sets remembered per engine before starting over, and the longest
# remembered (keys and values together): bounds the memo to a few MiB, whatever is sent.
DIMS_MEMO_MAX = 20_000
DIMS_MEMO_MAX_CHARS = 256


class ShardRouter:
    """Customer → shard, cached: crc32 once per distinct customer. Also holds the
    engine's memo of checked dimension sets, since both are per-engine state that
    ``prepare_batch`` reads for every event."""

    __slots__ = ("cache", "dims_keys", "replay_dims_keys", "shard_count")

    def __init__(self, shard_count: int) -> None:
        self.shard_count = shard_count
        self.cache: dict[str, int] = {}
        # Dimension sets already checked, as ``tuple(dims.items())`` -> dims key: most
        # events repeat a few sets, so a hit skips the checks and the sort and join.
        # One memo per set of rules (live ingest, trusted replay); bounded by clearing.
        self.dims_keys: dict[tuple[tuple[str, str], ...], str] = {}
        self.replay_dims_keys: dict[tuple[tuple[str, str], ...], str] = {}

    def __call__(self, customer_id: str) -> int:
        shard = self.cache.get(customer_id)
        if shard is None:
            shard = self.cache[customer_id] = shard_of(customer_id, self.shard_count)
        return shard


class _Bad(Exception):
    """One event's problem, raised and caught inside ``prepare_batch``."""


# Amberflo's convention: an ingested event with this dimension set to "true" cancels the
# earlier event with its unique id; the dimension is never stored (``Engine.ingest``).
CANCEL_PREVIOUS = "aflo.cancel_previous_resource_event"


class CancelPreviousFlagged(Exception):
    """Raised by a live ``prepare_batch`` whose batch holds an event with the
    ``CANCEL_PREVIOUS`` dimension: the caller takes such batches on a path of their own.
    Found where a dimension set misses the memo (a flagged set is never remembered), so
    a batch without the flag pays nothing for the check."""


# Query keys that name customer traits (engine.domain.traits): refused as dimension keys
# on ingest so that ``customer.plan`` is never ambiguous; records logged before the
# refusal still replay (the check is not made on trusted replay).
RESERVED_DIMENSION_PREFIX = "customer."


def _check_dimensions(dims: object, rules: IngestRules, live: bool = True) -> None:
    if type(dims) is not dict:
        raise _Bad(f"dimensions must be a mapping of strings to strings, got {type(dims).__name__}")
    if len(dims) > rules.max_dimensions:
        raise _Bad(f"{len(dims)} dimensions, at most {rules.max_dimensions} allowed")
    for key, value in dims.items():
        if type(key) is not str or not key:
            raise _Bad(f"dimension key {key!r} must be a non-empty string")
        if type(value) is not str:
            raise _Bad(f"dimension {key!r} must have a string value, got {type(value).__name__}")
        if len(key) > rules.max_key_chars:
            raise _Bad(f"dimension key {key[:40]!r}... is longer than {rules.max_key_chars} chars")
        if len(value) > rules.max_value_chars:
            raise _Bad(f"dimension {key!r} value is longer than {rules.max_value_chars} chars")
        if key == "customer_id":
            raise _Bad("'customer_id' is reserved and cannot be a dimension key")
        if live and key.startswith(RESERVED_DIMENSION_PREFIX):
            raise _Bad(f"dimension key {key[:60]!r} starts with {RESERVED_DIMENSION_PREFIX!r}, "
                       "which queries use for customer traits; rename the dimension")
        if "\x00" in key or "\x00" in value:
            raise _Bad(f"dimension {key!r} contains a NUL character")


def _prepare_one(
    event: object,
    meters: dict[str, MeterDef],
    rules: IngestRules,
    oldest_ms: int,
    newest_ms: int,
    live: bool = True,
) -> tuple[MeterDef, str, str, int, Any, str | None, str | None]:
    """Check one event in full and normalise it; raises ``_Bad`` with the reason."""
    if type(event) is not Event:
        raise _Bad(f"not an Event: {type(event).__name__}")
    meter = meters.get(event.meter_api_name)
    if meter is None:
        raise _Bad(f"unknown meter {event.meter_api_name!r}")
    max_chars = rules.max_value_chars
    customer = event.customer_id
    if type(customer) is not str or not customer or len(customer) > max_chars:
        raise _Bad(
            f"customer_id must be a non-empty string of at most {max_chars} characters, "
            f"got {customer!r:.60}"
        )
    try:
        value = exact_value(event.meter_value)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    ts = event.meter_time_in_millis
    if type(ts) is not int or not oldest_ms <= ts <= newest_ms:
        raise _Bad(_timestamp_problem(ts, oldest_ms, newest_ms))
    dims = event.dimensions
    _check_dimensions(dims, rules, live)
    unique_value = None
    if meter.unique_dimension is not None:
        unique_value = dims.get(meter.unique_dimension)
        if unique_value is None:
            raise _Bad(
                f"meter {meter.name!r} counts distinct {meter.unique_dimension!r} "
                "but the event has no such dimension"
            )
        dims = {k: v for k, v in dims.items() if k != meter.unique_dimension}
    unique_id = event.unique_id
    if unique_id is not None and (
        type(unique_id) is not str or not unique_id or len(unique_id) > max_chars
    ):
        raise _Bad(f"unique_id must be null or a non-empty string of at most {max_chars} chars")
    return meter, customer, dims_key_of(dims), ts, value, unique_id, unique_value


def prepare_batch(
    events: list[Event],
    meters: dict[str, MeterDef],
    route: ShardRouter,
    rules: IngestRules,
    now_ms: int | None,
) -> list[ShardSlice]:
    """Validate ``events`` and split them by shard, and within a shard by meter.

    ``now_ms=None`` means trusted replay: no clock checks. Raises
    ``BatchRejected`` listing every bad event; then nothing is returned, so
    nothing can be applied.

    The loop inlines the checks for the common shape of event (known meter,
    integer value, a few string dimensions) and hands anything else to
    ``_prepare_one``, which checks in full and names the problem.
    """
    by_meter: dict[MeterDef, list[Columns | None]] = {}
    problems: list[EventProblem] = []
    if now_ms is None:
        # Trusted replay: the batch was valid when logged; today's rules may be stricter.
        oldest_ms, newest_ms = 0, MAX_TIMESTAMP_MS
        rules = REPLAY_RULES
    else:
        oldest_ms = max(0, now_ms - rules.late_ms)
        newest_ms = min(MAX_TIMESTAMP_MS, now_ms + rules.future_ms)
        if len(events) > rules.max_batch_events:
            raise BatchRejected([EventProblem(
                rules.max_batch_events,
                f"batch has {len(events)} events, at most {rules.max_batch_events} allowed",
            )])
    max_chars = rules.max_value_chars
    max_key_chars = rules.max_key_chars
    max_dimensions = rules.max_dimensions
    checked_dims = route.replay_dims_keys if now_ms is None else route.dims_keys
    live = now_ms is not None
    if len(checked_dims) > DIMS_MEMO_MAX:
        checked_dims.clear()
    get_meter = meters.get
    # The fast path's value check, inline rather than values.fits_int64: a call per event
    # costs ~0.1 µs. Locals: a global lookup per event adds up. Symmetric, so one short of
    # INT64_MIN: -2**63 takes _prepare_one, which accepts it all the same.
    min_int, max_int = -INT64_MAX, INT64_MAX
    event_type = Event
    shard_cache = route.cache
    shard_count = route.shard_count
    for index, event in enumerate(events):
        # Fast path: every check below is also made, with its reason, by _prepare_one.
        if type(event) is event_type:
            meter = get_meter(event.meter_api_name)
            customer = event.customer_id
            value: Any = event.meter_value
            ts = event.meter_time_in_millis
            dims = event.dimensions
            unique_id = event.unique_id
            fast = (
                meter is not None
                and type(customer) is str
                and 0 < len(customer) <= max_chars
                and type(value) is int
                and min_int <= value <= max_int
                and type(ts) is int
                and oldest_ms <= ts <= newest_ms
                and (unique_id is None or (type(unique_id) is str
                                           and 0 < len(unique_id) <= max_chars))
            )
            if fast and type(dims) is not dict:
                fast = False  # None, a list, a dict subclass...: _prepare_one says why
            unique_value = None
            unique_key = meter.unique_dimension if fast and meter is not None else None
            if unique_key is not None and type(dims) is dict:
                # A unique_count meter: its dimension's value is what the event counts and
                # is not part of the series key. Checked here as _check_dimensions would.
                unique_value = dims.get(unique_key)
                if (type(unique_value) is not str or len(unique_value) > max_chars
                        or "\x00" in unique_value or len(dims) > max_dimensions
                        or unique_key == "customer_id" or len(unique_key) > max_key_chars
                        or "\x00" in unique_key
                        or (live and unique_key.startswith(RESERVED_DIMENSION_PREFIX))):
                    fast = False
                elif len(dims) == 1:
                    dims = NO_DIMENSIONS
                else:
                    dims = {k: v for k, v in dims.items() if k != unique_key}
            if fast and dims:
                items = tuple(dims.items())
                try:
                    known = checked_dims.get(items)
                except TypeError:  # an unhashable value: _prepare_one says why
                    known, fast = None, False
                if known is not None:
                    dims_key = known  # this exact set passed every check below before...
                    for key, text in items:  # ...as plain strings (not equal subclasses)
                        if type(key) is not str or type(text) is not str:
                            fast = False
                            break
                elif not fast:
                    pass
                elif live and CANCEL_PREVIOUS in dims:
                    raise CancelPreviousFlagged
                elif len(dims) > max_dimensions or "customer_id" in dims:
                    fast = False
                else:
                    for key, text in dims.items():
                        if (type(key) is not str or type(text) is not str
                                or not 0 < len(key) <= max_key_chars
                                or len(text) > max_chars
                                or (live and key.startswith(RESERVED_DIMENSION_PREFIX))):
                            fast = False
                            break
                    else:
                        if len(dims) == 1:
                            for key, text in dims.items():
                                dims_key = key + "\x00" + text
                        else:
                            dims_key = "\x00".join(
                                [part for pair in sorted(dims.items()) for part in pair]
                            )
                        # NUL inside a key or value would make the key ambiguous.
                        fast = dims_key.count("\x00") == 2 * len(dims) - 1
                        if fast and len(dims_key) <= DIMS_MEMO_MAX_CHARS:
                            checked_dims[items] = dims_key
            elif fast:
                dims_key = ""
        else:
            fast = False
        if not fast:
            if (live and type(event) is event_type and type(event.dimensions) is dict
                    and CANCEL_PREVIOUS in event.dimensions):
                raise CancelPreviousFlagged
            try:
                meter, customer, dims_key, ts, value, unique_id, unique_value = _prepare_one(
                    event, meters, rules, oldest_ms, newest_ms, live
                )
            except _Bad as exc:
                problems.append(EventProblem(index, str(exc)))
                continue
        else:
            assert meter is not None  # the fast path was taken only for a known meter
        shard = shard_cache.get(customer)
        if shard is None:
            shard = shard_cache[customer] = shard_of(customer, shard_count)
        per_shard = by_meter.get(meter)
        if per_shard is None:
            per_shard = by_meter[meter] = [None] * shard_count
        columns = per_shard[shard]
        if columns is None:
            # Made on first use: with many shards most get no events of a meter in a batch.
            columns = per_shard[shard] = Columns()
        columns.customers.append(customer)
        columns.dims_keys.append(dims_key)
        columns.times.append(ts)
        columns.values.append(value)
        columns.unique_ids.append(unique_id)
        columns.indices.append(index)
        if unique_value is not None:
            columns.unique_values.append(unique_value)
    if problems:
        raise BatchRejected(problems)
    slices: list[ShardSlice] = [[] for _ in range(shard_count)]
    for meter, per_shard in by_meter.items():
        for shard, columns in enumerate(per_shard):
            if columns is not None:
                slices[shard].append((meter, columns))
    return slices


def _timestamp_problem(ts: object, oldest_ms: int, newest_ms: int) -> str:
    if type(ts) is not int:
        return f"meter_time_in_millis must be integer milliseconds, got {type(ts).__name__}"
    if ts < oldest_ms:
        return (f"meter_time_in_millis {ts} is older than the oldest accepted "
                f"{oldest_ms} (late-event limit)")
    return (f"meter_time_in_millis {ts} is later than the newest accepted {newest_ms} "
            "(future tolerance)")
