"""The engine with pricing: plans, assignments, invoices and cost limits.

Runtime piece of pricing: a subclass of the metering ``Engine`` that plugs
``PricingExtension`` into metering's extension seam
(``engine.runtime.extensions``) and reads usage only through the public query
API. ``engine.open_engine`` opens this class; metering's own
``engine.runtime.engine.open_engine`` still opens a metering-only engine (it
skips pricing's records on replay).

Invoices: usage per charge is an exact ``Query`` over the billing period
filtered to the customer and the charge's ``dimensions`` (the same meaning as
``Query.filter``). A period's invoice is ``open`` until ``late_ms`` (the
late-event limit) after its end, then ``final``: the first time it is asked for
it is logged (a ``WalExtension`` record) and from then on returned as stored.
Usage that changed in a final period since it was stored appears as an
``adjustment`` line on the next open invoice (and is then part of that one).
"""

from __future__ import annotations

import decimal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import trio

from engine.domain.limits import LimitError, check_webhook_url
from engine.errors import InvalidRequest, UnknownCustomer
from engine.pricing.extension import (
    PricingExtension,
    encode_action,
    encode_removal,
)
from engine.pricing.ledger import (
    AddCostLimit,
    AssignPlan,
    DefinePlan,
    RemoveCostLimit,
    StoreFinalInvoice,
)
from engine.pricing.model import (
    Charge,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    Plan,
    PlanAssignment,
    exact_amount,
)
from engine.pricing.model import (
    with_version as _with_version,
)
from engine.pricing.rating import (
    EXACT,
    PlanError,
    adjustment_line,
    as_quantity,
    billing_period,
    check_plan,
    plan_lines,
    total_of,
)
from engine.runtime.engine import Engine
from engine.runtime.engine import open_engine as open_metering_engine
from engine.runtime.groups import unwrap_single
from engine.schema import Limit, Query

# Final invoices of this many periods before an open one are checked for corrections.
ADJUSTED_PERIODS = 3


class PricedEngine(Engine):
    """An open engine with pricing (``engine.open_engine``); see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pricing = PricingExtension()
        kwargs["extension"] = self._pricing
        super().__init__(*args, **kwargs)
        # (customer, period start) -> set when the final invoice being stored is stored
        # (or its write failed): concurrent first reads store it once.
        self._storing: dict[tuple[str, int], trio.Event] = {}

    # ------------------------------------------------------------- plans

    async def define_plan(self, plan: Plan) -> Plan:
        """Store a plan as a new version of its id (1 for a new id) and return it as
        stored; a plan identical to the latest version stores nothing and returns it."""
        self._lifecycle.check_open()
        try:
            check_plan(plan, list(self._catalog.meter_defs))
            for charge in plan.charges:
                unique = self._catalog.meter_defs[charge.meter_api_name].unique_dimension
                if unique is not None and unique in charge.dimensions:
                    raise PlanError(f"charge {charge.charge_id!r}: meter "
                                    f"{charge.meter_api_name!r} counts distinct {unique!r}; "
                                    "cannot filter on it")
        except PlanError as exc:
            raise InvalidRequest(f"plan {getattr(plan, 'id', '?')!r}: {exc}") from None
        latest = self._pricing.committed.latest(plan.id)
        candidate = _with_version(plan, 0)
        if latest is not None and _with_version(latest, 0) == candidate:
            return latest
        # The version is decided in commit order (Ledger.apply): two concurrent
        # definitions get two versions.
        action = DefinePlan(candidate, self._now_ms())
        await self._log_extension(encode_action(action), action)
        stored = self._pricing.committed.plans[plan.id]
        return next(p for p in reversed(stored) if _with_version(p, 0) == candidate)

    def plans(self) -> list[Plan]:
        """The latest version of every plan, by id."""
        ledger = self._pricing.committed
        return [ledger.plans[plan_id][-1] for plan_id in sorted(ledger.plans)]

    def get_plan(self, plan_id: str, version: int | None = None) -> Plan | None:
        versions = self._pricing.committed.plans.get(plan_id)
        if not versions:
            return None
        if version is None:
            return versions[-1]
        return versions[version - 1] if 1 <= version <= len(versions) else None

    def plan_versions(self, plan_id: str) -> list[Plan]:
        return list(self._pricing.committed.plans.get(plan_id, []))

    async def assign_plan(self, customer_id: str, plan_id: str, *,
                          effective_from_ms: int) -> PlanAssignment:
        """Bill ``customer_id`` on ``plan_id`` from the first period start at or after
        ``effective_from_ms`` (a first plan: from the start of the period holding it).
        An assignment starting where another starts replaces it. No proration."""
        self._lifecycle.check_open()
        if type(customer_id) is not str or not customer_id:
            raise InvalidRequest("customer_id must be a non-empty string")
        if type(effective_from_ms) is not int or effective_from_ms < 0:
            raise InvalidRequest("effective_from_ms must be a non-negative integer")
        if self._pricing.committed.latest(plan_id) is None:
            raise InvalidRequest(f"unknown plan {plan_id!r}")
        action = AssignPlan(customer_id, plan_id, effective_from_ms)
        await self._log_extension(encode_action(action), action)
        ledger = self._pricing.committed
        plan = ledger.latest(plan_id)
        assert plan is not None
        found = ledger.assignment_at(customer_id, ledger.starts_ms(customer_id, plan,
                                                                   effective_from_ms))
        assert found is not None
        return found

    def plan_assignments(self, customer_id: str) -> list[PlanAssignment]:
        return list(self._pricing.committed.assignments.get(customer_id, []))

    # ------------------------------------------------------------- invoices

    async def invoice(self, customer_id: str, at_ms: int) -> Invoice:
        """The invoice of the billing period holding ``at_ms`` (see the module docstring).
        ``UnknownCustomer`` if no plan bills the customer then."""
        self._lifecycle.check_open()
        if type(at_ms) is not int or at_ms < 0:
            raise InvalidRequest("at_ms must be a non-negative integer")
        ledger = self._pricing.committed
        plan = ledger.plan_for(customer_id, at_ms)
        if plan is None:
            raise UnknownCustomer(f"no plan bills customer {customer_id!r} at {at_ms} ms")
        start, end = billing_period(at_ms, plan.timezone)
        while (storing := self._storing.get((customer_id, start))) is not None:
            await storing.wait()  # another read is storing this period's final invoice
        stored = ledger.finals.get(customer_id, {}).get(start)
        if stored is not None:
            return stored
        now_ms = self._now_ms()
        final = now_ms >= end + self.ingest_rules.late_ms
        if not final:
            return await self._rated_invoice(customer_id, plan, start, end, "open", now_ms)
        # The first read of a final period stores it (a WAL record, whatever the caller
        # may otherwise write: reading it is what fixes its amounts); reads meanwhile
        # wait for it rather than rating and storing it again.
        storing = self._storing[(customer_id, start)] = trio.Event()
        try:
            invoice = await self._rated_invoice(customer_id, plan, start, end, "final", now_ms)
            action = StoreFinalInvoice(invoice)
            await self._log_extension(encode_action(action), action)
        finally:
            del self._storing[(customer_id, start)]
            storing.set()
        return self._pricing.committed.finals[customer_id][start]

    async def _rated_invoice(self, customer_id: str, plan: Plan, start: int, end: int,
                             status: InvoiceStatus, now_ms: int) -> Invoice:
        lines = await self._period_lines(customer_id, plan, start, end)
        lines += await self._adjustments(customer_id, start)
        return Invoice(customer_id=customer_id, plan_id=plan.id, plan_version=plan.version,
                       currency=plan.currency, period_start_ms=start, period_end_ms=end,
                       status=status, lines=lines, total=total_of(lines), as_of_ms=now_ms)

    async def _period_lines(self, customer_id: str, plan: Plan, start: int,
                            end: int) -> list[InvoiceLine]:
        quantities: dict[str, Decimal] = {}

        async def usage_of(charge: Charge) -> None:
            result = await self.query(Query(
                meter_api_name=charge.meter_api_name, start_ms=start, end_ms=end,
                filter={"customer_id": [customer_id], **charge.dimensions}))
            quantities[charge.charge_id] = (as_quantity(result.rows[0].value) if result.rows
                                            else Decimal(0))

        # One query per charge, all in flight at once (each waits on a shard's mailbox);
        # a failing one raises its own error, not a group.
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                for charge in plan.charges:
                    nursery.start_soon(usage_of, charge)
        return plan_lines(plan, quantities)

    async def _adjustments(self, customer_id: str, start: int) -> list[InvoiceLine]:
        """Corrections of the final invoices of the periods just before ``start``:
        what each rates at now, less what it and later invoices already billed."""
        finals = self._pricing.committed.finals.get(customer_id, {})
        earlier = sorted(s for s in finals if s < start)[-ADJUSTED_PERIODS:]
        found: list[InvoiceLine] = []
        for period_start in earlier:
            stored = finals[period_start]
            plan = self.get_plan(stored.plan_id, stored.plan_version)
            assert plan is not None
            recomputed = await self._period_lines(customer_id, plan, stored.period_start_ms,
                                                  stored.period_end_ms)
            line = adjustment_line(stored, recomputed)
            if line is None:
                continue
            with decimal.localcontext(EXACT):
                billed = sum((old.amount for later in finals.values()
                              for old in later.lines
                              if old.adjusts_period_start_ms == period_start), Decimal(0))
                delta = line.amount - billed
            if delta:
                found.append(InvoiceLine(
                    kind="adjustment", charge_id=None, meter_api_name=None,
                    quantity=Decimal(1), amount=delta, exact_amount=delta,
                    description=line.description, adjusts_period_start_ms=period_start))
        return found

    # ------------------------------------------------------------- cost limits

    async def _add_extension_limit(self, limit: Limit) -> Limit:
        try:
            stored = self._check_cost_limit(limit)
        except (ValueError, LimitError) as exc:
            raise InvalidRequest(f"limit {limit.id!r}: {exc}") from None
        if limit.id in self._catalog.limit_defs:
            raise InvalidRequest(f"limit {limit.id!r} is a usage limit: remove it first")
        action = AddCostLimit(stored, self._now_ms())
        await self._log_extension(encode_action(action), action)
        return stored

    def _check_cost_limit(self, limit: Limit) -> Limit:
        if type(limit.id) is not str or not limit.id or len(limit.id) > 256:
            raise LimitError("limit id must be a non-empty string of at most 256 characters")
        if limit.meter_api_name is not None and limit.meter_api_name not in (
                self._catalog.meter_defs):
            raise LimitError(f"unknown meter {limit.meter_api_name!r}")
        if limit.period != "month":
            raise LimitError("a cost limit's period is the plan's billing month: "
                             "period must be 'month'")
        if limit.filter:
            raise LimitError("a cost limit has no filter (price a subset with a charge's "
                             "dimensions)")
        if limit.customer_id is not None:
            if type(limit.customer_id) is not str or not limit.customer_id:
                raise LimitError("customer_id must be null or a non-empty string")
            plan = self._pricing.committed.plan_for(limit.customer_id, self._now_ms())
            if plan is not None and plan.timezone != limit.timezone:
                raise LimitError(f"the plan {plan.id!r} bills in {plan.timezone!r}: a cost "
                                 f"limit's timezone must be that zone, not {limit.timezone!r}")
        else:
            zones = {p.timezone for p in self.plans()}
            if zones - {limit.timezone}:
                raise LimitError(f"plans bill in {sorted(zones)}: a cost limit for every "
                                 f"customer must use the zone of all of them")
        if not isinstance(limit.thresholds, list) or not 1 <= len(limit.thresholds) <= 32:
            raise LimitError("thresholds must be a list of 1 to 32 amounts")
        thresholds = [exact_amount(t, "threshold") for t in limit.thresholds]
        check_webhook_url(limit.webhook_url)
        return Limit(id=limit.id, meter_api_name=limit.meter_api_name, thresholds=list(
            thresholds), customer_id=limit.customer_id, period="month", timezone=limit.timezone,
            webhook_url=limit.webhook_url, measure="cost")

    async def _remove_extension_limit(self, limit_id: str) -> bool:
        if limit_id not in self._pricing.committed.cost_limits:
            return False
        action = RemoveCostLimit(limit_id)
        await self._log_extension(encode_removal(limit_id, self._now_ms()), action)
        return True


@asynccontextmanager
async def open_engine(data_dir: Any = None, shards: int = 8,
                      **options: Any) -> AsyncIterator[PricedEngine]:
    """``engine.runtime.engine.open_engine`` (every option is its), opening the engine
    with pricing: ``define_plan``, ``assign_plan``, ``invoice`` and cost limits."""
    async with open_metering_engine(data_dir, shards, engine_type=PricedEngine,
                                    **options) as engine:
        assert isinstance(engine, PricedEngine)
        yield engine
