"""Meter and limit definitions and customer records: the catalog requests are checked against.

Runtime layer: domain types only. One owner: the catalog is changed only by
recovery (while the engine starts, before any task runs) and by the WAL writer,
in commit order, right after the transaction that logged the change. Callers
read it to validate a request in their own task; the writer decides again in
commit order, where a concurrent definition may have won.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.domain import records
from engine.domain.limits import LimitDef
from engine.domain.meters import MeterDef
from engine.schema import Customer, Limit, Meter

if TYPE_CHECKING:
    from engine.runtime.extensions import Extension


class Catalog:
    def __init__(self) -> None:
        self.meter_defs: dict[str, MeterDef] = {}
        self.limit_defs: dict[str, LimitDef] = {}  # in the order they were added
        # Customers added or updated; a deleted one keeps its record but is hidden.
        # Customers known only by their usage have no record here (the shards know them).
        self.customers: dict[str, Customer] = {}
        self.hidden_customers: set[str] = set()
        # Set once, before recovery: pricing, or None (engine.runtime.extensions).
        self.extension: Extension | None = None

    # ------------------------------------------------------------- reading

    def meters(self) -> list[Meter]:
        return [self.meter_defs[name].meter for name in sorted(self.meter_defs)]

    def limits(self) -> list[Limit]:
        usage = [limit.limit for limit in self.limit_defs.values()]
        return usage + (self.extension.limits() if self.extension is not None else [])

    def stored_limits(self) -> list[Limit]:
        """Limits as a snapshot stores them (wide integers as decimals), in added order."""
        return [records.wide_ints_as_decimals(limit.limit) for limit in self.limit_defs.values()]

    def engine_state(self, next_alert_seq: int) -> records.EngineState:
        """What a snapshot stores of the catalog (meters live in the store's meta)."""
        return records.EngineState(
            limits=self.stored_limits(), next_alert_seq=next_alert_seq,
            customers=[self.customers[cid] for cid in sorted(self.customers)],
            hidden_customers=sorted(self.hidden_customers),
            extension=self.extension.export() if self.extension is not None else b"",
        )

    def customer_record(self, customer_id: str) -> Customer | None:
        """The visible record of a customer, if it has one."""
        if customer_id in self.hidden_customers:
            return None
        return self.customers.get(customer_id)

    # ------------------------------------------------ writing (writer, recovery)

    def put_meter(self, meter: MeterDef) -> None:
        self.meter_defs[meter.name] = meter

    def put_limit(self, limit: LimitDef) -> None:
        """Add or replace: a replaced limit moves to the end of the added order."""
        self.limit_defs.pop(limit.id, None)
        self.limit_defs[limit.id] = limit

    def drop_limit(self, limit_id: str) -> bool:
        return self.limit_defs.pop(limit_id, None) is not None

    def put_customer(self, customer: Customer) -> None:
        """Store a record; it is visible again if the customer had been deleted."""
        self.customers[customer.id] = customer
        self.hidden_customers.discard(customer.id)

    def hide_customer(self, customer_id: str) -> None:
        self.hidden_customers.add(customer_id)
