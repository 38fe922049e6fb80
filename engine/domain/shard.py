"""One shard's state: the apply loops, the shard's query pass, snapshot export and restore.

Pure domain layer: standard library, ``engine.errors`` and the domain modules
(``aggregates``, ``batch``, ``limits``, ``meters``, ``query``, ``records``,
``series``, ``windows``); no domain module imports this one. A ``ShardState``
is owned by exactly one shard actor; nothing else touches it. Its state is a
pure function of the prepared batches applied, in write-ahead-log order:
``apply`` is deterministic, and ``export`` is byte-identical for equal state.
Its ``alert_limits`` are evaluated after each slice from their own states;
``limit_partial`` and ``customers_of`` are the one seam through which a missing
limit state is read from the buckets (the same a query reads).

Hot loops: ``_apply_counter`` and ``_apply_general`` run once per event,
``collect_partials`` once per series; they inline steps a call would make
costly (each says which). The layout of a series, its buckets and their edges
is described in ``engine.domain.series``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from itertools import repeat
from typing import Any

from engine.domain.aggregates import (
    AVG,
    COUNT,
    LATEST,
    MAX,
    MIN,
    SUM,
    UNIQUE,
    PackedDistinct,
    RememberedSlice,
    merge_partial,
    slice_partial,
)
from engine.domain.batch import Columns, ShardRouter, ShardSlice
from engine.domain.blocks import (
    DAY_MS,
    BlockReader,
    BlockRollup,
    NoBlocks,
    add_rollups,
    build_block,
    count_over_summary,
    cut_days,
    cut_sealed,
    encode_block,
    merge_buckets,
    unpack_distinct,
)
from engine.domain.corrections import replace_minutes, split_sealed
from engine.domain.head import HeadLog, head_hours, hour_chunks, load_chunk
from engine.domain.limits import Crossing, LimitDef, ShardLimits
from engine.domain.meters import MeterDef
from engine.domain.query import QueryPlan
from engine.domain.records import CorrectedMinutes, MeterPart, ShardPart
from engine.domain.series import MeterShard, Series, dims_match, load_series, series_record
from engine.domain.windows import MINUTE_MS
from engine.errors import InvalidQuery

SEQ_SHIFT = 20  # seq = lsn << 20 | index in batch: orders events with equal timestamps
# A windowed sum/count query walks a series bucket by bucket when it has at most this
# many buckets per window asked for, else sums it a window at a time (slices in C).
BUCKET_LOOP_MAX_PER_SPAN = 8
# (meter, day) deltas of late events merged into their blocks per shard per checkpoint,
# oldest day first.
MAX_COMPACTIONS_PER_CHECKPOINT = 4


class ShardState:
    """The state of one shard. Not thread-safe; owned by one actor."""

    def __init__(self, late_ms: int | None = None) -> None:
        """``late_ms``: the configured late limit (``IngestRules.late_ms``), which says
        when a limit's period is final and its state can be forgotten; None keeps every
        state. Given here, not per batch: replay prepares batches under
        ``REPLAY_RULES``, whose late limit is unbounded, yet must forget what the live
        engine forgot."""
        # The head: minute buckets of every day not yet sealed, per meter.
        self.meters: dict[str, MeterShard] = {}
        # Days before this minute (a UTC day boundary) are sealed: their buckets live in
        # blocks read through ``blocks``, and events for them land in ``deltas`` until the
        # next checkpoint merges them into new versions of the blocks.
        self.sealed_before_minute = 0
        self.deltas: dict[str, MeterShard] = {}
        # Upper bounds on the buckets in ``deltas``, per (meter, UTC day) and in all (late
        # events applied since their day was last merged): what compaction chooses by.
        self.delta_days: dict[tuple[str, int], int] = {}
        self.delta_buckets = 0
        self.blocks: BlockReader = NoBlocks()
        # Per meter, the customers with usage in sealed days (limits and customer
        # listings must know them without reading blocks).
        self.sealed_customers: dict[str, set[str]] = {}
        # The alert limits this shard evaluates after each slice; recovery restores
        # them. Not the ingest rules (meters.IngestRules). Their states are created
        # through limit_partial and customers_of (the LimitSource seam).
        self.alert_limits = ShardLimits(self, late_ms)
        # Which hours of the head changed since the last checkpoint (engine.domain.head).
        self.head_log = HeadLog()

    def meter_shard(self, meter: MeterDef) -> MeterShard:
        shard = self.meters.get(meter.name)
        if shard is None:
            shard = self.meters[meter.name] = MeterShard(meter)
        return shard

    def delta_shard(self, meter: MeterDef) -> MeterShard:
        shard = self.deltas.get(meter.name)
        if shard is None:
            shard = self.deltas[meter.name] = MeterShard(meter)
        return shard

    def customers_of(self, meter_name: str) -> set[str]:
        """The customers with usage of a meter on this shard: head, deltas and sealed."""
        found = set(self.sealed_customers.get(meter_name, ()))
        for part in (self.meters, self.deltas):
            meter_shard = part.get(meter_name)
            if meter_shard is not None:
                found.update(meter_shard.by_customer)
        return found

    # ---------------------------------------------------------------- ingest

    def apply(self, lsn: int, groups: ShardSlice,
              received_ms: int = 0) -> tuple[int, int, list[Crossing]]:
        """Apply one batch slice, grouped by meter; ``received_ms`` is the batch's
        (``WalBatch.received_ms``): the "now" after which limits forget ended periods.

        Returns (accepted, duplicates, limit crossings). Deterministic: the same
        slices in the same order give the same state and the same crossings.
        """
        accepted = duplicates = 0
        seq_base = lsn << SEQ_SHIFT
        crossings: list[Crossing] = []
        limits = self.alert_limits
        limits.forget_ended(received_ms)
        sealed_before_ms = self.sealed_before_minute * MINUTE_MS
        for meter, all_items in groups:
            if not len(all_items):
                continue  # every event of it was a duplicate (dropped by the writer)
            targets = [(self.meter_shard(meter), all_items)]
            if sealed_before_ms and min(all_items.times) < sealed_before_ms:
                head_items, late_items = _split_by_time(all_items, sealed_before_ms)
                self._count_late(meter.name, late_items.times)
                targets = [(self.delta_shard(meter), late_items),
                           (self.meter_shard(meter), head_items)]
            head = targets[-1][0]
            for meter_shard, items in targets:
                if not len(items):
                    continue
                if meter_shard is head:
                    self.head_log.touch(meter.name, items.times)
                duplicate_positions: list[int] = []
                if meter.kind == SUM or meter.kind == COUNT:
                    applied = _apply_counter(meter_shard, items, meter.kind == COUNT,
                                             duplicate_positions)
                else:
                    applied = _apply_general(meter_shard, items, seq_base, duplicate_positions)
                accepted += applied
                duplicates += len(duplicate_positions)
                if limits.by_meter.get(meter.name):
                    skip = set(duplicate_positions)
                    positions = [p for p in range(len(items)) if p not in skip]
                    crossings.extend(limits.after_apply(meter_shard, items, positions,
                                                        seq_base))
        return accepted, duplicates, crossings

    def _count_late(self, name: str, times: list[int]) -> None:
        delta_days = self.delta_days
        for ts in times:
            key = (name, ts // DAY_MS)
            delta_days[key] = delta_days.get(key, 0) + 1
        self.delta_buckets += len(times)

    def correct(self, meter: MeterDef, changes: list[CorrectedMinutes],
                lsn: int = 0) -> list[Crossing]:
        """Apply a correction's rebuilt minutes (``engine.domain.corrections``), then
        re-read the affected customers' limit states (re-arming thresholds usage is now
        below). Returns the limit crossings.

        Minutes of the head are replaced in the head. Minutes before
        ``sealed_before_minute`` are replaced in a new version of their day's block
        (``BlockReader.replace``: pinned until the next checkpoint writes it), and leave
        the delta (and the head, which may still hold days before the boundary after a
        restore with another shard count): the rebuilt buckets already hold every late
        event logged before the correction, and later ones land in the delta on top. So
        the day is one block again, its rollups and summaries rebuilt, read as any
        other; replay (``lsn``: the record's, the blocks' cover) gives the same state."""
        meter_shard = self.meter_shard(meter)
        before = self.sealed_before_minute
        by_day: dict[int, list[CorrectedMinutes]] = {}
        for change in changes:
            head_change, sealed = split_sealed(change, before)
            if head_change is not None:
                replace_minutes(meter_shard, head_change)
                self.head_log.touch(meter.name,
                                    [minute * MINUTE_MS for minute in head_change.minutes])
            for day, part in sealed.items():
                by_day.setdefault(day, []).append(part)
                gone = CorrectedMinutes(part.customer_id, part.minutes, [])
                replace_minutes(meter_shard, gone)
                delta = self.deltas.get(meter.name)
                if delta is not None:
                    replace_minutes(delta, gone)
        for day in sorted(by_day):
            block = self.blocks.load_copy(meter, day)
            if block is None:
                block = MeterShard(meter)
            for part in by_day[day]:
                replace_minutes(block, part)
                if part.buckets:
                    self.sealed_customers.setdefault(meter.name, set()).add(part.customer_id)
            add_rollups(block)
            self.blocks.replace(meter, day, block, lsn)
        if not self.alert_limits.by_meter.get(meter.name):
            return []
        return self.alert_limits.after_correction(
            meter.name, {change.customer_id for change in changes})

    # ------------------------------------------------ limit states (LimitSource)

    def limit_partial(self, limit: LimitDef, customer: str, start_ms: int,
                      end_ms: int) -> Any | None:
        """The partial of ``customer``'s usage in [start, end) under ``limit``'s
        dimension filters, read from the buckets; None if there is none.

        Whole-minute buckets: bucket ``m`` counts if ``start <= m * MINUTE_MS < end``,
        so a bound inside a minute puts that minute in the period it starts in
        (``limits.period_of_bucket``). Called only to create a missing limit state.
        """
        return self.usage_partial(limit.meter, customer, limit.dim_filters, start_ms, end_ms)

    # ----------------------------------------------------------------- query

    def query(self, plan: QueryPlan) -> dict[tuple[int, tuple[Any, ...]], Any]:
        """Partial aggregates per (span index, group key) for ``plan``."""
        name = plan.meter.name
        if not plan.cuts_ms:
            return {}  # an empty range has no span
        meter_shard = self.meters.get(name)
        out = {} if meter_shard is None else collect_partials(
            meter_shard, plan, remember=DISTINCT_CACHE_MIN_BUCKETS)
        if plan.cuts_ms[0] >= self.sealed_before_minute * MINUTE_MS:
            return out
        kind = plan.meter.kind
        delta = self.deltas.get(name)
        if delta is not None and delta.series:
            collect_partials(delta, plan, remember=DISTINCT_CACHE_MIN_BUCKETS, out=out)
        cuts_ms = plan.cuts_ms
        first_day = cuts_ms[0] // DAY_MS
        last_day = (cuts_ms[-1] - 1) // DAY_MS
        days = self.blocks.days(name)
        # unique_count rollups of whole days, packed, gathered per group over every day
        # and unpacked once per group at the end (one join, split and set in C).
        packed: dict[tuple[int, tuple[Any, ...]], PackedDistinct] = {}
        summary: BlockRollup | None = None
        from_summary: dict[tuple[int, tuple[Any, ...]], PackedDistinct] = {}
        wanted = days[bisect_left(days, first_day):bisect_right(days, last_day)]
        spans = [whole_day_span(cuts_ms, day) for day in wanted]
        whole = [day for day, span in zip(wanted, spans, strict=True) if span >= 0]
        if len(whole) > 1 and len({span for span in spans if span >= 0}) == 1:
            # Every whole day in one span (a whole-range query, a long window): the
            # days' rollups merged per series, kept by the cache until a block changes.
            summary = self.blocks.load_summary(plan.meter, whole)
            if summary is not None:
                collect_rollup_partials(out, summary, plan, max(spans),
                                        from_summary if kind == UNIQUE else packed)
                wanted = [day for day, span in zip(wanted, spans, strict=True) if span < 0]
        for day in wanted:
            span = whole_day_span(cuts_ms, day)
            if span >= 0:
                # The day lies wholly inside one span: its rollups, no minute column.
                rollup = self.blocks.load_rollup(plan.meter, day)
                if rollup is not None:
                    collect_rollup_partials(out, rollup, plan, span, packed)
                continue
            block = self.blocks.load(plan.meter, day)
            if block is not None:
                collect_partials(block, plan, out=out)
        if from_summary and summary is not None:
            count_summary_groups(out, summary, from_summary, packed)
        if packed:
            unpack_into(out, packed)
        return out

    def usage_partial(self, meter: MeterDef, customer: str,
                      dim_filters: tuple[tuple[str, frozenset[str]], ...], start_ms: int,
                      end_ms: int) -> Any:
        """One customer's partial over [start, end) (whole minutes) from head, deltas
        and sealed blocks: what limits read when they have no state for a period."""
        first, last = -(-start_ms // MINUTE_MS), -(-end_ms // MINUTE_MS)
        kind = meter.kind
        merged: Any = None
        sources: list[MeterShard] = [part[meter.name] for part in (self.meters, self.deltas)
                                     if meter.name in part]
        if first < self.sealed_before_minute:
            days = self.blocks.days(meter.name)
            wanted = days[bisect_left(days, first // 1440):bisect_right(days, (last - 1) // 1440)]
            for day in wanted:
                if first <= day * 1440 and (day + 1) * 1440 <= last:
                    # A whole day: its rollups (one partial per series-day).
                    rollup = self.blocks.load_rollup(meter, day)
                    for _, dims, partial in (rollup.by_customer.get(customer, ())
                                             if rollup is not None else ()):
                        if dim_filters and not dims_match(dims, dim_filters):
                            continue
                        if kind == UNIQUE:
                            partial = set(unpack_distinct(partial))
                        merged = partial if merged is None else merge_partial(kind, merged,
                                                                              partial)
                    continue
                block = self.blocks.load(meter, day)
                if block is not None:
                    sources.append(block)
        for source in sources:
            for series in source.by_customer.get(customer, ()):
                if dim_filters and not dims_match(series.dims, dim_filters):
                    continue
                minutes = series.minutes
                lo = bisect_left(minutes, first)
                hi = bisect_left(minutes, last, lo)
                if lo == hi:
                    continue
                partial = slice_partial(kind, series, lo, hi)
                merged = partial if merged is None else merge_partial(kind, merged, partial)
        return merged

    # ----------------------------------------------------------------- sealing

    def seal(self, before_minute: int, cover_lsn: int, shard_count: int,
             part: int, compact: bool = True, encode: bool = True,
             ) -> list[tuple[str, int, MeterShard, bytes | None]]:
        """Cut the days before ``before_minute`` out of the head and merge the deltas
        into their days' blocks; returns the new blocks (meter, day, decoded, encoded),
        which the caller must make readable before this shard answers again.
        ``encode=False``: the encoded bytes are None, left to the caller
        (``encode_block`` with the same arguments; the block is not changed after).

        ``before_minute`` only moves forward. The blocks cover ``cover_lsn``: every
        event of their day applied so far.
        """
        before_minute = max(before_minute, self.sealed_before_minute)
        built: list[tuple[str, int, MeterShard, bytes | None]] = []
        pieces_by_block: dict[tuple[str, int], list[tuple[str, Series]]] = {}
        meters: dict[str, MeterDef] = {}
        # Late events: a bounded number of (meter, day) deltas merged per pass (each
        # costs decoding and encoding a block): the largest first (most buckets leave
        # memory and the queries' minute walks per block rewritten; a backfill of
        # history arrives as late events), and the oldest day too (the day least likely
        # to change again, so that no delta waits forever). The rest wait in the delta,
        # which queries merge, for a later pass. Deltas are bounded by the late limit.
        # Only the chosen days are cut out of the deltas: a pass costs per series and
        # chosen day, not per bucket waiting.
        late: dict[tuple[str, int], list[tuple[str, Series]]] = {}
        if compact and self.delta_days:
            sizes = self.delta_days
            by_age = sorted(sizes, key=lambda key: (key[1], key[0]))
            by_size = sorted(by_age[1:], key=lambda key: (-sizes[key], key[1], key[0]))
            chosen = [*by_age[:1], *by_size[:MAX_COMPACTIONS_PER_CHECKPOINT - 1]]
            days_of: dict[str, set[int]] = {}
            for name, day in chosen:
                days_of.setdefault(name, set()).add(day)
                del sizes[(name, day)]
            self.delta_buckets = sum(sizes.values())
            for name, days in days_of.items():
                delta = self.deltas.get(name)
                if delta is None:
                    continue
                meters[name] = delta.meter
                for day, pieces in cut_days(delta, days).items():
                    late[(name, day)] = pieces
                if not delta.series:
                    del self.deltas[name]
        pieces_by_block.update(late)
        # The days that left the hot window: a first block each.
        for name, head in self.meters.items():
            meters[name] = head.meter
            for day, pieces in cut_sealed(head, before_minute).items():
                pieces_by_block.setdefault((name, day), []).extend(pieces)
        for name, day in sorted(pieces_by_block):
            pieces = pieces_by_block[(name, day)]
            meter = meters[name]
            self.sealed_customers.setdefault(name, set()).update(
                piece.customer_id for _, piece in pieces)
            block = build_block(meter, pieces, self.blocks.load_copy(meter, day))
            add_rollups(block)
            built.append((name, day, block,
                          encode_block(block, day, shard_count, part, cover_lsn)
                          if encode else None))
        self.sealed_before_minute = before_minute
        return built

    def logical_export(self, meters: dict[str, MeterDef]) -> list[MeterPart]:
        """Every bucket this shard holds, head, deltas and blocks merged, in canonical
        order: the same bytes whatever was sealed or compacted when (tests, replay
        checks). Reads every block: not for the serving path."""
        merged: dict[str, MeterShard] = {}
        names = set(self.meters) | set(self.deltas) | set(self.sealed_customers)
        for name in sorted(names):
            meter = meters[name]
            target = merged[name] = MeterShard(meter)
            for day in self.blocks.days(name):
                block = self.blocks.load_copy(meter, day)
                for key, series in (block.series.items() if block is not None else ()):
                    merge_buckets(target, key[1], series)
            for part in (self.meters, self.deltas):
                meter_shard = part.get(name)
                for key, series in (meter_shard.series.items() if meter_shard else ()):
                    merge_buckets(target, key[1], series)
        for meter_shard in merged.values():
            for series in meter_shard.series.values():
                series.rollup = None
        return _export_meters(merged)

    def export_deltas(self, canonical: bool = True) -> list[MeterPart]:
        return _export_meters(self.deltas, canonical)

    def export_sealed_customers(self) -> list[list[Any]]:
        return [[name, sorted(self.sealed_customers[name])]
                for name in sorted(self.sealed_customers)]

    # -------------------------------------------------------------- snapshot

    def head_checkpoint(self, full: bool = False) -> list[tuple[str, int, MeterPart | None]]:
        """The head's chunks this checkpoint writes, as (meter, hour, chunk), and those
        it deletes, as (meter, hour, None) (``engine.domain.head``). ``full``: every
        chunk, the store's chunks having been dropped. Call after ``seal``."""
        log = self.head_log
        full = full or log.rewrite
        first_hour = self.sealed_before_minute // 60
        if full:
            touched = {name: head_hours(meter_shard)
                       for name, meter_shard in self.meters.items()}
            log.stored = {}
        else:
            touched = {name: {hour for hour in hours if hour >= first_hour}
                       for name, hours in log.dirty.items()}
        out: list[tuple[str, int, MeterPart | None]] = []
        for name in sorted(touched):
            hours = touched[name]
            meter_shard = self.meters.get(name)
            chunks = hour_chunks(meter_shard, hours) if meter_shard is not None else {}
            stored = log.stored.setdefault(name, set())
            for hour in sorted(hours):
                chunk = chunks.get(hour)
                if chunk is not None:
                    out.append((name, hour, chunk))
                    stored.add(hour)
                elif hour in stored:  # emptied (a query never empties; restore may)
                    out.append((name, hour, None))
                    stored.discard(hour)
        for name, stored in sorted(log.stored.items()):
            sealed = sorted(hour for hour in stored if hour < first_hour)
            out.extend((name, hour, None) for hour in sealed)
            stored.difference_update(sealed)
        log.dirty = {}
        log.rewrite = False
        return out

    def head_from_minute(self) -> int | None:
        """The earliest minute with a bucket in the head (None: the head is empty)."""
        return min((series.minutes[0] for meter_shard in self.meters.values()
                    for series in meter_shard.series.values() if series.minutes), default=None)

    def export(self, canonical: bool = True) -> list[MeterPart]:
        """This shard's state as plain records, in a canonical order."""
        return _export_meters(self.meters, canonical)

    # ------------------------------------------------------------ dimensions

    def dimension_keys(self, meter: MeterDef, start_ms: int, end_ms: int,
                       customers: frozenset[str] | None = None) -> set[str]:
        """The dimension keys of the series of ``meter`` (of ``customers``, or all) with
        a bucket in [start, end) rounded out to whole minutes: head, deltas and the
        sealed blocks of the days the range touches."""
        first, last = start_ms // MINUTE_MS, -(-end_ms // MINUTE_MS)
        if first >= last:
            return set()
        sources = [part[meter.name] for part in (self.meters, self.deltas)
                   if meter.name in part]
        if first < self.sealed_before_minute:
            days = self.blocks.days(meter.name)
            for day in days[bisect_left(days, first // 1440):
                            bisect_right(days, (last - 1) // 1440)]:
                block = self.blocks.load(meter, day)
                if block is not None:
                    sources.append(block)
        keys: set[str] = set()
        done: set[int] = set()  # id(dims) already in ``keys``: series share dims tuples
        for source in sources:
            if customers is None:
                candidates: list[Series] = list(source.series.values())
            else:
                candidates = [series for customer in customers
                              for series in source.by_customer.get(customer, ())]
            for series in candidates:
                if not series.dims or id(series.dims) in done:
                    continue
                minutes = series.minutes
                lo = bisect_left(minutes, first)
                if lo < len(minutes) and minutes[lo] < last:
                    done.add(id(series.dims))
                    keys.update(key for key, _ in series.dims)
        return keys


def _export_meters(meters: dict[str, MeterShard], canonical: bool = True) -> list[MeterPart]:
    parts = []
    for name in sorted(meters):
        meter_shard = meters[name]
        if not meter_shard.series:
            continue  # nothing of this meter here (it may all be sealed)
        records = [
            series_record(meter_shard.series[key], canonical)
            for key in sorted(meter_shard.series)
        ]
        # ``seen`` stays empty: unique ids live in the store's dedup index now.
        parts.append(MeterPart(name, records, []))
    return parts


def _split_by_time(items: Columns, before_ms: int) -> tuple[Columns, Columns]:
    """(events at or after ``before_ms``, events before it), each in batch order."""
    head, late = Columns(), Columns()
    unique = bool(items.unique_values)
    for position, ts in enumerate(items.times):
        target = late if ts < before_ms else head
        target.customers.append(items.customers[position])
        target.dims_keys.append(items.dims_keys[position])
        target.times.append(ts)
        target.values.append(items.values[position])
        target.unique_ids.append(items.unique_ids[position])
        target.indices.append(items.indices[position])
        if unique:
            target.unique_values.append(items.unique_values[position])
    return head, late


def _apply_counter(
    meter_shard: MeterShard, items: Columns, counting: bool, duplicate_positions: list[int]
) -> int:
    """The hot loop for sum and count meters: one column, updated in place.

    Returns the number accepted; appends the positions of duplicates (none: the WAL
    writer drops duplicates before a slice gets here, ``engine.runtime.dedup``). The
    edge steps are written out here and in ``_apply_general`` rather than shared: a
    function call per event costs about 0.1 µs, a noticeable share of the whole
    ingest path.
    """
    accepted = 0
    series_map = meter_shard.series
    for customer, dims, ts, value in zip(
        items.customers, items.dims_keys, items.times, items.values, strict=True,
    ):
        series = series_map.get((customer, dims))
        if series is None:
            series = meter_shard.new_series(customer, dims)
        if counting:
            value = 1
        minute = ts // 60_000  # MINUTE_MS as a literal: no global lookup per event
        offset = ts - minute * 60_000
        minutes = series.minutes
        column = series.counts if counting else series.values
        try:
            if minutes and minutes[-1] == minute:
                column[-1] += value
                edge = series.edges[-1]
                if not edge >> 16 <= offset <= edge & 0xFFFF:
                    series.edges[-1] = _widened_edge(edge, offset)
            elif not minutes or minutes[-1] < minute:
                column.append(value)
                minutes.append(minute)
                series.edges.append(offset * 0x10001)
            else:
                slot = bisect_left(minutes, minute)
                if minutes[slot] == minute:
                    column[slot] += value
                    edge = series.edges[slot]
                    if not edge >> 16 <= offset <= edge & 0xFFFF:
                        series.edges[slot] = _widened_edge(edge, offset)
                else:
                    column.insert(slot, value)
                    minutes.insert(slot, minute)
                    series.edges.insert(slot, offset * 0x10001)
        except (TypeError, OverflowError):
            # A Decimal or a sum beyond 64 bits: widen the column, then redo this event.
            series.widen_values()
            _add_slow(series, minute, offset, value)
        accepted += 1
    return accepted


def _add_slow(series: Series, minute: int, offset: int, value: Any) -> None:
    """Add ``value`` at ``minute`` after a failed fast update (which changed nothing:
    the value column is always updated before ``minutes`` and ``edges``)."""
    minutes = series.minutes
    slot = bisect_left(minutes, minute)
    if slot < len(minutes) and minutes[slot] == minute:
        series.values[slot] += value
        series.edges[slot] = _widened_edge(series.edges[slot], offset)
    else:
        series.values.insert(slot, value)
        minutes.insert(slot, minute)
        series.edges.insert(slot, offset * 0x10001)


def _widened_edge(edge: int, offset: int) -> int:
    """The packed first/last offsets of a bucket, widened to include ``offset``."""
    return min(edge >> 16, offset) << 16 | max(edge & 0xFFFF, offset)


def _apply_general(
    meter_shard: MeterShard, items: Columns, seq_base: int, duplicate_positions: list[int]
) -> int:
    """max, min, avg, latest and unique_count (see ``_apply_counter``)."""
    accepted = 0
    series_map = meter_shard.series
    kind = meter_shard.meter.kind
    unique_values = items.unique_values if kind == UNIQUE else repeat(None)
    for customer, dims, ts, value, index, unique_value in zip(
        items.customers, items.dims_keys, items.times, items.values,
        items.indices, unique_values, strict=False,  # unique_values may be an endless repeat
    ):
        series = series_map.get((customer, dims))
        if series is None:
            series = meter_shard.new_series(customer, dims)
        minute = ts // 60_000  # MINUTE_MS as a literal: no global lookup per event
        offset = ts - minute * 60_000
        minutes = series.minutes
        if minutes and minutes[-1] == minute:
            slot = len(minutes) - 1
        elif not minutes or minutes[-1] < minute:
            slot = _insert_bucket_at_end(series, minute, offset, kind, value)
        else:
            slot = _insert_bucket(series, minute, offset, kind, value)
        edge = series.edges[slot]
        if not edge >> 16 <= offset <= edge & 0xFFFF:
            series.edges[slot] = _widened_edge(edge, offset)
        if kind == AVG:
            series.counts[slot] += 1
            try:
                series.values[slot] += value
            except (TypeError, OverflowError):
                series.widen_values()
                series.values[slot] += value
        elif kind == MAX:
            if value > series.values[slot]:
                _set_value(series, slot, value)
        elif kind == MIN:
            if value < series.values[slot]:
                _set_value(series, slot, value)
        elif kind == LATEST:
            seq = seq_base | index
            times = series.times
            if ts > times[slot] or (ts == times[slot] and seq > series.seqs[slot]):
                times[slot] = ts
                series.seqs[slot] = seq
                _set_value(series, slot, value)
        else:
            # One distinct value is kept as the str itself, two or more as a set.
            series.distinct_cache = None
            current = series.values[slot]
            if current is None:
                series.values[slot] = unique_value
            elif type(current) is str:
                if current != unique_value:
                    series.values[slot] = {current, unique_value}
            else:
                current.add(unique_value)
        accepted += 1
    return accepted


def _insert_bucket(series: Series, minute: int, offset: int, kind: int, value: Any) -> int:
    """Insert an empty bucket for ``minute`` (or find it); return its index."""
    minutes = series.minutes
    index = bisect_left(minutes, minute)
    if index < len(minutes) and minutes[index] == minute:
        return index
    minutes.insert(index, minute)
    series.edges.insert(index, offset * 0x10001)
    if kind == SUM or kind == AVG:
        series.values.insert(index, 0)
    if kind == COUNT or kind == AVG:
        series.counts.insert(index, 0)
    elif kind == MAX or kind == MIN:
        _insert_value(series, index, value)
    elif kind == LATEST:
        _insert_value(series, index, value)
        series.times.insert(index, -1)
        series.seqs.insert(index, -1)
    elif kind == UNIQUE:
        series.values.insert(index, None)  # filled by the event that made it
    return index


def _insert_value(series: Series, index: int, value: Any) -> None:
    try:
        series.values.insert(index, value)
    except (TypeError, OverflowError):
        series.widen_values()
        series.values.insert(index, value)


def _insert_bucket_at_end(series: Series, minute: int, offset: int, kind: int, value: Any) -> int:
    series.minutes.append(minute)
    series.edges.append(offset * 0x10001)
    if kind == SUM:
        series.values.append(0)
    elif kind == COUNT:
        series.counts.append(0)
    elif kind == AVG:
        series.values.append(0)
        series.counts.append(0)
    elif kind == MAX or kind == MIN:
        _append_value(series, value)
    elif kind == LATEST:
        _append_value(series, value)
        series.times.append(-1)
        series.seqs.append(-1)
    else:
        series.values.append(None)  # unique_count: filled by the event that made it
    return len(series.minutes) - 1


def _append_value(series: Series, value: Any) -> None:
    try:
        series.values.append(value)
    except (TypeError, OverflowError):
        series.widen_values()
        series.values.append(value)


def _set_value(series: Series, slot: int, value: Any) -> None:
    try:
        series.values[slot] = value
    except (TypeError, OverflowError):
        series.widen_values()
        series.values[slot] = value


# ------------------------------------------------------------------ query pass


def _cut_minute(series: Series, cut_ms: int) -> int:
    """The first minute on or after a cut, for one series.

    A cut on a whole minute is that minute. A cut inside a minute is exact if
    all of this series' events in that minute lie on one side of it.
    """
    minute, offset = divmod(cut_ms, MINUTE_MS)
    if offset == 0:
        return minute
    slot = bisect_left(series.minutes, minute)
    if slot == len(series.minutes) or series.minutes[slot] != minute:
        return minute  # no events in that minute: either way is exact
    edge = series.edges[slot]
    if edge >> 16 >= offset:
        return minute  # every event of the bucket is at or after the cut
    if edge & 0xFFFF < offset:
        return minute + 1  # every event of the bucket is before the cut
    raise InvalidQuery(
        f"time {cut_ms} ms falls inside a one-minute bucket holding events on both sides "
        f"of it (minute starting {minute * MINUTE_MS}); use range and window boundaries "
        "on whole minutes"
    )


def collect_partials(
    meter_shard: MeterShard, plan: QueryPlan, remember: int = 0,
    out: dict[tuple[int, tuple[Any, ...]], Any] | None = None,
) -> dict[tuple[int, tuple[Any, ...]], Any]:
    """Partial aggregates per (span index, group key) of the series matching ``plan``
    (merged into ``out`` when given, as ``_merge_into`` merges: the head's, then the
    deltas' and the blocks' into one dict, not one dict each merged again).

    The cost is per series, so the loop avoids per-series work where it can:
    a dimension set's filter verdict and group values are worked out once per
    shared ``dims`` tuple, and sum/count meters add their columns inline.
    ``remember`` (the head and the deltas, never a shared block): unique_count slices
    of at least that many buckets are kept on their series until a bucket of it
    changes (``distinct_slice``); shorter ones are named by their values
    (``aggregates.NAMED_BY_VALUES_MAX``) or recomputed.
    """
    kind = meter_shard.meter.kind
    slice_of: Any = slice_partial
    if remember and kind == UNIQUE:
        def slice_of(kind: int, series: Series, lo: int, hi: int) -> Any:
            return distinct_slice(kind, series, lo, hi, remember)
    cuts_ms = plan.cuts_ms
    aligned_cuts = [cut // MINUTE_MS for cut in cuts_ms]
    unaligned = [k for k, cut in enumerate(cuts_ms) if cut % MINUTE_MS]
    span_count = len(cuts_ms) - 1
    if out is None:
        out = {}
    if plan.customers is not None:
        candidates: list[Series] = []
        for customer in plan.customers:
            candidates.extend(meter_shard.by_customer.get(customer, ()))
    else:
        candidates = list(meter_shard.series.values())
    dim_filters = plan.dim_filters
    group_by = plan.group_by
    customer_at = group_by.index("customer_id") if "customer_id" in group_by else -1
    by_dims = bool(dim_filters) or any(key != "customer_id" for key in group_by)
    # id(series.dims) -> the group with None where the customer goes, or _FILTERED.
    # Keyed by identity: series share their dims tuple (MeterShard.dims_by_key).
    dims_groups: dict[int, Any] = {}
    counter = kind == SUM or kind == COUNT
    out_get = out.get
    group: tuple[Any, ...] = ()
    for series in candidates:
        if by_dims:
            dims_group = dims_groups.get(id(series.dims))
            if dims_group is None:
                dims_group = dims_groups[id(series.dims)] = _dims_group(series.dims, plan)
            if dims_group is _FILTERED:
                continue
            group = dims_group
            if customer_at >= 0:
                group = (*group[:customer_at], series.customer_id, *group[customer_at + 1:])
        elif customer_at >= 0:
            group = (series.customer_id,)
        cut_minutes = aligned_cuts
        if unaligned:
            cut_minutes = list(aligned_cuts)
            for k in unaligned:
                cut_minutes[k] = _cut_minute(series, cuts_ms[k])
        first, last = cut_minutes[0], cut_minutes[-1]
        minutes = series.minutes
        count = len(minutes)
        if not count:
            continue
        lo = 0 if minutes[0] >= first else bisect_left(minutes, first)
        hi = count if minutes[-1] < last else bisect_left(minutes, last, lo)
        if lo >= hi:
            continue
        rollup = series.rollup
        if rollup is not None and lo == 0 and hi == count:
            # A sealed series-day wholly inside one span: its precomputed partial.
            span = bisect_right(cut_minutes, minutes[0], 0, span_count) - 1
            if minutes[-1] < cut_minutes[span + 1]:
                _merge_into(out, (span, group), kind, rollup)
                continue
        if counter and span_count == 1:
            column = series.counts if kind == COUNT else series.values
            key = (0, group)
            value = sum(column) if hi - lo == count else sum(column[lo:hi])
            existing = out_get(key)
            out[key] = value if existing is None else existing + value
            continue
        if counter and hi - lo <= BUCKET_LOOP_MAX_PER_SPAN * span_count:
            # Bucket by bucket: most series hold few buckets next to the windows asked
            # for; a long series is cheaper summed a window at a time (below).
            column = series.counts if kind == COUNT else series.values
            span = bisect_right(cut_minutes, minutes[lo], 0, span_count) - 1
            span_end = cut_minutes[span + 1]
            total = 0
            for index in range(lo, hi):
                minute = minutes[index]
                if minute >= span_end:
                    key = (span, group)
                    existing = out_get(key)
                    out[key] = total if existing is None else existing + total
                    span = bisect_right(cut_minutes, minute, span, span_count) - 1
                    span_end = cut_minutes[span + 1]
                    total = 0
                total += column[index]
            key = (span, group)
            existing = out_get(key)
            out[key] = total if existing is None else existing + total
            continue
        if span_count == 1:
            _merge_into(out, (0, group), kind, slice_of(kind, series, lo, hi))
            continue
        span = bisect_right(cut_minutes, minutes[lo], 0, span_count) - 1
        while lo < hi:
            span_end = cut_minutes[span + 1]
            stop = bisect_left(minutes, span_end, lo, hi)
            if stop > lo:
                _merge_into(out, (span, group), kind, slice_of(kind, series, lo, stop))
                lo = stop
            if lo < hi:
                span = bisect_right(cut_minutes, minutes[lo], span, span_count) - 1
    return out


# A head series keeps the distinct values of at most this many bucket ranges, each of
# at least this many buckets (shorter ones are cheap to unite again).
DISTINCT_CACHE_RANGES = 4
DISTINCT_CACHE_MIN_BUCKETS = 128


def distinct_slice(kind: int, series: Series, lo: int, hi: int,
                   min_buckets: int = DISTINCT_CACHE_MIN_BUCKETS) -> Any:
    """``slice_partial`` of a unique_count head or delta series, remembered when it
    spans at least ``min_buckets``: a ``RememberedSlice`` (shared: partials that meet
    it merge into a new set) kept in ``series.distinct_cache`` until a bucket of the
    series changes (apply, sealing and merges reset it), so a query repeated over the
    head unites its minute buckets once, not per run."""
    if hi - lo < min_buckets:
        return slice_partial(kind, series, lo, hi)
    cache = series.distinct_cache
    if cache is None:
        cache = series.distinct_cache = {}
    found = cache.get((lo, hi))
    if found is None:
        if len(cache) >= DISTINCT_CACHE_RANGES:
            cache.clear()
        found = cache[(lo, hi)] = RememberedSlice(slice_partial(kind, series, lo, hi))
    return found


def whole_day_span(cuts_ms: list[int], day: int) -> int:
    """The span that holds UTC ``day`` whole, or -1 if a cut falls inside the day or the
    range does not cover all of it (then the day's minute buckets decide)."""
    day_start_ms = day * DAY_MS
    day_end_ms = day_start_ms + DAY_MS
    if cuts_ms[0] > day_start_ms or cuts_ms[-1] < day_end_ms:
        return -1
    span = bisect_right(cuts_ms, day_start_ms) - 1
    return span if cuts_ms[span + 1] >= day_end_ms else -1


# A rollup keeps the grouped partials of at most this many query shapes (each entry
# counted as this many bytes in its ``nbytes``).
GROUPED_SHAPES = 4
GROUPED_ENTRY_BYTES = 160


def collect_rollup_partials(out: dict[tuple[int, tuple[Any, ...]], Any], rollup: BlockRollup,
                            plan: QueryPlan, span: int,
                            packed: dict[tuple[int, tuple[Any, ...]], PackedDistinct]) -> None:
    """Merge a block's whole-day partials into ``out``, all in ``span`` (the caller
    checked that the day lies inside it): one merge per series-day, no bisect. The
    packed values of unique_count rollups are gathered in ``packed`` per group instead
    (each part named by the rollup's serial and its id, ``PackedDistinct.keys``), for
    ``unpack_into``.

    Other aggregations over every customer: the rollup's partials grouped for this
    plan's shape are kept on it (``BlockRollup.grouped``, a rollup never changes), so a
    repeated shape merges one entry per group (a handful for a dimension, a dict
    update when ``out`` is empty), not one per series-day."""
    kind = rollup.meter.kind
    if kind == UNIQUE or plan.customers is not None:
        _collect_rollup_entries(out, rollup, plan, span, packed)
        return
    shape = (plan.group_by, plan.dim_filters, span)
    grouped = rollup.grouped.get(shape)
    if grouped is None:
        grouped = {}
        _collect_rollup_entries(grouped, rollup, plan, span, packed)
        if len(rollup.grouped) >= GROUPED_SHAPES:
            oldest = next(iter(rollup.grouped))
            rollup.nbytes -= GROUPED_ENTRY_BYTES * (len(rollup.grouped.pop(oldest)) + 1)
        rollup.grouped[shape] = grouped
        rollup.nbytes += GROUPED_ENTRY_BYTES * (len(grouped) + 1)
    if not out:
        out.update(grouped)
        return
    earlier = {key: out[key] for key in out.keys() & grouped.keys()}
    out.update(grouped)
    counter = kind == SUM or kind == COUNT
    for key, existing in earlier.items():
        out[key] = (existing + grouped[key] if counter
                    else merge_partial(kind, existing, grouped[key]))


def _collect_rollup_entries(out: dict[tuple[int, tuple[Any, ...]], Any],
                            rollup: BlockRollup, plan: QueryPlan, span: int,
                            packed: dict[tuple[int, tuple[Any, ...]], PackedDistinct]
                            ) -> None:
    """``collect_rollup_partials``, series-day by series-day."""
    serial = rollup.serial
    kind = rollup.meter.kind
    if plan.customers is not None:
        entries: list[tuple[str, Any, Any]] = []
        for customer in plan.customers:
            entries.extend(rollup.by_customer.get(customer, ()))
    else:
        entries = rollup.series
    group_by = plan.group_by
    customer_at = group_by.index("customer_id") if "customer_id" in group_by else -1
    by_dims = bool(plan.dim_filters) or any(key != "customer_id" for key in group_by)
    dims_groups: dict[int, Any] = {}
    unique = kind == UNIQUE
    counter = kind == SUM or kind == COUNT
    out_get = out.get
    key: tuple[int, tuple[Any, ...]] = (span, ())
    for customer, dims, partial in entries:
        if by_dims:
            dims_group = dims_groups.get(id(dims))
            if dims_group is None:
                dims_group = dims_groups[id(dims)] = _dims_group(dims, plan)
            if dims_group is _FILTERED:
                continue
            group = dims_group
            if customer_at >= 0:
                group = (*group[:customer_at], customer, *group[customer_at + 1:])
            key = (span, group)
        elif customer_at >= 0:
            key = (span, (customer,))
        if unique:
            pending = packed.get(key)
            if pending is None:
                packed[key] = PackedDistinct([partial], keys=[(serial, id(partial))])
            else:
                pending.parts.append(partial)
                pending.keys.append((serial, id(partial)))  # type: ignore[union-attr]
            continue
        existing = out_get(key)
        if existing is None:
            out[key] = partial
        elif counter:
            out[key] = existing + partial
        else:
            out[key] = merge_partial(kind, existing, partial)


def unpack_into(out: dict[tuple[int, tuple[Any, ...]], Any],
                packed: dict[tuple[int, tuple[Any, ...]], PackedDistinct]) -> None:
    """Hand each group's packed unique_count rollups on in ``out``: a group with head
    or delta values too gets one ``PackedDistinct`` of both, united when counted
    (``aggregates.distinct_values``: each value one split and one set insert, however
    many days and shards it spans; remembered by ``aggregates.DistinctCounts`` while
    every part has a name)."""
    for key, pending in packed.items():
        existing = out.get(key)
        if existing is not None:
            pending.add(existing)
        out[key] = pending


def count_summary_groups(out: dict[tuple[int, tuple[Any, ...]], Any], summary: BlockRollup,
                         from_summary: dict[tuple[int, tuple[Any, ...]], PackedDistinct],
                         packed: dict[tuple[int, tuple[Any, ...]], PackedDistinct]) -> None:
    """unique_count groups whose sealed values all come from one summary: counted here,
    against the summary's memory of earlier lookups (``blocks.count_over_summary``), so
    a repeated whole-range query costs per head value, not per sealed value. The
    partial keeps its parts (a merge with another shard's forgets the count and unites
    them); a group with other sealed days too is left to ``unpack_into``."""
    for key, pending in from_summary.items():
        more = packed.get(key)
        if more is not None:
            more.add(pending)
            continue
        loose = out.get(key)
        loose_parts = ([] if loose is None else
                       loose.parts if type(loose) is PackedDistinct else [loose])
        count = count_over_summary(summary, tuple(pending.parts), loose_parts)
        if loose is not None:
            pending.add(loose)
        pending.count = count
        out[key] = pending


_FILTERED: Any = ("filtered out",)  # a sentinel no real group equals (identity checked)


def _dims_group(dims: tuple[tuple[str, str], ...], plan: QueryPlan) -> Any:
    """For one dimension set: ``_FILTERED``, or the group values (customer slot None)."""
    if plan.dim_filters and not dims_match(dims, plan.dim_filters):
        return _FILTERED
    values = dict(dims)
    return tuple(None if key == "customer_id" else values.get(key) for key in plan.group_by)


def _merge_into(out: dict[Any, Any], key: Any, kind: int, partial: Any) -> None:
    existing = out.get(key)
    if existing is None:
        # A shared unique_count partial (a RememberedSlice) is kept as it is; another
        # partial for its group joins it in a PackedDistinct (merge_partial), united
        # when counted, so the slice is neither copied nor changed.
        out[key] = partial
    else:
        out[key] = merge_partial(kind, existing, partial)


# ------------------------------------------------------------------ snapshot


def restore_shards(
    shard_parts: list[ShardPart], meters: dict[str, MeterDef], route: ShardRouter,
    late_ms: int | None = None,
    head_chunks: Sequence[tuple[int, str, int, MeterPart]] = (),
) -> list[ShardState]:
    """Rebuild shard states from a checkpoint taken with any shard count.

    Series, deltas and sealed customers follow their customer to its shard under
    ``route`` (sealed blocks are resharded by recovery). The head comes from each
    part's ``meters`` (checkpoints from before hour chunks) or from ``head_chunks``
    (part, meter, hour, chunk), sorted, of the parts with ``head_chunked``. The unique
    ids of a snapshot from before the dedup index (``MeterPart.seen``) are not loaded
    here: recovery moves them into the index.
    """
    states = [ShardState(late_ms) for _ in range(route.shard_count)]
    chunked = [part.head_chunked for part in shard_parts]
    for part_index, name, hour, chunk in head_chunks:
        if not chunked[part_index]:
            continue  # a part written whole: its chunks are none of this checkpoint's
        meter = meters[name]
        for record in chunk.series:
            state = states[route(record.customer_id)]
            load_chunk(state.meter_shard(meter), record)
            if len(shard_parts) == route.shard_count:
                state.head_log.stored.setdefault(name, set()).add(hour)
    if len(shard_parts) != route.shard_count or not all(chunked):
        for state in states:  # the stored chunks do not match these shards: write anew
            state.head_log.rewrite = True
    # The same shards: each its own boundary (automatic checkpoints seal a day a few
    # shards at a time). Resharded: the greatest, so no customer's sealed day is read
    # as head (a head still holding days before it cuts them at its next checkpoint).
    if len(shard_parts) == route.shard_count:
        for state, shard_part in zip(states, shard_parts, strict=True):
            state.sealed_before_minute = shard_part.sealed_before_minute
    else:
        sealed_before = max((part.sealed_before_minute for part in shard_parts), default=0)
        for state in states:
            state.sealed_before_minute = sealed_before
    for shard_part in shard_parts:
        for parts, pick in ((shard_part.meters, ShardState.meter_shard),
                            (shard_part.deltas, ShardState.delta_shard)):
            for part in parts:
                meter = meters[part.meter]
                for record in part.series:
                    load_series(pick(states[route(record.customer_id)], meter), record)
        for name, customers in shard_part.sealed_customers:
            for customer in customers:
                states[route(customer)].sealed_customers.setdefault(name, set()).add(customer)
    for state in states:
        for name, delta in state.deltas.items():
            for series in delta.series.values():
                for minute in series.minutes:
                    key = (name, minute * MINUTE_MS // DAY_MS)
                    state.delta_days[key] = state.delta_days.get(key, 0) + 1
        state.delta_buckets = sum(state.delta_days.values())
    return states


def state_statistics(state: ShardState) -> tuple[int, int]:
    """(series, buckets) held by one shard."""
    series_count = bucket_count = 0
    for meter_shard in (*state.meters.values(), *state.deltas.values()):
        series_count += len(meter_shard.series)
        bucket_count += sum(len(s.minutes) for s in meter_shard.series.values())
    return series_count, bucket_count
