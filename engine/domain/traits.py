"""Customer traits in queries: ``group_by=["customer.plan"]``, ``filter={"customer.plan": [...]}``.

Pure domain layer: standard library, msgspec, ``engine.schema``, ``engine.errors`` and
the domain modules ``aggregates``, ``batch`` (the reserved prefix), ``query`` and ``values``.

Shards know customers only by id; traits live in the customer registry and change
whenever a record is added or updated. So a query that names a trait (a key
``customer.NAME``) is answered at query time, exactly, without the shards knowing
about traits:

- a trait filter becomes a customer-id filter: the customers whose record has that
  trait with one of the allowed values (intersected with the query's own
  ``customer_id`` filter, if any). A customer without the trait matches no value,
  as an event without a dimension key matches no filter on that key;
- a trait in ``group_by`` makes the shards group by ``customer_id`` instead, and
  ``regroup`` maps each customer's partials to its trait values and merges them
  (``aggregates.merge_partial``: sums add, unique_count partials are united).

A customer known only by its usage, or hidden (deleted), has no traits: its usage
is still in the totals, grouped under ``None`` for every trait (null in JSON, as a
missing dimension), and a trait filter never selects it.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from decimal import localcontext
from typing import Any

import msgspec

from engine.domain.aggregates import merge_partial
from engine.domain.batch import RESERVED_DIMENSION_PREFIX
from engine.domain.query import QueryPlan, plan_query
from engine.domain.values import EXACT
from engine.errors import InvalidQuery
from engine.schema import Customer

# The prefix ingest refuses in dimension keys, so that a trait key is never a dimension.
TRAIT_PREFIX = RESERVED_DIMENSION_PREFIX

_NO_TRAITS: Mapping[str, str] = {}


def trait_of(key: str) -> str | None:
    """The trait a query key names (``customer.plan`` -> ``plan``), or None."""
    return key[len(TRAIT_PREFIX):] if key.startswith(TRAIT_PREFIX) else None


def names_traits(plan: QueryPlan) -> bool:
    """True if ``plan`` groups by or filters on a customer trait."""
    return (any(key.startswith(TRAIT_PREFIX) for key in plan.group_by)
            or any(key.startswith(TRAIT_PREFIX) for key in plan.query.filter))


@dataclass(frozen=True, slots=True, eq=False)
class TraitPlan:
    """How to answer a query naming traits: ``shard_plan`` (no trait keys) for the
    shards, then ``regroup`` on their partials gives partials keyed as ``plan``."""

    plan: QueryPlan
    shard_plan: QueryPlan
    # Per key of plan.group_by: ("shard", index in the shard group) or ("trait", name).
    sources: tuple[tuple[str, Any], ...]
    customer_at: int  # index of customer_id in the shard group (-1: not grouped by it)
    traits: Mapping[str, Mapping[str, str]]  # customer id -> its visible traits

    def traits_of(self, customer_id: str) -> Mapping[str, str]:
        return self.traits.get(customer_id, _NO_TRAITS)

    def regroup(self, shard_partials: list[dict[Any, Any]]) -> dict[Any, Any]:
        """The shards' partials merged per (span, group of ``plan``)."""
        kind = self.plan.meter.kind
        sources, customer_at, traits_of = self.sources, self.customer_at, self.traits_of
        groups: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        out: dict[tuple[int, tuple[Any, ...]], Any] = {}
        with localcontext(EXACT):
            for partials in shard_partials:
                for (span, shard_group), partial in partials.items():
                    group = groups.get(shard_group)
                    if group is None:
                        traits = traits_of(shard_group[customer_at]) if customer_at >= 0 else {}
                        group = groups[shard_group] = tuple(
                            shard_group[where] if source == "shard" else traits.get(where)
                            for source, where in sources)
                    key = (span, group)
                    existing = out.get(key)
                    out[key] = partial if existing is None else merge_partial(
                        kind, existing, partial)
        return out


def visible_traits(records: Mapping[str, Customer], hidden: Set[str]
                   ) -> dict[str, Mapping[str, str]]:
    """Every visible customer's traits (customers without traits left out)."""
    return {cid: record.traits for cid, record in records.items()
            if record.traits and cid not in hidden}


def plan_traits(plan: QueryPlan, records: Mapping[str, Customer], hidden: Set[str]
                ) -> TraitPlan | None:
    """The ``TraitPlan`` for ``plan`` with the registry as it is now (``records`` by
    id, ``hidden``: deleted ids), or None if ``plan`` names no trait."""
    if not names_traits(plan):
        return None
    query = plan.query
    for key in (*plan.group_by, *query.filter):
        if key == TRAIT_PREFIX:
            raise InvalidQuery(f"{key!r} names no trait (write 'customer.plan' for the "
                               "trait 'plan')")
    traits = visible_traits(records, hidden)
    trait_filters = [(name, frozenset(allowed)) for key, allowed in query.filter.items()
                     if (name := trait_of(key)) is not None]
    shard_filter = {key: allowed for key, allowed in query.filter.items()
                    if trait_of(key) is None}
    if trait_filters:
        matching = {cid for cid, values in traits.items()
                    if all(values.get(name) in allowed for name, allowed in trait_filters)}
        if "customer_id" in shard_filter:
            matching &= set(shard_filter["customer_id"])
        shard_filter["customer_id"] = sorted(matching)
    shard_group_by = [key for key in plan.group_by if trait_of(key) is None]
    if len(shard_group_by) < len(plan.group_by) and "customer_id" not in shard_group_by:
        shard_group_by.append("customer_id")
    customer_at = shard_group_by.index("customer_id") if "customer_id" in shard_group_by else -1
    sources = tuple(("shard", shard_group_by.index(key)) if (name := trait_of(key)) is None
                    else ("trait", name) for key in plan.group_by)
    shard_query = msgspec.structs.replace(query, group_by=shard_group_by, filter=shard_filter,
                                          take=None)
    return TraitPlan(plan=plan, shard_plan=plan_query(shard_query, plan.meter),
                     sources=sources, customer_at=customer_at, traits=traits)
