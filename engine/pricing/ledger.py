"""Pricing's catalog: plan versions, assignments, cost limits and final invoices.

Pure pricing layer: the standard library, msgspec, ``engine.schema`` and the
pricing modules. A ``Ledger`` changes only by ``apply(action)``, a
deterministic function of the action sequence, so the two views pricing keeps
(commit order and acknowledgement order, ``engine.pricing.extension``) agree
once both have seen the same actions, and replay rebuilds them exactly.
"""

from __future__ import annotations

import bisect
from typing import Any

import msgspec

from engine.pricing.model import Invoice, Plan, PlanAssignment, with_version
from engine.pricing.rating import billing_period
from engine.schema import Limit


class DefinePlan(msgspec.Struct, tag="plan", array_like=True):
    plan: Plan  # its version is numbered when applied, in commit order
    defined_ms: int


class AssignPlan(msgspec.Struct, tag="assign", array_like=True):
    customer_id: str
    plan_id: str
    effective_from_ms: int


class StoreFinalInvoice(msgspec.Struct, tag="final_invoice", array_like=True):
    invoice: Invoice


class AddCostLimit(msgspec.Struct, tag="add_cost_limit", array_like=True):
    limit: Limit
    received_ms: int


class RemoveCostLimit(msgspec.Struct, tag="remove_cost_limit", array_like=True):
    limit_id: str


Action = DefinePlan | AssignPlan | StoreFinalInvoice | AddCostLimit | RemoveCostLimit
LOGGED_ACTIONS = (DefinePlan, AssignPlan, StoreFinalInvoice)  # as WalExtension records


class Ledger:
    def __init__(self) -> None:
        self.plans: dict[str, list[Plan]] = {}  # id -> versions (index = version - 1)
        self.defined_ms: dict[str, list[int]] = {}  # id -> when each version was defined
        self.assignments: dict[str, list[PlanAssignment]] = {}  # by starts_ms
        self.cost_limits: dict[str, Limit] = {}  # in the order they were added
        self.finals: dict[str, dict[int, Invoice]] = {}  # customer -> period start -> invoice

    # ------------------------------------------------------------- reading

    def latest(self, plan_id: str) -> Plan | None:
        versions = self.plans.get(plan_id)
        return versions[-1] if versions else None

    def version_at(self, plan_id: str, at_ms: int) -> Plan:
        """The version defined last before ``at_ms`` (the first one if none was)."""
        versions = self.plans[plan_id]
        index = bisect.bisect_left(self.defined_ms[plan_id], at_ms)
        return versions[max(index - 1, 0)]

    def assignment_at(self, customer_id: str, at_ms: int) -> PlanAssignment | None:
        found = None
        for assignment in self.assignments.get(customer_id, ()):
            if assignment.starts_ms > at_ms:
                break
            found = assignment
        return found

    def plan_for(self, customer_id: str, at_ms: int) -> Plan | None:
        """The plan version that bills ``customer_id`` for the period holding ``at_ms``."""
        assignment = self.assignment_at(customer_id, at_ms)
        if assignment is None:
            return None
        latest = self.latest(assignment.plan_id)
        assert latest is not None
        end = billing_period(at_ms, latest.timezone)[1]
        return self.version_at(assignment.plan_id, end)

    def starts_ms(self, customer_id: str, plan: Plan, effective_from_ms: int) -> int:
        """A first plan applies from the start of the period holding ``effective_from_ms``;
        a later one from the first period start at or after it (no proration)."""
        start, end = billing_period(effective_from_ms, plan.timezone)
        if not self.assignments.get(customer_id) or start == effective_from_ms:
            return start
        return end

    # ------------------------------------------------------------- writing

    def apply(self, action: Action) -> Any:
        """Apply one action; returns what the caller asked for (the stored plan,
        assignment or invoice), or None."""
        match action:
            case DefinePlan(unnumbered, defined_ms):
                versions = self.plans.setdefault(unnumbered.id, [])
                plan = with_version(unnumbered, len(versions) + 1)
                versions.append(plan)
                self.defined_ms.setdefault(plan.id, []).append(defined_ms)
                return plan
            case AssignPlan(customer_id, plan_id, effective_from_ms):
                assigned = self.latest(plan_id)
                assert assigned is not None
                assignment = PlanAssignment(customer_id, plan_id, effective_from_ms,
                                            self.starts_ms(customer_id, assigned,
                                                           effective_from_ms))
                kept = [a for a in self.assignments.get(customer_id, ())
                        if a.starts_ms != assignment.starts_ms]
                kept.append(assignment)
                kept.sort(key=lambda a: a.starts_ms)
                self.assignments[customer_id] = kept
                return assignment
            case StoreFinalInvoice(invoice):
                periods = self.finals.setdefault(invoice.customer_id, {})
                # The first stored wins: a final invoice is never recomputed.
                return periods.setdefault(invoice.period_start_ms, invoice)
            case AddCostLimit(limit):
                self.cost_limits.pop(limit.id, None)
                self.cost_limits[limit.id] = limit
                return limit
            case RemoveCostLimit(limit_id):
                return self.cost_limits.pop(limit_id, None)
        raise AssertionError(f"unknown action {action!r}")

    # ------------------------------------------------------------- snapshot

    def export(self) -> list[Any]:
        return [
            [[plan_id, self.plans[plan_id], self.defined_ms[plan_id]]
             for plan_id in sorted(self.plans)],
            [[cid, self.assignments[cid]] for cid in sorted(self.assignments)],
            list(self.cost_limits.values()),
            [invoice for cid in sorted(self.finals)
             for _, invoice in sorted(self.finals[cid].items())],
        ]


class LedgerState(msgspec.Struct, array_like=True):
    plans: list[tuple[str, list[Plan], list[int]]] = []
    assignments: list[tuple[str, list[PlanAssignment]]] = []
    cost_limits: list[Limit] = []
    finals: list[Invoice] = []


def restore_ledger(state: LedgerState) -> Ledger:
    ledger = Ledger()
    for plan_id, versions, defined in state.plans:
        ledger.plans[plan_id] = list(versions)
        ledger.defined_ms[plan_id] = list(defined)
    for customer_id, assignments in state.assignments:
        ledger.assignments[customer_id] = list(assignments)
    for limit in state.cost_limits:
        ledger.cost_limits[limit.id] = limit
    for invoice in state.finals:
        ledger.finals.setdefault(invoice.customer_id, {})[invoice.period_start_ms] = invoice
    return ledger
