"""Query planning, cross-shard merging and finalisation.

Pure domain layer: standard library, ``engine.schema``, ``engine.errors`` and
the domain modules ``aggregates``, ``meters``, ``values`` and ``windows``.
``plan_query`` validates a ``Query`` against its meter and computes its calendar
windows once; every shard turns the plan into partial aggregates
(``ShardState.query``); ``finish_query`` merges the partials, finalises values,
applies ``take`` and orders the rows.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from decimal import localcontext
from typing import Any

from engine.domain.aggregates import (
    COUNT,
    MAX,
    MIN,
    SUM,
    DistinctCounts,
    copy_partial,
    finalize,
    merge_partial,
)
from engine.domain.meters import MeterDef
from engine.domain.values import EXACT
from engine.domain.windows import WindowError, resolve_timezone, window_spans
from engine.errors import InvalidQuery
from engine.schema import Dimension, DimensionValue, Query, QueryPage, QueryResult, Row, Take

MAX_GROUP_BY = 8
# Aggregations whose partial is the reported value (``aggregates.finalize``).
PLAIN_KINDS = frozenset((SUM, COUNT, MAX, MIN))


@dataclass(frozen=True, slots=True, eq=False)
class QueryPlan:
    query: Query
    meter: MeterDef
    labels_ms: list[int]  # window start of each span
    cuts_ms: list[int]  # span k is [cuts_ms[k], cuts_ms[k + 1])
    group_by: tuple[str, ...]
    customers: frozenset[str] | None
    dim_filters: tuple[tuple[str, frozenset[str]], ...]
    # Each shard keeps only the groups that can be among ``take``'s (``keep_top_groups``):
    # set by the engine for a ``take`` over groups with the customer in them, which no
    # two shards share, and only where the result is ``finish_query``'s.
    shard_take: bool = False


def plan_query(query: Query, meter: MeterDef) -> QueryPlan:
    """Validate ``query`` for ``meter``; raises ``InvalidQuery`` saying what is wrong."""
    if type(query) is not Query:
        raise InvalidQuery(f"expected a Query, got {type(query).__name__}")
    start_ms, end_ms = query.start_ms, query.end_ms
    for name, value in (("start_ms", start_ms), ("end_ms", end_ms)):
        if type(value) is not int:
            raise InvalidQuery(f"{name} must be integer milliseconds, got {value!r}")
    if start_ms > end_ms:
        raise InvalidQuery(f"start_ms {start_ms} is after end_ms {end_ms}")
    try:
        tz = resolve_timezone(query.timezone)
        spans = window_spans(start_ms, end_ms, query.window, tz)
    except WindowError as exc:
        raise InvalidQuery(str(exc)) from None
    group_by = query.group_by
    if not isinstance(group_by, list) or not all(type(k) is str and k for k in group_by):
        raise InvalidQuery("group_by must be a list of 'customer_id' and dimension keys")
    if len(set(group_by)) != len(group_by):
        raise InvalidQuery(f"group_by names a key twice: {group_by}")
    if len(group_by) > MAX_GROUP_BY:
        raise InvalidQuery(f"group_by has {len(group_by)} keys, at most {MAX_GROUP_BY} allowed")
    unique_key = meter.unique_dimension
    if unique_key is not None and unique_key in group_by:
        raise InvalidQuery(
            f"meter {meter.name!r} counts distinct {unique_key!r}; it cannot be grouped by it"
        )
    if not isinstance(query.filter, dict):
        raise InvalidQuery("filter must map 'customer_id' or a dimension key to a list of values")
    customers: frozenset[str] | None = None
    dim_filters = []
    for key, allowed in query.filter.items():
        if type(key) is not str or not key:
            raise InvalidQuery(f"filter key {key!r} must be a non-empty string")
        if key == unique_key:
            raise InvalidQuery(
                f"meter {meter.name!r} counts distinct {unique_key!r}; it cannot be filtered by it"
            )
        if not isinstance(allowed, list) or not all(type(v) is str for v in allowed):
            raise InvalidQuery(f"filter values for {key!r} must be a list of strings")
        if key == "customer_id":
            customers = frozenset(allowed)
        else:
            dim_filters.append((key, frozenset(allowed)))
    take = query.take
    if take is not None and (type(take.limit) is not int or take.limit < 1):
        raise InvalidQuery(f"take.limit must be a positive integer, got {take.limit!r}")
    cuts = [lo for _, lo, _ in spans]
    if spans:
        cuts.append(spans[-1][2])
    return QueryPlan(
        query=query,
        meter=meter,
        labels_ms=[label for label, _, _ in spans],
        cuts_ms=cuts,
        group_by=tuple(group_by),
        customers=customers,
        dim_filters=tuple(dim_filters),
    )


def _group_order(group: tuple[Any, ...]) -> tuple[Any, ...]:
    """Order groups with ``None`` (dimension absent) first, then by string."""
    return tuple((value is not None, value or "") for value in group)


def finish_query(plan: QueryPlan, shard_partials: list[dict[Any, Any]],
                 counts: DistinctCounts | None = None) -> QueryResult:
    """Merge per-shard partials into the ordered, finalised result rows (unique_count
    counts remembered in ``counts``, when given: ``aggregates.DistinctCounts``)."""
    kind = plan.meter.kind
    merged: dict[tuple[int, tuple[Any, ...]], Any] = {}
    single_span = len(plan.labels_ms) == 1
    with localcontext(EXACT):
        if "customer_id" in plan.group_by:
            # A customer lives on one shard, so no group comes from two shards.
            for partials in shard_partials:
                merged.update(partials)
        else:
            for partials in shard_partials:
                for key, partial in partials.items():
                    existing = merged.get(key)
                    merged[key] = (
                        partial if existing is None else merge_partial(kind, existing, partial)
                    )
        take = plan.query.take
        rank = None if take is None else _rank_groups(kind, merged, take, single_span, counts)
        rows = []
        for (span, group), partial in merged.items():
            if rank is not None and group not in rank:
                continue
            rows.append((span, group, finalize(kind, partial, counts)))
    if rank is not None:
        rows.sort(key=lambda r: (r[0], rank[r[1]]))
    else:
        rows.sort(key=lambda r: (r[0], _group_order(r[1])))
    group_by = plan.group_by
    query = plan.query
    return QueryResult(
        meter_api_name=query.meter_api_name,
        aggregation=plan.meter.meter.aggregation,
        start_ms=query.start_ms,
        end_ms=query.end_ms,
        window=query.window,
        timezone=query.timezone,
        rows=[
            Row(plan.labels_ms[span], dict(zip(group_by, group, strict=True)), value)
            for span, group, value in rows
        ],
    )


def _rank_groups(kind: int, merged: dict[tuple[int, tuple[Any, ...]], Any], take: Take,
                 single_span: bool, counts: DistinctCounts | None = None
                 ) -> dict[tuple[Any, ...], int]:
    """The ``take.limit`` best groups by their total over all spans, with their rank."""
    totals: dict[tuple[Any, ...], Any] = {}
    if single_span:  # one partial per group already
        totals = {group: partial for (_, group), partial in merged.items()}
    else:
        for (_, group), partial in merged.items():
            existing = totals.get(group)
            totals[group] = (
                copy_partial(kind, partial)
                if existing is None
                else merge_partial(kind, existing, partial)
            )
    finals = (totals if kind in PLAIN_KINDS
              else {group: finalize(kind, partial, counts) for group, partial in totals.items()})
    candidates: Any = finals
    if len(finals) > take.limit:
        # Only groups at least as good as the limit-th value can make the cut:
        # find that value over plain numbers, then order just those groups.
        pick = heapq.nsmallest if take.ascending else heapq.nlargest
        bound = pick(take.limit, finals.values())[-1]
        candidates = [
            group for group, value in finals.items()
            if (value <= bound if take.ascending else value >= bound)
        ]
    sign = 1 if take.ascending else -1
    ranked = sorted(candidates, key=lambda g: (sign * finals[g], _group_order(g)))
    return {g: i for i, g in enumerate(ranked[: take.limit])}


def keep_top_groups(plan: QueryPlan, partials: dict[tuple[int, tuple[Any, ...]], Any],
                    counts: DistinctCounts | None = None
                    ) -> dict[tuple[int, tuple[Any, ...]], Any]:
    """One shard's partials cut to the groups among its own ``take`` best (every span
    of them; for plain numbers in one span, those tied with the last of them too):
    with the customer in every group, a group's total on its shard is its total, and
    a group among the best of all is among the best of its shard (ranked by the same
    total and tie-break), so ``finish_query`` over every shard's cut partials answers
    as over all of them, and ranks a few hundred groups, not all."""
    take = plan.query.take
    assert take is not None and plan.shard_take
    kind = plan.meter.kind
    single_span = len(plan.labels_ms) == 1
    if len(partials) <= take.limit:
        return partials
    if single_span and kind in PLAIN_KINDS:
        # One number per group: every group at least as good as the limit-th value (ties
        # kept; ``finish_query`` ranks them), in two passes over the values.
        pick = heapq.nsmallest if take.ascending else heapq.nlargest
        bound = pick(take.limit, partials.values())[-1]
        if take.ascending:
            return {key: value for key, value in partials.items() if value <= bound}
        return {key: value for key, value in partials.items() if value >= bound}
    with localcontext(EXACT):
        rank = _rank_groups(kind, partials, take, single_span, counts)
    return {key: partial for key, partial in partials.items() if key[1] in rank}


# ------------------------------------------------------- pages, other rows, dimensions


def merge_shard_partials(plan: QueryPlan, shard_partials: list[dict[Any, Any]]
                         ) -> dict[tuple[int, tuple[Any, ...]], Any]:
    """Every shard's partials merged per (span index, group); call inside ``EXACT``."""
    kind = plan.meter.kind
    merged: dict[tuple[int, tuple[Any, ...]], Any] = {}
    if "customer_id" in plan.group_by:
        # A customer lives on one shard, so no group comes from two shards.
        for partials in shard_partials:
            merged.update(partials)
        return merged
    for partials in shard_partials:
        for key, partial in partials.items():
            existing = merged.get(key)
            merged[key] = partial if existing is None else merge_partial(kind, existing, partial)
    return merged


def rank_all_groups(kind: int, merged: dict[tuple[int, tuple[Any, ...]], Any],
                    ascending: bool, counts: DistinctCounts | None = None,
                    limit: int | None = None) -> list[tuple[Any, ...]]:
    """Every group, best first by its total over all spans (ties by group order); with
    ``limit``, only the first ``limit`` of them (the rest are not ordered: a page of 50
    among 100,000 customers orders the few that can make it, as ``_rank_groups``)."""
    totals: dict[tuple[Any, ...], Any] = {}
    if kind == SUM or kind == COUNT:  # plain numbers: added inline, final already
        totals_get = totals.get
        for (_, group), partial in merged.items():
            totals[group] = totals_get(group, 0) + partial
        finals = totals
    else:
        for (_, group), partial in merged.items():
            existing = totals.get(group)
            totals[group] = (copy_partial(kind, partial) if existing is None
                             else merge_partial(kind, existing, partial))
        finals = (totals if kind in PLAIN_KINDS else
                  {group: finalize(kind, partial, counts) for group, partial in totals.items()})
    candidates: Any = finals
    if limit is not None and len(finals) > limit:
        if limit <= 0:
            return []
        pick = heapq.nsmallest if ascending else heapq.nlargest
        bound = pick(limit, finals.values())[-1]
        candidates = [group for group, value in finals.items()
                      if (value <= bound if ascending else value >= bound)]
    sign = 1 if ascending else -1
    ranked = sorted(candidates, key=lambda g: (sign * finals[g], _group_order(g)))
    return ranked if limit is None else ranked[:limit]


def finish_page(plan: QueryPlan, shard_partials: list[dict[Any, Any]], offset: int,
                with_other: bool, counts: DistinctCounts | None = None) -> QueryPage:
    """Like ``finish_query``, with paging and the exact aggregate of the rest.

    With ``take``, the groups ranked ``offset`` to ``offset + take.limit - 1`` (from
    0) by their total over the range; without it, every group (``offset`` must be
    0). ``other`` (when asked for) has one row per span: the aggregate of every
    group *not* in the page, merged from their partials, so it is exact for every
    aggregation (unique_count counts the distinct values over all those groups
    together, not a sum of their counts); a span where no such group has usage has
    no row. ``group_count`` is the number of groups before paging.
    """
    if type(offset) is not int or offset < 0:
        raise InvalidQuery(f"take.offset must be a non-negative integer, got {offset!r}")
    take = plan.query.take
    if take is None and offset:
        raise InvalidQuery("take.offset needs take.limit")
    kind = plan.meter.kind
    with localcontext(EXACT):
        merged = merge_shard_partials(plan, shard_partials)
        groups = {group for _, group in merged}
        if take is None:
            rank = {group: index for index, group in
                    enumerate(sorted(groups, key=_group_order))}
        else:
            ranked = rank_all_groups(kind, merged, take.ascending, counts,
                                     limit=offset + take.limit)
            rank = {group: index for index, group in
                    enumerate(ranked[offset:offset + take.limit])}
        rows = []
        rest: dict[int, Any] = {}
        counter = kind == SUM or kind == COUNT
        for (span, group), partial in merged.items():
            if group in rank:
                rows.append((span, rank[group], group, finalize(kind, partial, counts)))
            elif not with_other:
                continue
            elif counter:
                rest[span] = rest.get(span, 0) + partial
            else:
                existing = rest.get(span)
                rest[span] = (copy_partial(kind, partial) if existing is None
                              else merge_partial(kind, existing, partial))
        other = [Row(plan.labels_ms[span], {}, finalize(kind, rest[span], counts))
                 for span in sorted(rest)]
    rows.sort(key=lambda r: (r[0], r[1]))
    query = plan.query
    result = QueryResult(
        meter_api_name=query.meter_api_name,
        aggregation=plan.meter.meter.aggregation,
        start_ms=query.start_ms,
        end_ms=query.end_ms,
        window=query.window,
        timezone=query.timezone,
        rows=[Row(plan.labels_ms[span], dict(zip(plan.group_by, group, strict=True)), value)
              for span, _, group, value in rows],
    )
    return QueryPage(result=result, other=other if with_other else None,
                     group_count=len(groups), offset=offset)


def finish_dimension(plan: QueryPlan, shard_partials: list[dict[Any, Any]], top: int,
                     counts: DistinctCounts | None = None) -> Dimension:
    """The ``top`` values of the one key ``plan`` groups by, by usage over its range.

    Usage is the meter's own aggregation over the events holding that value; ties
    go by value. Events without the key are left out. ``other`` is the exact
    aggregate over every value not in the top (None when there is none).
    """
    (key,) = plan.group_by
    kind = plan.meter.kind
    with localcontext(EXACT):
        merged = {group_key: partial for group_key, partial in
                  merge_shard_partials(plan, shard_partials).items()
                  if group_key[1][0] is not None}
        ranked = rank_all_groups(kind, merged, ascending=False, counts=counts, limit=top)
        totals = {group: partial for (_, group), partial in merged.items()}  # one span
        values = [DimensionValue(group[0], finalize(kind, totals[group], counts))
                  for group in ranked]
        shown = set(ranked)
        rest: Any = None
        for group, partial in totals.items():
            if group in shown:
                continue
            rest = copy_partial(kind, partial) if rest is None else merge_partial(
                kind, rest, partial)
        other = None if rest is None else finalize(kind, rest, counts)
    return Dimension(key=key, value_count=len(totals), values=values, other=other)
