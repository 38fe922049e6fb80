"""Pricing on metering's extension seam: durable plans, and cost limits from the usage feed.

Runtime piece of pricing: it implements ``engine.runtime.extensions.Extension``
and may import the runtime's messages and the metering domain; metering never
imports it. No trio, no clocks: every method is a deterministic function of
what the runtime hands it, in commit or acknowledgement order.

- Plans, assignments and final invoices are ``WalExtension`` records; cost
  limits are ordinary ``WalLimit`` / ``WalRemoveLimit`` records with
  ``measure="cost"`` (so old logs and peers read them unchanged).
- While at least one cost limit exists, every charge of every plan has a
  *usage feed* installed in the shards (``engine.domain.limits.usage_feed``: the
  charge's meter, the plan's billing month and zone, the charge's dimension
  filter). Feeds are shared by all limits and customers, so a batch costs the
  same few dict operations per event whatever the number of cost limits.
- After each acknowledged record, the feed's changed (customer, period) usages
  are stored, and only those customers are rated: their cost limits are found
  through an index by customer (plus the limits for every customer), never by
  a scan. A threshold fires once per period; it re-arms when the amount falls
  below it again (a volume tier can lower a cost as usage grows), and then fires
  again with a new seq.
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from typing import Any

import msgspec

from engine.domain import records
from engine.domain.limits import Crossing, LimitDef, UsageChange, usage_feed
from engine.domain.meters import MeterDef
from engine.domain.values import fits_int64
from engine.pricing.ledger import (
    LOGGED_ACTIONS,
    Action,
    AddCostLimit,
    AssignPlan,
    DefinePlan,
    Ledger,
    LedgerState,
    RemoveCostLimit,
    StoreFinalInvoice,
    restore_ledger,
)
from engine.pricing.model import Charge, Plan
from engine.pricing.rating import (
    EXACT,
    MINOR_UNITS,
    billing_period,
    charge_amount,
    period_total,
)
from engine.runtime.messages import DropLimit, InstallLimit, ShardWork
from engine.schema import Limit

_encoder = msgspec.msgpack.Encoder()
_action_decoder: msgspec.msgpack.Decoder[Action] = msgspec.msgpack.Decoder(Action)
_state_decoder = msgspec.msgpack.Decoder(tuple[LedgerState, list[Any], list[Any]])
FORGET_EVERY_MS = 3_600_000
KEEP_PERIODS_MS = 100 * 86_400_000  # usage and fired masks older than this are dropped


def feed_id(charge: Charge, timezone: str) -> str:
    dims = msgspec.json.encode(sorted((k, sorted(v)) for k, v in charge.dimensions.items()))
    return f"pricing:{charge.meter_api_name}:{timezone}:{dims.decode()}"


def wanted_feeds(ledger: Ledger) -> dict[str, tuple[Charge, str]]:
    """Feed id -> (a charge it serves, the zone): every charge of every plan version
    (a late event rates its period on the version of that period), while any cost
    limit exists."""
    if not ledger.cost_limits:
        return {}
    feeds: dict[str, tuple[Charge, str]] = {}
    for versions in ledger.plans.values():
        for plan in versions:
            for charge in plan.charges:
                feeds.setdefault(feed_id(charge, plan.timezone), (charge, plan.timezone))
    return feeds


def encode_action(action: Action) -> bytes:
    """The WAL record of an action: cost limits as limit records, the rest as extension's."""
    if isinstance(action, AddCostLimit):
        return records.encode(records.WalLimit(action.limit, action.received_ms))
    if isinstance(action, RemoveCostLimit):
        raise ValueError("encode a removal with its received time: encode_removal")
    tag = type(action).__struct_config__.tag
    assert isinstance(tag, str)
    return records.encode(records.WalExtension(tag, _encoder.encode(action),
                                               _received_ms(action)))


def encode_removal(limit_id: str, received_ms: int) -> bytes:
    return records.encode(records.WalRemoveLimit(limit_id, received_ms))


def _received_ms(action: Action) -> int:
    if isinstance(action, DefinePlan):
        return action.defined_ms
    if isinstance(action, StoreFinalInvoice):
        return action.invoice.as_of_ms
    return 0


class PricingExtension:
    """Pricing's state as the runtime drives it (see the module docstring)."""

    def __init__(self) -> None:
        self.committed = Ledger()  # commit order: what callers validate against and read
        self.acked = Ledger()  # acknowledgement order: what cost limits are evaluated with
        self.feeds: dict[str, tuple[Charge, str]] = {}  # installed (commit order)
        # Acknowledgement order: (customer, period start) -> feed id -> usage.
        self.usage: dict[tuple[str, int], dict[str, Any]] = {}
        # limit id -> (customer, period start) -> bitmask of thresholds fired.
        self.fired: dict[str, dict[tuple[str, int], int]] = {}
        self._by_customer: dict[str, list[Limit]] = {}
        self._every_customer: list[Limit] = []
        self._thresholds: dict[str, tuple[Decimal, ...]] = {}
        self._forgotten_at_ms = 0
        # Derived, rebuilt on demand (never exported): the plan of (customer, period
        # start), each plan version's charge feeds, and each (customer, period)'s rounded
        # usage amounts per charge with the plan they were rated on.
        self._plans: dict[tuple[str, int], Plan | None] = {}
        self._ratings: dict[tuple[str, int], _PlanRating] = {}
        # [rating, rounded amount per charge, their sum]
        self._amounts: dict[tuple[str, int], list[Any]] = {}
        # (customer, period start) -> its headroom since it was last rated (``_Room``):
        # while no change can reach a threshold, a feed change is stored, not rated.
        self._rooms: dict[tuple[str, int], _Room] = {}
        self.skip_unreachable = True  # off only to check that skipping changes nothing

    # ----------------------------------------------------- Extension protocol

    def decode(self, record: records.WalRecord) -> Any | None:
        if isinstance(record, records.WalExtension):
            return _action_decoder.decode(record.body)
        if isinstance(record, records.WalLimit) and record.limit.measure == "cost":
            return AddCostLimit(record.limit, record.received_ms)
        if isinstance(record, records.WalRemoveLimit) and (
                record.limit_id in self.committed.cost_limits):
            return RemoveCostLimit(record.limit_id)
        return None

    def commit(self, action: Any, received_ms: int,
               meters: dict[str, MeterDef]) -> list[ShardWork]:
        self.committed.apply(action)
        if isinstance(action, StoreFinalInvoice | AssignPlan):
            return []
        wanted = wanted_feeds(self.committed)
        work: list[ShardWork] = [DropLimit(fid) for fid in self.feeds if fid not in wanted]
        for fid in sorted(wanted):
            if fid not in self.feeds:
                charge, zone = wanted[fid]
                work.append(InstallLimit(self._feed_def(fid, charge, zone, meters), received_ms))
        self.feeds = wanted
        return work

    def acknowledge(self, actions: list[Any], feed: list[UsageChange],
                    received_ms: int) -> list[Crossing]:
        crossings: list[Crossing] = []
        dirty: set[tuple[str, int]] = set()  # rated whole
        changed: dict[tuple[str, int], set[str]] = {}  # rated for these feeds only
        for action in actions:
            if self._rooms and isinstance(action, AddCostLimit | RemoveCostLimit | DefinePlan
                                          | AssignPlan):
                # Headroom was computed for the old limits and plans; the amounts of the
                # changes it absorbed are rated again with the rest (whole, once).
                self._rooms.clear()
                self._amounts.clear()
            if isinstance(action, AddCostLimit | RemoveCostLimit):
                limit_id = action.limit.id if isinstance(action, AddCostLimit) else action.limit_id
                replaced = self.acked.cost_limits.get(limit_id)
                if replaced is not None:
                    self._unindex(replaced)
            self.acked.apply(action)
            if isinstance(action, AddCostLimit | RemoveCostLimit):
                if isinstance(action, AddCostLimit):
                    self._index(action.limit)
                limit_id = action.limit.id if isinstance(action, AddCostLimit) else action.limit_id
                self.fired.pop(limit_id, None)
                if isinstance(action, AddCostLimit):
                    self.fired[limit_id] = {}
                    dirty.update(self._current_keys(action.limit, received_ms))
                if not self.acked.cost_limits:
                    self.usage.clear()
                    self._amounts.clear()
                    self._rooms.clear()
            elif isinstance(action, DefinePlan | AssignPlan):
                # A price or plan change: re-rate the periods that have limits.
                self._plans.clear()
                dirty.update(key for key in self.usage if self._has_limits(key[0]))
        for fid, customer, start, value in feed:
            key = (customer, start)
            entry = self.usage.get(key)
            if entry is None:
                entry = self.usage[key] = {}
            entry[fid] = value
            feeds = changed.get(key)
            if feeds is None:
                changed[key] = {fid}
            else:
                feeds.add(fid)
        # Each (customer, period) is rated or absorbed on its own, so the ones to rate
        # are found first and rated in key order (the feed's order varies by shard).
        rooms, usage = self._rooms, self.usage
        rate: dict[tuple[str, int], set[str] | None] = dict.fromkeys(dirty)
        for key, feeds in changed.items():
            if key in rate:
                continue
            room = rooms.get(key)
            if room is not None:
                if room.absorbs(usage[key], feeds):
                    continue
                feeds |= room.pending
            rate[key] = feeds
        for key in sorted(rate):
            self._evaluate(key[0], key[1], rate[key], crossings)
        self._forget(received_ms)
        return crossings

    def feed_defs(self, meters: dict[str, MeterDef]) -> list[LimitDef]:
        return [self._feed_def(fid, charge, zone, meters)
                for fid, (charge, zone) in sorted(self.feeds.items())]

    def limits(self) -> list[Limit]:
        return list(self.committed.cost_limits.values())

    def export(self) -> bytes:
        return _encoder.encode([
            self.acked.export(),
            [[c, s, [[fid, _number(v)] for fid, v in sorted(usage.items())]]
             for (c, s), usage in sorted(self.usage.items())],
            [[limit_id, [[c, s, m] for (c, s), m in sorted(masks.items())]]
             for limit_id, masks in sorted(self.fired.items())],
        ])

    def restore(self, raw: bytes) -> None:
        if not raw:
            return
        ledger_state, usage, fired = _state_decoder.decode(raw)
        self.committed = restore_ledger(ledger_state)
        self.acked = restore_ledger(ledger_state)
        self.feeds = wanted_feeds(self.committed)
        self.usage = {(c, s): {fid: records.decimal_or_int(v) for fid, v in entries}
                      for c, s, entries in usage}
        self.fired = {limit_id: {(c, s): m for c, s, m in masks} for limit_id, masks in fired}
        for limit_id in self.acked.cost_limits:
            self.fired.setdefault(limit_id, {})
        self._index_limits()

    # ----------------------------------------------------- evaluation

    def _feed_def(self, fid: str, charge: Charge, zone: str,
                  meters: dict[str, MeterDef]) -> LimitDef:
        return usage_feed(fid, meters[charge.meter_api_name], "month", zone,
                          {k: list(v) for k, v in charge.dimensions.items()})

    def _index_limits(self) -> None:
        """Rebuild the index of cost limits by customer (after a restore)."""
        self._by_customer = {}
        self._every_customer = []
        self._thresholds = {}
        for limit in self.acked.cost_limits.values():
            self._index(limit)

    def _index(self, limit: Limit) -> None:
        if limit.customer_id is None:
            self._every_customer.append(limit)
        else:
            self._by_customer.setdefault(limit.customer_id, []).append(limit)
        with decimal.localcontext(EXACT):
            self._thresholds[limit.id] = tuple(sorted({Decimal(t) for t in limit.thresholds}))

    def _unindex(self, limit: Limit) -> None:
        if limit.customer_id is None:
            self._every_customer.remove(limit)
        else:
            found = self._by_customer[limit.customer_id]
            found.remove(limit)
            if not found:
                del self._by_customer[limit.customer_id]
        del self._thresholds[limit.id]

    def _has_limits(self, customer: str) -> bool:
        return bool(self._every_customer) or customer in self._by_customer

    def _current_keys(self, limit: Limit, received_ms: int) -> list[tuple[str, int]]:
        """The (customer, period) pairs a new limit is evaluated for at once."""
        start = billing_period(received_ms, limit.timezone)[0]
        if limit.customer_id is not None:
            return [(limit.customer_id, start)]
        return [key for key in self.usage if key[1] == start]

    def _plan_at(self, customer: str, start: int) -> Plan | None:
        """The plan billing ``customer`` for the period starting at ``start``, if ``start``
        is a period start of its zone (remembered until a plan or assignment changes)."""
        key = (customer, start)
        if key in self._plans:
            return self._plans[key]
        plan = self.acked.plan_for(customer, start)
        if plan is not None and billing_period(start, plan.timezone)[0] != start:
            plan = None
        self._plans[key] = plan
        return plan

    def _rating_of(self, plan: Plan) -> _PlanRating:
        """What rating ``plan`` per feed change needs (remembered per version)."""
        key = (plan.id, plan.version)
        found = self._ratings.get(key)
        if found is None:
            found = self._ratings[key] = _PlanRating(plan)
        return found

    def _evaluate(self, customer: str, start: int, changed: set[str] | None,
                  crossings: list[Crossing]) -> None:
        """Rate (customer, period) and check its cost limits. Only the charges whose feed
        is in ``changed`` are rated again (every charge with usage, with None or a new
        plan); the others keep their rounded amounts."""
        limits = self._by_customer.get(customer)
        every = self._every_customer
        if not limits and not every:
            return
        plan = self._plan_at(customer, start)
        if plan is None:
            return
        key = (customer, start)
        self._rooms.pop(key, None)
        usage = self.usage.get(key, {})
        rating = self._rating_of(plan)
        known = self._amounts.get(key)
        if known is None or known[0] is not rating:
            known = [rating, list(rating.zero_amounts), rating.zero_subtotal]
            self._amounts[key] = known
            changed = None
        if changed is None:
            # Rated whole: every feed with usage (the amounts may be stale, as feed
            # changes of a customer without limits are stored but not rated).
            changed = set(usage)
        amounts: list[Decimal] = known[1]
        subtotal: Decimal = known[2]
        charges = plan.charges
        for fid in changed or ():
            for index in rating.charges_of_feed.get(fid, ()):
                value = usage.get(fid, 0)
                amount = charge_amount(charges[index], value if type(value) is Decimal
                                       else Decimal(value), plan.currency)
                subtotal = EXACT.add(EXACT.subtract(subtotal, amounts[index]), amount)
                amounts[index] = amount
        known[2] = subtotal
        slack: Decimal | None = None  # the least rise of an amount that reaches a threshold
        for limit in (limits or []) + every:
            if limit.timezone != plan.timezone:
                continue  # refused when the limit is added for a customer's known plan
            if limit.meter_api_name is None:
                amount = rating.total(subtotal)
            else:
                amount = EXACT.add(Decimal(0), sum(
                    (amounts[i] for i in rating.charges_of_meter.get(limit.meter_api_name, ())),
                    Decimal(0)))
            self._check(limit, plan, customer, start, amount, crossings)
            for threshold in self._thresholds[limit.id]:
                if amount < threshold:
                    rise = EXACT.subtract(threshold, amount)
                    if slack is None or rise < slack:
                        slack = rise
                    break
        if self.skip_unreachable:
            self._rooms[key] = _Room(rating, dict(usage), slack)

    def _check(self, limit: Limit, plan: Plan, customer: str, start: int, amount: Decimal,
               crossings: list[Crossing]) -> None:
        masks = self.fired[limit.id]
        fired = masks.get((customer, start), 0)
        now = 0
        for index, threshold in enumerate(self._thresholds[limit.id]):
            if amount < threshold:
                continue  # below: not fired, or re-armed if it had been
            now |= 1 << index
            if not fired & (1 << index):
                crossings.append((limit.id, customer, limit.meter_api_name, threshold, amount,
                                  start, "cost", plan.currency))
        if now:
            masks[(customer, start)] = now
        else:
            masks.pop((customer, start), None)

    def _forget(self, received_ms: int) -> None:
        """Drop usage and fired masks of periods long past (at most once per hour)."""
        if received_ms - self._forgotten_at_ms < FORGET_EVERY_MS:
            return
        self._forgotten_at_ms = received_ms - received_ms % FORGET_EVERY_MS
        horizon = received_ms - KEEP_PERIODS_MS
        for key in [key for key in self.usage if key[1] < horizon]:
            del self.usage[key]
            self._amounts.pop(key, None)
            self._rooms.pop(key, None)
            self._plans.pop(key, None)
        for masks in self.fired.values():
            for key in [key for key in masks if key[1] < horizon]:
                del masks[key]


class _PlanRating:
    """One plan version prepared for rating feed changes: which charges each feed and
    each meter has, every charge's amount at zero usage, and the total's rule."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.charges_of_feed: dict[str, list[int]] = {}
        self.charges_of_meter: dict[str, list[int]] = {}
        for index, charge in enumerate(plan.charges):
            self.charges_of_feed.setdefault(feed_id(charge, plan.timezone), []).append(index)
            self.charges_of_meter.setdefault(charge.meter_api_name, []).append(index)
        # Per feed: (rate, jump, volume charges): a rise of its usage by d raises the sum
        # of its charges' rounded amounts by at most rate * d + jump, as long as each
        # volume charge stays in the tier it was in (``_Room``).
        self.bounds: dict[str, tuple[Decimal, Decimal, list[Charge]]] = {}
        for fid, indexes in self.charges_of_feed.items():
            rate, jump, volume = Decimal(0), Decimal(0), []
            for index in indexes:
                charge_rate, charge_jump = _rise_bound(plan.charges[index], plan.currency)
                rate, jump = EXACT.add(rate, charge_rate), EXACT.add(jump, charge_jump)
                if plan.charges[index].model == "volume":
                    volume.append(plan.charges[index])
            self.bounds[fid] = (rate, jump, volume)
        self.zero_amounts = [charge_amount(c, Decimal(0), plan.currency) for c in plan.charges]
        with decimal.localcontext(EXACT):
            self.zero_subtotal = sum(self.zero_amounts, Decimal(0))

    def total(self, usage_subtotal: Decimal) -> Decimal:
        """The invoice total (``plan_lines`` without adjustments) from the usage lines' sum."""
        return period_total(self.plan, [usage_subtotal])


_CEILING = decimal.Context(prec=28, rounding=decimal.ROUND_CEILING,
                           traps=[decimal.InvalidOperation, decimal.Overflow])
_FLOOR = decimal.Context(prec=28, rounding=decimal.ROUND_FLOOR,
                         traps=[decimal.InvalidOperation, decimal.Overflow])


def _rise_bound(charge: Charge, currency: str) -> tuple[Decimal, Decimal]:
    """(rate, jump): a rise of ``charge``'s usage by d, from u to u + d, raises its rounded
    amount by at most rate * d + jump, and never lowers it, for every model but volume;
    for volume, while u and u + d fall in the same tier. Every model is non-decreasing
    there (prices and fees are non-negative), the min/max clamp and the half-up
    rounding keep that, and rounding adds less than one minor unit."""
    minor = Decimal(1).scaleb(-MINOR_UNITS[currency])
    if charge.model == "per_unit":
        return charge.unit_price, minor
    if charge.model == "package":
        # ceil((b + d) / size) - ceil(b / size) <= d / size + 1 packages
        rate = _CEILING.divide(charge.package_price, charge.package_size)
        return rate, EXACT.add(charge.package_price, minor)
    # graduated: each unit at most the dearest tier's price, plus at most every flat fee;
    # volume inside one tier: that tier's price, plus its flat fee when leaving zero
    rate = max(tier.unit_price for tier in charge.tiers)
    jump = minor
    for tier in charge.tiers:
        jump = EXACT.add(jump, tier.flat_fee)
    return rate, jump


def _volume_edge(charge: Charge, quantity: Any) -> Any | None:
    """The largest usage in the volume tier that ``quantity`` is rated in (None: no end)."""
    billable = quantity - charge.free_units if quantity > charge.free_units else 0
    for tier in charge.tiers:
        if tier.up_to is None:
            return None
        if billable <= tier.up_to:
            return EXACT.add(tier.up_to, charge.free_units)
    return None


class _Room:
    """A (customer, period)'s headroom since it was last rated: the usage it was rated
    at (``base``), the least rise of a limit's amount that reaches an unfired threshold
    (``slack``; None: every threshold has fired), and the feeds changed since
    (``pending``), to rate when it no longer absorbs a change.

    The slack is shared out equally among the plan's feeds: each feed gets a usage
    ``cap`` below which its charges' rise bound (``_rise_bound``) stays under its share.
    A change is absorbed when every changed feed's usage is at its base or above it
    and below its cap, and no volume charge left its tier (where its amount can fall).
    A fall is never absorbed (it could re-arm a threshold). Every amount a limit
    compares (a line's, or the total with fixed fee and minimum) then rises by less
    than the slack, so no threshold is reached: the crossings are exactly those of
    rating every change. Absorbing costs a few comparisons per feed, no arithmetic.
    """

    __slots__ = ("base", "caps", "pending", "rating", "share")

    def __init__(self, rating: _PlanRating, base: dict[str, Any], slack: Decimal | None) -> None:
        self.rating = rating
        self.base = base
        self.share = None if slack is None else _FLOOR.divide(slack, len(rating.bounds) or 1)
        self.pending: set[str] = set()
        # feed id -> (base, cap: usage below it is absorbed (None: no cap), volume edge)
        self.caps: dict[str, tuple[Any, Any | None, Any | None]] = {}

    def absorbs(self, usage: dict[str, Any], feeds: set[str]) -> bool:
        caps = self.caps
        for fid in feeds:
            found = caps.get(fid)
            if found is None:
                bounds = self.rating.bounds.get(fid)
                if bounds is None:
                    continue  # a feed of another plan's charge: no amount of this one
                found = caps[fid] = self._cap(fid, bounds)
            value = usage.get(fid, 0)
            base, cap, edge = found
            if value == base:
                continue
            if value < base or (cap is not None and value >= cap) or (
                    edge is not None and value > edge):
                return False
        self.pending |= feeds
        return True

    def _cap(self, fid: str, bounds: tuple[Decimal, Decimal, list[Charge]]) -> tuple[
            Any, Any | None, Any | None]:
        base = self.base.get(fid, 0)
        rate, jump, volume = bounds
        share = self.share
        cap: Any | None
        if share is None:
            cap = None
        elif jump >= share:
            cap = base  # any rise may reach the share
        elif not rate:
            cap = None
        else:
            # rate * (value - base) + jump < share  <=>  value < base + (share - jump) / rate
            cap = EXACT.add(base, _FLOOR.divide(EXACT.subtract(share, jump), rate))
        edge = min((e for e in (_volume_edge(c, base) for c in volume) if e is not None),
                   default=None)
        return base, cap, edge


def _number(value: Any) -> int | str:
    return value if type(value) is int and fits_int64(value) else str(value)


def is_logged(action: Any) -> bool:
    return isinstance(action, LOGGED_ACTIONS)
